"""Paged KV block manager with prefix caching. Pure Python.

Blocks are reference-counted. A block whose tokens are all computed and that is full gets a
hash chained to its parent's, so equal prefixes map to equal hashes. When the last request
holding a block frees it, the block joins the free queue but keeps its hash: a later request
with the same prefix can take it back (a prefix-cache hit) until allocation evicts it,
least recently freed first.

Invariants (checked by check_integrity):
  - a block is in the free queue exactly when its ref_count is 0;
  - ref_count equals the number of requests whose block list holds the block;
  - cached_blocks[h] is a block whose hash is h.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from services.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class ComputedBlocks(NamedTuple):
    block_ids: list[int]
    num_tokens: int


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of a full block, chained to its parent block's hash."""
    return hash((parent, tokens))


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of a token sequence (also used by the router for affinity)."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, tuple(token_ids[start : start + block_size]))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[int, int] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest cached prefix of the request's tokens, in whole blocks.

        At least one token is always left to compute, so the last block of a fully cached
        prompt is not counted (its last token's logits are needed to sample).
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks([], 0)
        tokens = request.all_token_ids
        hits: list[int] = []
        for h in prefix_block_hashes(tokens[: len(tokens) - 1], self.block_size):
            block_id = self.cached_blocks.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(hits) * self.block_size
        return ComputedBlocks(hits, len(hits) * self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> bool:
        """Makes room for num_new_tokens after the request's computed tokens; False if it cannot.

        blocks:  |<- computed (cached hits + earlier steps) ->|<- num_new_tokens ->|
                 |   already held or taken from the cache      |   fresh blocks     |
        """
        held = self.req_blocks.setdefault(request.request_id, [])
        hit_ids = computed.block_ids if computed else []
        num_computed = (computed.num_tokens if computed else 0) or request.num_computed_tokens
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(held) - len(hit_ids)
        reclaimable = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if needed > len(self.free_queue) - reclaimable:
            if not held:
                del self.req_blocks[request.request_id]
            return False
        for block_id in hit_ids:
            self._take(block_id)
            held.append(block_id)
        if hit_ids:
            self.req_num_hashed[request.request_id] = len(hit_ids)
        for _ in range(max(needed, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"block {block_id} reused with ref_count {block.ref_count}"
            if block.hash is not None:
                if self.cached_blocks.get(block.hash) == block_id:
                    del self.cached_blocks[block.hash]
                block.hash = None
            block.ref_count = 1
            held.append(block_id)
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers the request's newly full and computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        held = self.req_blocks.get(rid, [])
        done = self.req_num_hashed.get(rid, 0)
        num_full = min(num_computed_tokens // self.block_size, len(held))
        if num_full <= done:
            return
        tokens = request.all_token_ids
        parent = self.blocks[held[done - 1]].hash if done else None
        for i in range(done, num_full):
            block = self.blocks[held[i]]
            parent = chain_hash(parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
            block.hash = parent
            self.cached_blocks.setdefault(parent, block.block_id)
        self.req_num_hashed[rid] = num_full

    def hold(self, holder: str, block_ids: list[int]) -> None:
        """Takes a reference, under `holder`, on each of block_ids it does not hold yet; `free(holder)` drops them.

        Blocks that something outside the engine still reads (KV being sent) stay out of reuse
        that way after their request has finished.
        """
        held = self.req_blocks.setdefault(holder, [])
        have = set(held)
        for block_id in block_ids:
            if block_id not in have:
                self._take(block_id)
                held.append(block_id)
                have.add(block_id)

    def free(self, request_id: str) -> None:
        """Drops the request's references. Tail blocks are queued first so they are evicted first."""
        held = self.req_blocks.pop(request_id, [])
        self.req_num_hashed.pop(request_id, None)
        for block_id in reversed(held):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def take_stats(self) -> tuple[int, int]:
        """(prefix-cache queries, hits) since the last call, in tokens."""
        stats = (self.prefix_queries, self.prefix_hits)
        self.prefix_queries = self.prefix_hits = 0
        return stats

    def check_integrity(self) -> None:
        """Raises AssertionError naming the first broken invariant."""
        refs = [0] * self.num_blocks
        for rid, held in self.req_blocks.items():
            assert len(set(held)) == len(held), f"request {rid} holds a block twice"
            for block_id in held:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but held {refs[block.block_id]} times"
            )
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), f"block {block.block_id}: free-queue membership is wrong"
        for h, block_id in self.cached_blocks.items():
            assert self.blocks[block_id].hash == h, f"cached hash points at block {block_id} with another hash"
