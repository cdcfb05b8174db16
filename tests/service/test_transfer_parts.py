"""The hand-off's parts on their own: configuration, the staging ring's bookkeeping, the bench's options."""

from __future__ import annotations

import pytest

from services.transfer import TransferConfig


def test_staging_mib_is_validated() -> None:
    assert TransferConfig(staging_mib=0).staging_mib == 0
    for bad in (-1, 1 << 17, 2.0, True):
        with pytest.raises(ValueError, match="staging_mib"):
            TransferConfig(staging_mib=bad)  # type: ignore[arg-type]


def test_spin_us_is_validated() -> None:
    assert TransferConfig(spin_us=0).spin_us == 0
    for bad in (-1, 100_001, 0.5, True):
        with pytest.raises(ValueError, match="spin_us"):
            TransferConfig(spin_us=bad)  # type: ignore[arg-type]


def test_ucx_transports_come_from_the_config_then_the_environment_then_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from services.transfer.config import CUDA_UCX_TLS, DEFAULT_UCX_TLS

    monkeypatch.delenv("UCX_TLS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TransferConfig().ucx_env()["UCX_TLS"] == DEFAULT_UCX_TLS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TransferConfig().transports() == f"{DEFAULT_UCX_TLS},{CUDA_UCX_TLS}"  # CUDA memory needs cuda_copy
    monkeypatch.setenv("UCX_TLS", "rc,cuda_copy,tcp")  # as a Helm values file sets it
    assert TransferConfig().transports() == "rc,cuda_copy,tcp"
    assert TransferConfig(ucx_tls="shm,tcp").transports() == "shm,tcp"
    monkeypatch.setenv("UCX_TLS", "rc,cuda_copy")  # RDMA alone: the handshake needs no UCX transport of its own
    assert TransferConfig().transports() == "rc,cuda_copy"
    monkeypatch.setenv("UCX_TLS", " , ")
    with pytest.raises(ValueError, match="UCX_TLS in the environment must name at least one"):
        TransferConfig().transports()
    with pytest.raises(ValueError, match="ucx_tls"):
        TransferConfig(ucx_tls=" , ")


def test_pieces_hold_their_rows_pointers() -> None:
    import numpy as np

    from services.transfer.native import Pieces

    p = Pieces(np.array([[0, 8], [16, 64], [8, 8]]))
    assert p.count == 2 and p.rows.dtype == np.uint64
    assert p.pointers == (p.rows.ctypes.data, p.rows.ctypes.data + 16, p.rows.ctypes.data + 32)
    with pytest.raises(ValueError, match="rows"):
        Pieces(np.zeros((2, 3)))


def test_a_claimed_region_must_lie_in_one_shared_mapping_of_its_own() -> None:
    """`native.shared_mapping` vets a claimed region: memory mapped next to it, or past its object's end, is not it."""
    import ctypes
    import mmap
    import os

    from services.transfer import native

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    size = 1 << 16
    fd = os.memfd_create("pdserve-test-region")
    os.ftruncate(fd, size)
    # Private memory first, then the object's pages mapped over the start of it: the rest stays mapped right after.
    below = libc.mmap(None, 4 * size, rw, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert below not in (None, ctypes.c_void_p(-1).value)
    try:
        assert libc.mmap(below, size, rw, mmap.MAP_SHARED | 0x10, fd, 0) == below  # MAP_FIXED
        assert native.shared_mapping(below, size) and native.shared_mapping(below + 100, size - 100)
        assert native.shared_mapping(below, size + 1) is False  # the next page is mapped, but is not the object
        assert native.shared_mapping(below + size, size) is None  # private memory is no shared object's
        assert native.shared_mapping(below, 0) is False
        # A mapping longer than its object: the pages past the object's end would fault.
        assert libc.mmap(below, 2 * size, rw, mmap.MAP_SHARED | 0x10, fd, 0) == below
        assert native.shared_mapping(below, size) and native.shared_mapping(below, 2 * size) is False
    finally:
        libc.munmap(below, 4 * size)
        os.close(fd)


def test_staging_ring_hands_out_space_in_order_and_reuses_it() -> None:
    from services.transfer.native import Node
    from services.transfer.staging import ALIGN, StagingRing

    node = Node()
    ring = StagingRing(node.allocate(64 * ALIGN))
    try:
        a = ring.take(10 * ALIGN, 0)
        b = ring.take(20 * ALIGN + 1, 0)  # rounded up to 21 units
        c = ring.take(30 * ALIGN, 0)
        assert (a, b, c) == (0, 10 * ALIGN, 31 * ALIGN)
        assert ring.take(10 * ALIGN, 0) is None  # 3 units left at the end, and a is still live
        ring.give(b)  # out of order: a still holds the head
        assert ring.take(10 * ALIGN, 0) is None
        ring.give(a)  # now [0, 31) is free: wrap around
        assert ring.take(25 * ALIGN, 0) == 0
        assert ring.take(7 * ALIGN, 0) is None  # 6 units left before c
        ring.give(c)
        assert ring.used == 25 * ALIGN
        with pytest.raises(ValueError, match="do not fit"):
            ring.take(33 * ALIGN, 0)
        ring.buffer[:] = 7  # the memory is really there
    finally:
        ring.region.close()
        node.close()


def test_bench_transfer_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from services.bench.bandwidth import main

    bad = (["--repeats", "0"], ["--rounds", "0"], ["--spin-us", "-1"], ["--sizes-mib", "0.0001"], ["--sizes-mib", "x"])
    for argv in (*bad, ["--staging-mib", "-1"], ["--ucx-tls", " , "]):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.argv", ["pdserve bench transfer", *argv])
            assert main() == 2, argv
        assert "error:" in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:  # argparse's own refusal: exit status 2, message on stderr
        mp.setattr("sys.argv", ["pdserve bench transfer", "--source", "disk"])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2 and "invalid choice: 'disk'" in capsys.readouterr().err


def test_bench_transfer_forwards_its_own_options_to_a_driver_elsewhere() -> None:
    """`--hosts netns` reruns the sweep on host a with the options it was given (bandwidth.forwarded)."""
    import argparse

    from services.bench import transfer
    from services.bench.bandwidth import add_arguments, forwarded

    parser = argparse.ArgumentParser()
    transfer.add_arguments(parser)
    given = ["--hosts", "netns", "--sizes-mib", "4,16", "--no-pin", "--source", "tensors", "--ttft-repeats", "2"]
    argv = forwarded(parser.parse_args(given))
    assert argv == ["--sizes-mib", "4,16", "--source", "tensors", "--no-pin"]
    own = argparse.ArgumentParser()
    add_arguments(own)
    again = own.parse_args(argv)
    assert (again.sizes_mib, again.source, again.no_pin, again.repeats) == ("4,16", "tensors", True, 7)
