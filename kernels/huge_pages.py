"""CPU tensors on transparent huge pages, for the memory a decode step streams: the KV cache, and the weights of
the few-rows products."""

from __future__ import annotations

import ctypes

import torch

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 * 2**20


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros on the CPU, its memory advised for transparent huge pages before it is first touched (Linux
    with THP "madvise" or "always"; elsewhere plain pages). A decode's attention jumps from block to block of
    the cache: on this 2-core host the kernel ran about 10% faster over 2 MiB pages than over 4 KiB ones. Only
    the whole 2 MiB pages inside the tensor are advised."""
    tensor = torch.empty(shape, dtype=dtype)
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        try:
            libc = ctypes.CDLL(None)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)
        except (OSError, AttributeError):  # no libc madvise: plain pages
            pass
    return tensor.zero_()


def gather_on_huge_pages(tensors: list[torch.Tensor], align: int = 16) -> list[torch.Tensor]:
    """Copies of float32 CPU `tensors`, laid one after another (each start `align` elements apart at least) in
    one block on huge pages: tensors of a few MiB each get whole huge pages that way."""
    starts, total = [], 0
    for t in tensors:
        starts.append(total)
        total += -(-t.numel() // align) * align
    block = zeros_on_huge_pages((max(total, 1),), torch.float32)
    return [block[s : s + t.numel()].view(t.shape).copy_(t) for s, t in zip(starts, tensors, strict=True)]
