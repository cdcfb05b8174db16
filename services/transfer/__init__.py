"""KV hand-off over UCX: KVSender (prefill side) offers each layer, KVReceiver (decode side) copies it into its blocks.

The data path is C on UCP (native/kvx.c); a TCP control connection carries the handshake and reports a peer
that is gone (wire.py).
"""

from __future__ import annotations

from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.expected import KVArrival
from services.transfer.fingerprint import KVFingerprint
from services.transfer.kv import KVBlocks, KVTensors
from services.transfer.receiver import KVReceiver
from services.transfer.sender import KVSender

__all__ = [
    "KVArrival",
    "KVBlocks",
    "KVFingerprint",
    "KVIncompatible",
    "KVReceiver",
    "KVSender",
    "KVTensors",
    "TransferConfig",
    "TransferError",
]
