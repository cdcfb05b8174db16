"""Every decoder layer of a decode step of a few rows, and the final norm, in one C call on the CPU (cpu_layers.c).

At one to four rows, a step spent about as long in the operators around the products (norms, rotary embedding,
attention, SwiGLU, each called from Python) as in the products, which stream the weights from memory. The C
path runs the same operators, layer after layer, in one OpenMP region of torch's threads. It takes the weights
that the few-rows products read (PackedLinear.row_major, kept where `choose_few_rows` chose that kernel), so it
runs for the step sizes that kernel runs for, with a float32 model and a float32, float16 or bfloat16 cache; the
model's modules remain the path for every other step, and the reference in the tests.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from kernels.cpu_native import KV_TYPES, library

_POINTERS = ("input_norm", "qkv", "qkv_bias", "o", "post_norm", "gate_up", "gate_up_bias", "down", "down_bias")
# What pd_decode_layers returns for input it refuses (nothing is written then).
_REFUSALS = {
    1: "a position lies outside the rotary cache",
    2: "a slot lies outside the KV cache",
    3: "a context is empty or overruns its block table",
    4: "a block id lies outside the KV cache",
    5: "the step has more rows than the kernel takes",
}


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _POINTERS]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_long), ("hidden", ctypes.c_long), ("heads", ctypes.c_long),
                ("kv_heads", ctypes.c_long), ("dim", ctypes.c_long), ("intermediate", ctypes.c_long),
                ("num_positions", ctypes.c_long), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos_sin", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer))]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's float32 CPU weights; the products' in nn.Linear's [out, in] layout, contiguous."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate, hidden]: the gate's rows, then the up projection's
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None


class DecodeLayers:
    """The C path over one model's weights (held here, so that the pointers the C side keeps stay valid)."""

    def __init__(self, layers: list[LayerWeights], final_norm: torch.Tensor, cos_sin: torch.Tensor, heads: int,
                 kv_heads: int, eps: float, scale: float, max_rows: int) -> None:
        hidden, dim = final_norm.shape[0], cos_sin.shape[1]
        intermediate = layers[0].down.shape[1]
        shapes = {"input_norm": (hidden,), "qkv": ((heads + 2 * kv_heads) * dim, hidden),
                  "qkv_bias": ((heads + 2 * kv_heads) * dim,), "o": (hidden, heads * dim), "post_norm": (hidden,),
                  "gate_up": (2 * intermediate, hidden), "gate_up_bias": (2 * intermediate,),
                  "down": (hidden, intermediate), "down_bias": (hidden,)}
        for layer in layers:
            for name in _POINTERS:
                t = getattr(layer, name)
                if t is not None and (t.shape != shapes[name] or t.dtype != torch.float32
                                      or t.device.type != "cpu" or not t.is_contiguous()):
                    raise ValueError(f"DecodeLayers: {name} must be a contiguous float32 CPU tensor of "
                                     f"{shapes[name]}, got {tuple(t.shape)} {t.dtype} on {t.device}")
        if heads % kv_heads or dim % 2 or not 1 <= max_rows <= 4 or not cos_sin.is_contiguous():
            raise ValueError("DecodeLayers: heads must be a multiple of kv_heads, the head size even, "
                             "max_rows 1 to 4 and cos_sin contiguous")
        self._tensors = (layers, final_norm, cos_sin)
        self._layers = (_Layer * len(layers))(*(
            _Layer(*(0 if getattr(layer, name) is None else getattr(layer, name).data_ptr() for name in _POINTERS))
            for layer in layers))
        self._model = _Model(len(layers), hidden, heads, kv_heads, dim, intermediate, cos_sin.shape[0], eps, scale,
                             cos_sin.data_ptr(), final_norm.data_ptr(), self._layers)
        self.hidden, self.kv_heads, self.dim, self.max_rows = hidden, kv_heads, dim, max_rows
        self._scratch = torch.empty(0)
        self._scratch_sizes: dict[tuple[int, int, int], int] = {}  # (rows, context capacity, threads) -> floats

    def fits(self, x: torch.Tensor, context_lens: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether the step is for this path: 1 to max_rows rows, one per sequence (decodes only), and a
        cache [layers, 2, blocks, block_size, kv_heads, dim] of a type the kernel takes (KV_TYPES)."""
        rows = x.shape[0]
        return (1 <= rows <= self.max_rows and context_lens.shape[0] == rows and x.dtype == torch.float32
                and x.device.type == "cpu" and kv_cache.dtype in KV_TYPES and kv_cache.device.type == "cpu"
                and kv_cache.dim() == 6 and kv_cache.shape[0] == self._model.num_layers
                and kv_cache.shape[4:] == (self.kv_heads, self.dim) and kv_cache.is_contiguous())

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """x: [rows, hidden] embeddings (a step that `fits`). Writes each layer's new K and V to its slot and
        returns the final norm's output [rows, hidden]; ValueError (nothing written) for bad positions, slots,
        contexts or block ids."""
        so = library()
        if so is None:
            raise RuntimeError("DecodeLayers: the CPU kernels are not built")
        rows = x.shape[0]
        x = x.contiguous()
        positions, slots, tables, lens = (t.to(torch.int64).contiguous()
                                          for t in (positions, slot_mapping, block_tables, context_lens))
        if positions.shape != (rows,) or slots.shape != (rows,) or tables.dim() != 2 or tables.shape[0] != rows:
            raise ValueError("DecodeLayers: positions, slots, block tables and context lengths disagree on the rows")
        _, _, num_blocks, block_size, _, _ = kv_cache.shape
        threads = torch.get_num_threads()
        key = (rows, tables.shape[1] * block_size, threads)
        need = self._scratch_sizes.get(key)
        if need is None:
            need = self._scratch_sizes[key] = so.pd_decode_layers_scratch(ctypes.byref(self._model), *key)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        out = torch.empty(rows, self.hidden)
        failed = so.pd_decode_layers(
            ctypes.byref(self._model), x.data_ptr(), rows, positions.data_ptr(), slots.data_ptr(),
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), kv_cache.data_ptr(), KV_TYPES[kv_cache.dtype],
            num_blocks, block_size, out.data_ptr(), self._scratch.data_ptr(), threads,
        )  # fmt: skip
        if failed:
            raise ValueError(f"DecodeLayers: {_REFUSALS.get(failed, f'refused ({failed})')}")
        return out
