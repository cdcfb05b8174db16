"""Errors raised by the KV hand-off (sender and receiver halves)."""

from __future__ import annotations

from typing import Literal

Reason = Literal["timeout", "peer_gone", "bad_header", "incompatible", "cancelled"]
REASONS: tuple[str, ...] = ("timeout", "peer_gone", "bad_header", "incompatible", "cancelled")


class TransferError(Exception):
    """A KV transfer failed. `reason` says why, in one machine-readable word:

    - "timeout": an operation took longer than `TransferConfig.timeout_s` (or the caller's timeout)
    - "peer_gone": the other side disconnected or its endpoint failed
    - "bad_header": a malformed header, a payload of the wrong size, or a range that was not expected
    - "incompatible": the two sides' KV layouts differ (see `KVIncompatible`)
    - "cancelled": the request was cancelled or the receiver closed
    """

    def __init__(self, reason: Reason, message: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown TransferError reason {reason!r}; expected one of {REASONS}")
        self.reason: Reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}" if message else reason)


class KVIncompatible(TransferError):
    """The prefill and decode sides disagree on the KV layout (model, dtype or shape)."""

    def __init__(self, message: str) -> None:
        super().__init__("incompatible", message)
