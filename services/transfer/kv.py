"""What one send carries (a layer's K and V for consecutive tokens) and the KVHeader that announces it.

A send is either tensors (`KVTensors`) or blocks of the sender's KV cache in shared memory
(`KVBlocks`, see `KVSender.allocate_cache`); both are immutable, and cheap to make once per layer.
`Headers` checks a send's arguments and makes its header; the path the send takes then fills in
where K and V are (send_paths.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from services.proto_gen import kv_pb2
from services.transfer.fingerprint import KVFingerprint

# Headers go as eager messages: a request id long enough to break that is refused.
MAX_HEADER_BYTES = 4096


class KVTensors(NamedTuple):
    """K and V of one layer, each [num_tokens, num_kv_heads, head_dim], in the fingerprint's dtype."""

    k: torch.Tensor
    v: torch.Tensor


class KVBlocks(NamedTuple):
    """`num_tokens` tokens of one layer in the sender's shared KV cache.

    `block_table` lists the request's blocks in that cache from position 0; the tokens are those
    from the send's token_start on.
    """

    num_tokens: int
    block_table: Sequence[int]


LayerKV = KVTensors | KVBlocks


class Headers:
    """Checks a send's arguments and makes its KVHeader, for one fingerprint (worked out once: this runs per layer)."""

    def __init__(self, fp: KVFingerprint) -> None:
        self._fp = fp
        self._num_layers = fp.num_layers
        self._token_shape = (fp.num_kv_heads, fp.head_dim)
        self._dtype = fp.torch_dtype
        self._token_payload = fp.payload_bytes(1)

    def new(self, request_id: str, layer: int, token_start: int, kv: LayerKV) -> Any:
        """The KVHeader of a send of `kv`, its addresses and sequence still to fill in; ValueError for bad arguments.

        Tensors are checked against the fingerprint here; blocks against the cache by its path.
        """
        if isinstance(kv, KVTensors):
            k, v = kv
            for name, t in (("k", k), ("v", v)):
                shape = t.shape
                if len(shape) != 3 or shape[1:] != self._token_shape or shape[0] == 0:
                    fp = self._fp
                    raise ValueError(
                        f"{name} must have shape [n>0, {fp.num_kv_heads}, {fp.head_dim}], got {tuple(shape)}"
                    )
                if t.dtype != self._dtype:
                    raise ValueError(f"{name} has dtype {t.dtype}, the fingerprint says {self._dtype}")
            if v.shape != k.shape:
                raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
            num_tokens = int(k.shape[0])
        else:
            num_tokens = kv.num_tokens
        if not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self._num_layers})")
        if token_start < 0:
            raise ValueError(f"token_start must be >= 0, got {token_start}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if len(request_id) > MAX_HEADER_BYTES // 8 and len(request_id.encode()) > MAX_HEADER_BYTES // 2:
            raise ValueError(f"request_id is too long ({len(request_id)} chars) for a KV header")
        return kv_pb2.KVHeader(
            request_id=request_id,
            layer=layer,
            token_start=token_start,
            num_tokens=num_tokens,
            payload_bytes=num_tokens * self._token_payload,
        )
