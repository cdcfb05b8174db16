"""What both sides of a KV hand-off must agree on before any bytes move."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from services.dtypes import TORCH_DTYPES
from services.proto_gen import kv_pb2
from services.transfer.errors import KVIncompatible


@dataclass(frozen=True)
class KVFingerprint:
    """The KV cache layout of one worker: two workers can exchange KV only if their fingerprints are equal."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("KVFingerprint.model must be a non-empty string")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"KVFingerprint.dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVFingerprint.{name} must be a positive int, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes of K (or of V) for one token of one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    def payload_bytes(self, num_tokens: int) -> int:
        """Bytes of one layer's payload (K then V) for `num_tokens` tokens."""
        return 2 * num_tokens * self.token_bytes

    @classmethod
    def for_cache(cls, model: str, kv_cache: torch.Tensor) -> KVFingerprint:
        """The fingerprint of a `[layers, 2, blocks, block_size, kv_heads, head_dim]` cache tensor."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must have shape [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got {tuple(kv_cache.shape)}"
            )
        names = {v: k for k, v in TORCH_DTYPES.items()}
        if kv_cache.dtype not in names:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} is not supported")
        layers, _, _, block_size, heads, head_dim = kv_cache.shape
        return cls(model, names[kv_cache.dtype], block_size, layers, heads, head_dim)

    def to_proto(self) -> kv_pb2.KVFingerprint:
        return kv_pb2.KVFingerprint(
            model=self.model,
            dtype=self.dtype,
            block_size=self.block_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    @classmethod
    def from_proto(cls, msg: kv_pb2.KVFingerprint) -> KVFingerprint:
        """Raises ValueError when the message does not describe a valid fingerprint."""
        return cls(
            model=msg.model,
            dtype=msg.dtype,
            block_size=msg.block_size,
            num_layers=msg.num_layers,
            num_kv_heads=msg.num_kv_heads,
            head_dim=msg.head_dim,
        )

    def check(self, other: KVFingerprint) -> None:
        """Raise KVIncompatible naming every field where `other` differs from this (local) fingerprint."""
        diffs = [
            f"{f.name}: local={getattr(self, f.name)!r} remote={getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise KVIncompatible("KV layouts differ: " + "; ".join(diffs))
