"""Errors the engine raises for bad input or lack of room, mapped to gRPC/HTTP codes by the router."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request itself is wrong (INVALID_ARGUMENT / HTTP 400)."""


class ResourceExhausted(RuntimeError):
    """No room for the request right now (RESOURCE_EXHAUSTED / HTTP 429)."""


class UnsupportedModel(ValueError):
    """The model directory is not one the engine can run."""
