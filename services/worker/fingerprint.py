"""A worker's KV layout, as the transfer handshake compares it (both pools build theirs here)."""

from __future__ import annotations

from services.transfer.fingerprint import KVFingerprint
from services.worker.base import EngineWorker


def kv_fingerprint(worker: EngineWorker) -> KVFingerprint:
    cfg = worker.engine.model_config
    return KVFingerprint(
        model=cfg.name,
        dtype=worker.config.kv_cache_dtype_name,
        block_size=worker.config.block_size,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
    )
