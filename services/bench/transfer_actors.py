"""Ray actor bodies for the two ends of a KV hand-off, used by `pdserve bench transfer` and the tests.

They are plain classes: wrap them with `ray.remote(...)`. Data is generated inside the actors
from a seed, so no KV tensor ever travels through Ray. Timestamps are `time.monotonic()`, which
is one clock for every process of a host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time

import torch

from services.transfer.config import TransferConfig
from services.transfer.expected import KVArrival, slot_ids
from services.transfer.fingerprint import KVFingerprint
from services.transfer.kv import KVBlocks, KVTensors
from services.transfer.receiver import KVReceiver
from services.transfer.sender import KVSender
from services.worker.cores import bind_process


def make_kv(fp: KVFingerprint, num_tokens: int, seed: int) -> torch.Tensor:
    """Deterministic KV of one request: [num_layers, 2, num_tokens, num_kv_heads, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (fp.num_layers, 2, num_tokens, fp.num_kv_heads, fp.head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(fp.torch_dtype)


class DecodeSide:
    """Holds a real kv_cache (on `device`) and a KVReceiver.

    `on_node`: advertise the node's address in the Ray cluster, as a decode worker does, for senders on other
    nodes (else the config's host, 127.0.0.1 by default).
    """

    def __init__(
        self, fp: KVFingerprint, config: TransferConfig, num_blocks: int, device: str = "cpu", on_node: bool = False
    ) -> None:
        if on_node:
            config = config.on_node()
        self.fp = fp
        shape = (fp.num_layers, 2, num_blocks, fp.block_size, fp.num_kv_heads, fp.head_dim)
        # zero_() writes every page now (torch.zeros may map untouched ones), as a serving worker's cache is once warm
        self.kv_cache = torch.empty(shape, dtype=fp.torch_dtype, device=device).zero_()
        self.receiver = KVReceiver(self.kv_cache, fp, config)
        self.slots: dict[str, torch.Tensor] = {}
        self.completions: dict[str, asyncio.Future[KVArrival]] = {}

    async def start(self) -> str:
        return await self.receiver.start()

    async def pin(self, cpus: set[int]) -> None:
        bind_process(cpus)  # a core of its own, as a deployment gives each worker (services/worker/cores.py)

    async def expect(self, request_id: str, block_ids: list[int], token_start: int, token_end: int) -> None:
        """Announce the request and start waiting for it here, so that no call reaches this actor mid-transfer."""
        self.receiver.expect(request_id, block_ids, token_start, token_end)
        self.slots[request_id] = torch.from_numpy(slot_ids(block_ids, token_start, token_end, self.fp.block_size))
        self.completions[request_id] = asyncio.ensure_future(self._completion(request_id))

    async def _completion(self, request_id: str) -> KVArrival:
        return await self.receiver.wait(request_id)

    async def wait(self, request_id: str) -> KVArrival:
        """Waits for the request; returns the monotonic time at which its KV was all in place, and what it crossed.

        That is when the last copy ended (KVReceiver.wait reports it), not when this actor's
        event loop got round to noticing, which adds 50 to 150 us here.
        """
        return await self.completions.pop(request_id)

    async def read(self, request_id: str) -> torch.Tensor:
        """The request's KV as stored in the cache, on the host: [num_layers, 2, num_tokens, heads, dim]."""
        fp = self.fp
        flat = self.kv_cache.view(fp.num_layers, 2, -1, fp.num_kv_heads, fp.head_dim)
        return flat[:, :, self.slots.pop(request_id).to(flat.device)].cpu()  # indexing copies

    async def check(self, request_id: str, seed: int) -> bool:
        """Whether the request's KV, made from `seed` (make_kv), is in place exactly; forgets the request."""
        stored = await self.read(request_id)
        return torch.equal(stored, make_kv(self.fp, stored.shape[2], seed))

    async def forget(self, request_id: str) -> None:
        self.slots.pop(request_id, None)

    async def close(self) -> None:
        await self.receiver.close()


class PrefillSide:
    """Holds a KVSender and sends requests layer by layer, as a prefill worker's compute thread would.

    With `cache_blocks`, the KV comes from a KV cache of that many blocks in shared memory
    (`KVSender.allocate_cache`), into which each request is first written at random blocks, as
    the prefill worker's layers write theirs; without, it goes as tensors on `device` (staged
    when on the host, registered in place when on CUDA). `on_node`: listen on the node's address in the Ray
    cluster alone, as a prefill worker does.
    """

    def __init__(
        self,
        fp: KVFingerprint,
        config: TransferConfig,
        cache_blocks: int = 0,
        device: str = "cpu",
        on_node: bool = False,
    ) -> None:
        if on_node:
            config = config.on_node()
        self.fp = fp
        self.device = device
        self.sender = KVSender(fp, config)
        self.data: dict[tuple[int, int], torch.Tensor] = {}
        self.cache_blocks = cache_blocks
        self.cache: torch.Tensor | None = None
        self.rng = random.Random(0)

    async def start(self) -> bool:
        """Bring the sender (and the shared cache) up; returns whether the cache is shared."""
        await self.sender.start()
        if self.cache_blocks and self.cache is None:
            fp = self.fp
            shape = (fp.num_layers, 2, self.cache_blocks, fp.block_size, fp.num_kv_heads, fp.head_dim)
            self.cache = self.sender.allocate_cache(shape)
        return self.cache is not None

    async def pin(self, cpus: set[int]) -> None:
        bind_process(cpus)  # a core of its own, as a deployment gives each worker (services/worker/cores.py)

    async def prepare(self, num_tokens: int, seed: int) -> None:
        self.kv(num_tokens, seed)

    def kv(self, num_tokens: int, seed: int) -> torch.Tensor:
        """make_kv on `device`, made once per (num_tokens, seed)."""
        kv = self.data.get((num_tokens, seed))
        if kv is None:
            kv = self.data[(num_tokens, seed)] = make_kv(self.fp, num_tokens, seed).to(self.device)
        return kv

    async def send_request(self, peer: str, request_id: str, token_start: int, num_tokens: int, seed: int) -> float:
        """Send all layers; returns the monotonic time just before the first layer was submitted.

        A separate thread submits one send per layer and does not wait between layers, which is
        how the prefill worker overlaps transfer with compute.
        """
        await self.start()
        kv = self.kv(num_tokens, seed)
        loop = asyncio.get_running_loop()
        table = self._write(kv, token_start) if self.cache is not None else []

        blocks = KVBlocks(num_tokens, table) if self.cache is not None else None  # the same for every layer

        def submit(layer: int) -> concurrent.futures.Future[int]:
            sent = blocks if blocks is not None else KVTensors(kv[layer, 0], kv[layer, 1])
            return self.sender.submit(loop, peer, request_id, layer, token_start, sent)

        def compute_thread() -> float:
            t0 = time.monotonic()
            futures = [submit(layer) for layer in range(self.fp.num_layers)]
            for f in futures:
                f.result()
            return t0

        return await loop.run_in_executor(None, compute_thread)

    def _write(self, kv: torch.Tensor, token_start: int) -> list[int]:
        """Write a request's KV into random blocks of the cache; returns its block table (from position 0)."""
        assert self.cache is not None
        fp = self.fp
        end = token_start + kv.shape[2]
        table = self.rng.sample(range(self.cache_blocks), -(-end // fp.block_size))
        flat = self.cache.view(fp.num_layers, 2, -1, fp.num_kv_heads, fp.head_dim)
        flat[:, :, torch.from_numpy(slot_ids(table, token_start, end, fp.block_size))] = kv.cpu()
        return table

    async def connects(self) -> int:
        return self.sender.connects

    async def close(self) -> None:
        await self.sender.close()
