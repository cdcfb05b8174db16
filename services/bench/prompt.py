"""Turns a conversation's turn, plus the replies so far, into one request in every form a target may send."""

from __future__ import annotations

from dataclasses import dataclass

from services.bench.datasets import Conversation


@dataclass(frozen=True)
class Reply:
    """What came back for one turn: its text, and its token ids where the target reports them (gRPC)."""

    text: str
    ids: tuple[int, ...] | None


@dataclass(frozen=True)
class BenchRequest:
    """One request's input. `token_ids` is set when every part of the history has ids, `text` and `messages`
    when every part has text; a target sends the form it prefers and fails clearly when none fits."""

    token_ids: list[int] | None
    text: str | None
    messages: list[dict[str, str]] | None
    expected_prompt_tokens: int
    max_tokens: int


def build_request(conversation: Conversation, turn: int, replies: list[Reply]) -> BenchRequest:
    """The prompt for `conversation.turns[turn]`: system prompt, then user/assistant pairs, then the new user turn."""
    if len(replies) != turn:
        raise ValueError(f"turn {turn} needs {turn} earlier replies, got {len(replies)}")
    ids: list[int] | None = []
    texts: list[str] | None = []
    messages: list[dict[str, str]] = []
    expected = 0

    def add(part_ids: tuple[int, ...] | None, text: str | None, role: str, num_tokens: int) -> None:
        nonlocal ids, texts, expected
        ids = ids + list(part_ids) if ids is not None and part_ids is not None else None
        texts = texts + [text] if texts is not None and text is not None else None
        if text is not None:
            messages.append({"role": role, "content": text})
        expected += num_tokens

    if conversation.system is not None:
        s = conversation.system
        add(s.ids, s.text, "system", s.num_tokens)
    for k in range(turn + 1):
        user = conversation.turns[k].user
        add(user.ids, user.text, "user", user.num_tokens)
        if k < turn:
            reply = replies[k]
            add(reply.ids, reply.text, "assistant", len(reply.ids) if reply.ids is not None else 0)
    return BenchRequest(
        token_ids=ids,
        text="\n".join(texts) if texts is not None else None,
        messages=messages if texts is not None else None,
        expected_prompt_tokens=expected,
        max_tokens=conversation.turns[turn].output_len,
    )
