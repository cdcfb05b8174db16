"""IncrementalDetokenizer: text deltas token by token, no broken UTF-8, stop strings never leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = "Héllo wörld — 日本語 🙂 done. The cat sat on the mat. STOP here and more"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


def feed(detok: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(detok.add(ids[i : i + step]))
        if detok.stopped:
            break
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("step", [1, 3])
def test_deltas_add_up_to_the_full_decode_without_replacement_characters(tokenizer: Tokenizer, step: int) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the text really splits characters across tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = feed(detok, ids, step)
    assert "".join(deltas) == TEXT == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.stopped


def test_an_output_that_ends_inside_a_character_ends_as_its_whole_decode_does(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer)
    deltas = feed(detok, ids[:cut])
    assert "".join(deltas) == tokenizer.decode(ids[:cut]) == detok.text  # the replacement character included
    assert "\ufffd" not in "".join(deltas[:-1])  # only the end, once the output is over
    stopped = IncrementalDetokenizer(tokenizer, stop=("zzz",))
    assert "".join(feed(stopped, ids[:cut])) == tokenizer.decode(ids[:cut])


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    bos = tokenizer.encode("x")[0]
    ids = tokenizer.encode("hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(feed(detok, [bos, *ids])) == "hello"


def test_stop_string_truncates_and_is_never_sent(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("STOP",))
    deltas = feed(detok, ids)
    expected = TEXT[: TEXT.index("STOP")]
    assert detok.stopped
    assert detok.text == expected == "".join(deltas)
    # "STOP" spans several tokens: no delta may carry a piece of it ahead of the stop.
    assert not any(d.rstrip().endswith(("S", "ST", "STO")) for d in deltas[:-1])
    assert detok.add(tokenizer.encode(" more", add_special_tokens=False)) == ""


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("STOP", "cat", "zzz"))
    feed(detok, ids, step=5)
    assert detok.stopped and detok.text == TEXT[: TEXT.index("cat")]


def test_stop_string_inside_one_token_and_at_the_very_start(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("tw",))
    feed(detok, ids)
    assert detok.stopped and detok.text == "one "
    detok = IncrementalDetokenizer(tokenizer, ("one",))
    assert feed(detok, ids) == [""]
    assert detok.stopped and detok.text == ""


def test_text_that_might_start_a_stop_string_is_held_until_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abc STO", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, ("STOP",))
    sent = "".join(detok.add([i]) for i in ids)
    assert not detok.stopped
    assert not sent.endswith("STO")
    assert sent + detok.flush() == "abc STO"


def test_stop_strings_count_only_after_min_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("cat sat cat sat cat end", add_special_tokens=False)
    early = IncrementalDetokenizer(tokenizer, ("sat",))
    assert "".join(feed(early, ids)) == "cat "
    first_sat = next(n for n in range(1, len(ids) + 1) if "sat" in tokenizer.decode(ids[:n]))
    late = IncrementalDetokenizer(tokenizer, ("sat",), min_tokens=first_sat + 1)
    assert "".join(feed(late, ids)) == "cat sat cat "
