"""KV hand-off over UCX: KVSender (prefill side) streams layers to KVReceiver (decode side)."""

from __future__ import annotations

from services.transfer.config import TransferConfig
from services.transfer.errors import KVIncompatible, TransferError
from services.transfer.fingerprint import KVFingerprint
from services.transfer.receiver import KVReceiver
from services.transfer.sender import KVSender

__all__ = ["KVFingerprint", "KVIncompatible", "KVReceiver", "KVSender", "TransferConfig", "TransferError"]
