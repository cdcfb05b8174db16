"""services.router.json_body: the HTTP server's JSON parsing refuses what would otherwise be a 500."""

from __future__ import annotations

import json
import time

import pytest

from services.router.http_errors import HttpError
from services.router.json_body import MAX_JSON_DEPTH, parse_json_object


def _nested(depth: int) -> bytes:
    """An object whose "x" holds lists nested so that the whole body is `depth` levels deep."""
    inner = depth - 1
    return b'{"x": ' + b"[" * inner + b"]" * inner + b"}"


def _refused(body: bytes) -> str:
    with pytest.raises(HttpError) as err:
        parse_json_object(body)
    assert err.value.status == 400 and err.value.code == "invalid_json"
    return err.value.message


def test_a_plain_object_parses() -> None:
    assert parse_json_object(b'{"prompt": "h\\u00e9llo \\ud83d\\ude00", "n": [1, {"a": null}]}') == {
        "prompt": "h\u00e9llo \U0001f600", "n": [1, {"a": None}]}


@pytest.mark.parametrize("depth", [100_000, 5_000, MAX_JSON_DEPTH + 1])
def test_deep_nesting_is_refused(depth: int) -> None:
    assert "nested too deeply" in _refused(_nested(depth))


def test_nesting_up_to_the_limit_parses() -> None:
    assert "x" in parse_json_object(_nested(MAX_JSON_DEPTH))


@pytest.mark.parametrize("body", [
    b'{"prompt": "\\ud800"}',
    b'{"prompt": ["ok", "\\udfff x"]}',
    b'{"\\ud83d": 1}',
    b'{"messages": [{"content": [{"text": "a\\udc00"}]}]}',
])
def test_lone_surrogates_are_refused(body: bytes) -> None:
    assert "surrogate" in _refused(body)


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"prompt": "\xff"}', "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
])
def test_other_bad_bodies_are_refused(body: bytes, needle: str) -> None:
    assert needle in _refused(body)


def test_a_large_flat_body_is_checked_quickly() -> None:
    body = json.dumps({"prompt": list(range(500_000)), "stop": ["x"] * 1000}).encode()
    started = time.monotonic()
    assert len(parse_json_object(body)["prompt"]) == 500_000
    assert time.monotonic() - started < 2.0
