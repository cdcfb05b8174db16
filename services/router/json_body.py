"""Parses an HTTP request body as a JSON object, refusing what json.loads accepts but the server must not take.

- bytes that are not UTF-8, and JSON that is not valid: the body is not JSON
- nesting deeper than MAX_JSON_DEPTH: an OpenAI request nests a few levels (a chat message's content parts, a
  tool's JSON schema); a body nested thousands deep would only exhaust the parser's recursion
- strings (keys included) holding a lone UTF-16 surrogate (`"\\ud800"`): valid JSON escapes of text that is not
  Unicode, which the tokenizer and the UTF-8 response encoder both fail on
Each is a 400 with code "invalid_json".
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.router.http_errors import HttpError

MAX_JSON_DEPTH = 64
# A surrogate can only get in through a \u escape: the UTF-8 decoder refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body's JSON object; raises HttpError(400) with a message that says what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(f"the request body is not valid UTF-8: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise _invalid(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise _invalid("the request body must be a JSON object")
    # The walk costs a Python step per value: skip it when the text shows that nothing can be wrong.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(text):
        check_json_value(data)
    return data


def check_json_value(value: Any) -> None:
    """Raises HttpError(400) when a parsed value nests deeper than MAX_JSON_DEPTH or holds a lone surrogate.

    Walks the value with an explicit stack, so a deep value cannot exhaust the interpreter's recursion here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _invalid(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise _invalid(f"the request body holds a lone UTF-16 surrogate ({bad}), which is not valid UTF-8 "
                       "text") from None


def _invalid(message: str) -> HttpError:
    return HttpError(400, message, code="invalid_json")
