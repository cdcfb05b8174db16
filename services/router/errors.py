"""Router-level errors, mapped to gRPC status codes and HTTP codes by the servers."""

from __future__ import annotations


class Unavailable(RuntimeError):
    """No worker can take the request now, or a hand-off failed under the "fail" policy (UNAVAILABLE / 503)."""
