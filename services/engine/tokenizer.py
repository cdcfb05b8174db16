"""The model's tokenizer (tokenizer.json through the `tokenizers` library) and its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from services.engine.chat_template import ChatTemplates


class Tokenizer:
    def __init__(self, model_dir: str | Path, chat_template: str | Path | None = None) -> None:
        """`chat_template` (the operator's --chat-template: a file, or the template itself) replaces the model's."""
        path = Path(model_dir)
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.chat_templates = ChatTemplates.load(path, self.config, chat_template)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template's source, if the model has one."""
        return self.chat_templates.default

    def _token_text(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def bos_token(self) -> str | None:
        return self._token_text("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._token_text("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Renders messages with the model's chat template, as transformers' apply_chat_template(tokenize=False)
        does. `chat_template_kwargs` are extra template variables. Raises ChatTemplateError (a ValueError)."""
        return self.chat_templates.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            variables=chat_template_kwargs,
        )


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas and applies stop strings.

    Decodes only a window of recent tokens per step (prefix_offset..), and holds back text
    while it might be the start of a stop string or an incomplete UTF-8 sequence, so a client
    never sees a partial stop string or a replacement character. As in vLLM, stop strings count
    only in text that comes once min_tokens tokens have been added.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def add(self, new_ids: list[int]) -> str:
        """Appends tokens; returns the text now safe to send. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        if not self._read(complete_only=True):
            return ""
        if self.stopped:
            return self.flush()
        end = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def flush(self) -> str:
        """The held-back rest of the text, once the request has finished. An output that ends inside a UTF-8
        sequence ends with decode()'s replacement character for it, as the whole output's decode does."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._read(complete_only=False)
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def _read(self, complete_only: bool) -> bool:
        """Appends the text of the tokens not read yet and applies the stop strings; with `complete_only`, takes
        nothing (False) while that text ends inside a UTF-8 sequence."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if complete_only and full.endswith("\ufffd"):
            return False
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop and len(self.ids) >= self.min_tokens:
            start = max(0, before - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        return True
