"""Errors raised by the KV hand-off (sender and receiver halves)."""

from __future__ import annotations

from typing import Literal, get_args

# Every value of TransferError.reason: the one list, which the other modules import.
Reason = Literal["timeout", "peer_gone", "bad_header", "incompatible", "cancelled"]
REASONS: tuple[Reason, ...] = get_args(Reason)
# The reasons a failed hand-off is counted under (the metrics' reason label). A cancellation the router did not
# ask for means the other side went away, so it is counted as "peer_gone".
FAILURE_REASONS: tuple[Reason, ...] = tuple(r for r in REASONS if r != "cancelled")


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
