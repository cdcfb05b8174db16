"""Finding a model's chat templates and rendering them as transformers 5 does.

Where a template comes from, first match wins (the precedence of `AutoTokenizer.from_pretrained`):

    operator override   Tokenizer(model_dir, chat_template=FILE_OR_STRING)
    template files      chat_template.jinja ("default") + additional_chat_templates/NAME.jinja
    tokenizer config    tokenizer_config.json["chat_template"]: a string, or [{"name": ..., "template": ...}]

With named templates, "tool_use" renders a request that passes tools (if there is one), "default" any other.
Rendering uses transformers' sandboxed Jinja environment: trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, its `tojson` filter and the `{% generation %}` tag. jinja2 loads on first use.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# Variables the caller's own arguments set; chat_template_kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# Names a message's reasoning comes under; templates read "reasoning_content", gpt-oss reads "thinking".
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message for continue_final_message; the render is cut where it lands.
CONTINUE_TAG = "PDSERVE_CONTINUE_FINAL_MESSAGE "


class ChatTemplateError(ValueError):
    """A chat template is missing, does not compile, or refuses the conversation (`raise_exception`)."""


@dataclass(frozen=True)
class ChatTemplates:
    """A model's chat templates by name (a lone template is named "default"), and the special tokens they see."""

    templates: Mapping[str, str]
    special_tokens: Mapping[str, str]

    @classmethod
    def load(cls, model_dir: Path, config: Mapping[str, Any], override: str | Path | None = None) -> ChatTemplates:
        """The templates of `model_dir` (whose tokenizer_config.json is `config`), or only `override` if given."""
        if override is not None:
            templates = {"default": read_override(override)}
        else:
            templates = _template_files(model_dir) or _config_templates(config)
        return cls(templates, special_tokens(model_dir, config))

    @property
    def default(self) -> str | None:
        return self.templates.get("default")

    def select(self, tools: list[Any] | None) -> str:
        """The template that renders a request with these tools (None: the request passes none)."""
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        if self.templates:
            raise ChatTemplateError(f"this model has no default chat template, only: {', '.join(self.templates)}")
        raise ChatTemplateError(
            "this model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json) "
            "and none was given to the server; a chat model needs one, there is no default template"
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The conversation as the model reads it. `variables` are extra template variables (they may replace a
        special token, not a reserved name). continue_final_message ends the text right after the final message's
        content, so that generation continues it instead of starting a new message."""
        template = self.select(tools)
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set: the first continues the final "
                "message, the second starts a new assistant message"
            )
        variables = dict(variables or {})
        if reserved := sorted(RESERVED_VARIABLES & variables.keys()):
            raise ChatTemplateError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be a list of objects")
        chat = plain_messages(messages)
        final_text = _tag_final_message(chat, template) if continue_final_message else None
        text = render_template(
            template,
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **variables},
        )
        return text if final_text is None else _cut_at_tag(text, final_text)


def read_override(value: str | Path) -> str:
    """An operator's --chat-template: the file's text if `value` names a file, else the template itself.

    Like vLLM, a string with no Jinja braces and no newline is taken for a mistyped path, not a template.
    """
    try:
        if Path(value).is_file():
            return Path(value).read_text(encoding="utf-8")
    except OSError:  # a long template string is not a valid file name
        pass
    if isinstance(value, Path) or not any(c in value for c in "{}\n"):
        raise ChatTemplateError(f"chat template {str(value)!r} is neither a file nor a Jinja template")
    return value


def special_tokens(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens a template sees, by name, as transformers passes them: the named ones (bos_token, ...)
    and the model's own `*_token` strings, from tokenizer_config.json, overridden by the legacy
    special_tokens_map.json when the config has no added_tokens_decoder."""
    values = dict(config)
    legacy = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        values.update(json.loads(legacy.read_text(encoding="utf-8")))
    extra = values.get("extra_special_tokens")
    named = dict(extra) if isinstance(extra, dict) else {}
    named |= {name: value for name, value in values.items() if name.endswith("_token")}
    tokens: dict[str, str] = {}
    for name, value in named.items():
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str):
            tokens[name] = text
    return tokens


def plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A deep copy of the messages without None-valued keys (templates take a missing key better than None),
    with the reasoning under every name templates read it by."""
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be an object, not {type(message).__name__}")
        plain = {key: copy.deepcopy(value) for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def _template_files(model_dir: Path) -> dict[str, str]:
    templates = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        templates["default"] = (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (model_dir / TEMPLATE_DIR).is_dir():
        for file in sorted((model_dir / TEMPLATE_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    return templates


def _config_templates(config: Mapping[str, Any]) -> dict[str, str]:
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError('tokenizer_config.json["chat_template"] must be a string or a list of {name, template}')


def _tag_final_message(chat: list[dict[str, Any]], template: str) -> str:
    """Appends CONTINUE_TAG to the final message's (last) text; returns that text as it was."""
    content = chat[-1].get("content")
    if content is None or "content" not in template:
        raise ChatTemplateError("continue_final_message is set but the final message has no content to continue")
    if isinstance(content, str):
        chat[-1]["content"] = content + CONTINUE_TAG
        return content
    for block in reversed(content if isinstance(content, list) else []):
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            text: str = block["text"]
            block["text"] = text + CONTINUE_TAG
            return text
    raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")


def _cut_at_tag(text: str, final_text: str) -> str:
    marker = CONTINUE_TAG.strip()
    if final_text.strip() not in text or marker not in text:
        raise ChatTemplateError(
            "continue_final_message is set but the chat template does not render the final message's content"
        )
    at = text.rindex(marker)
    # A template that trims the content also trimmed the tag's trailing space, and maybe the content's own.
    return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()


def render_template(source: str, **variables: Any) -> str:
    """Renders a chat template; every failure of the template becomes a ChatTemplateError."""
    from jinja2 import TemplateError

    try:
        return compile_template(source).render(**variables)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError) as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from e


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> Template:
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` as templates see it: a constructor without the type's attributes to climb through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.parser import Parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; serving renders it."""

        tags = {"generation"}

        def parse(self, parser: Parser) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot set the underscore name {name!r} on a namespace")

    class SafeNamespace(Namespace):
        """`namespace()` refusing underscore names, as transformers' does. (Namespace hides its own attributes.)"""

        def __init__(self, /, *args: Any, **kwargs: Any) -> None:
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check_name(name)
            super().__init__(attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            super().__setitem__(name, value)

    extensions = [GenerationBlock, loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=SafeNamespace
    )
    return env
