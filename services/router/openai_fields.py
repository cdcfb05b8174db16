"""The request fields a model does not declare, and the error that names a field.

No field is dropped silently: a field that would change the output and that pdserve does not implement (structured
output, beam search, tool calling, ...) is refused by name unless it holds its "off" value; any other unknown field
is harmless, accepted and logged once per name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from services.engine.errors import InvalidRequest

log = logging.getLogger(__name__)


class RequestError(InvalidRequest):
    """An InvalidRequest about one request field, which the error body names as its `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _off(*values: Any) -> Callable[[Any], bool]:
    """Whether a value is one of `values` with the same JSON type (so true is not 1 and 1.5 is not 1)."""
    return lambda v: any(type(v) is type(o) and v == o for o in values)


_NONE = _off(None)
_FALSE = _off(None, False)
_ONE = _off(None, 1, 1.0)

# Fields pdserve does not implement, by name, with the test for their "off" value (accepted, as if left out).
REFUSED_COMMON: dict[str, Callable[[Any], bool]] = {
    "best_of": _off(None, 1),
    "use_beam_search": _FALSE,
    "length_penalty": _ONE,
    "early_stopping": _FALSE,
    "typical_p": _ONE,
    "bad_words": _off(None, []),
    "allowed_token_ids": _NONE,
    "logits_processors": _off(None, []),
    "truncate_prompt_tokens": _NONE,
    "include_stop_str_in_output": _FALSE,
    "skip_special_tokens": _off(None, True),
    "spaces_between_special_tokens": _off(None, True),
    "response_format": _off(None, {"type": "text"}),
    "structured_outputs": _off(None, {}),
    "guided_json": _NONE,
    "guided_regex": _NONE,
    "guided_choice": _NONE,
    "guided_grammar": _NONE,
    "return_tokens_as_token_ids": _FALSE,
    "return_token_ids": _FALSE,
    "vllm_xargs": _off(None, {}),
    "cache_salt": _NONE,  # a promise of cache isolation pdserve cannot keep
}
REFUSED_COMPLETION = {**REFUSED_COMMON, "suffix": _off(None, ""), "prompt_embeds": _NONE}
REFUSED_CHAT = {
    **REFUSED_COMMON,
    "echo": _FALSE,
    "chat_template": _NONE,
    "functions": _off(None, []),
    "function_call": _off(None, "none"),
    "prediction": _NONE,
    "reasoning_effort": _NONE,
    "audio": _NONE,
    "modalities": _off(None, ["text"]),
    "web_search_options": _NONE,
}
REFUSED_TOKENIZE = {"chat_template": _NONE, "return_token_strs": _FALSE}

_ignored_logged: set[str] = set()  # unknown field names already logged


def check_extra_fields(model: BaseModel, refused: Mapping[str, Callable[[Any], bool]], prefix: str = "") -> None:
    """Refuses, by name, the fields of `refused` a request sets to something other than their off value; logs
    (once per name) the other fields the model does not declare, which are harmless and ignored."""
    extra = model.model_extra or {}
    bad = [name for name, is_off in refused.items() if name in extra and not is_off(extra[name])]
    if bad:
        value = repr(extra[bad[0]])
        value = value if len(value) <= 80 else value[:77] + "..."
        raise RequestError(
            f"unsupported parameter(s): {', '.join(bad)} (pdserve does not implement them; got {bad[0]}={value}; "
            "leave them out or send their default)",
            param=bad[0],
        )
    for name in extra:
        qualified = prefix + name
        if name not in refused and qualified not in _ignored_logged:
            _ignored_logged.add(qualified)
            log.warning("ignoring the unknown request field %r (pdserve does not use it)", qualified)
