"""`pdserve bench serve` without a server: datasets, prompt building, arrivals, percentile and goodput math."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from services.bench.datasets import (
    Conversation,
    LengthRange,
    Segment,
    TokenSpace,
    Turn,
    load_sharegpt,
    multi_turn_dataset,
    num_requests,
    random_dataset,
    shared_prefix_dataset,
)
from services.bench.load import LoadConfig, RunResult, arrival_times, parse_rates
from services.bench.metrics import Distribution, RequestRecord, Slo, summarize
from services.bench.prompt import Reply, build_request
from services.bench.report import result_json

SPACE = TokenSpace(1000, frozenset({0, 999}))


class CharCodec:
    """One token per character: a tokenizer whose lengths are easy to check by hand."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _record(i: int, ttft: float, e2e: float, out: int, success: bool = True) -> RequestRecord:
    return RequestRecord(i, i, 0, 0.0, 0.0, success, prompt_tokens=10, output_tokens=out,
                         expected_output_tokens=out, ttft_s=ttft, e2e_s=e2e, error=None if success else "boom")


def test_length_range_parses_and_rejects() -> None:
    assert LengthRange.parse("5") == LengthRange(5, 5)
    assert LengthRange.parse("3:9") == LengthRange(3, 9)
    for bad in ("", "a", "1:2:3", "0", "9:3", "-1:4"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)


def test_random_dataset_lengths_seed_and_excluded_ids() -> None:
    a = random_dataset(50, LengthRange(4, 9), LengthRange(2, 3), SPACE, seed=1)
    b = random_dataset(50, LengthRange(4, 9), LengthRange(2, 3), SPACE, seed=1)
    c = random_dataset(50, LengthRange(4, 9), LengthRange(2, 3), SPACE, seed=2)
    assert a == b and a != c
    for conv in a:
        (turn,) = conv.turns
        assert turn.user.ids is not None and 4 <= len(turn.user.ids) <= 9
        assert turn.user.num_tokens == len(turn.user.ids)
        assert 2 <= turn.output_len <= 3
        assert not set(turn.user.ids) & {0, 999}
        assert all(0 <= t < 1000 for t in turn.user.ids)
        assert turn.user.text is None
    lengths = {len(conv.turns[0].user.ids or ()) for conv in a}
    assert len(lengths) > 1


def test_random_dataset_decodes_text_with_a_codec() -> None:
    (conv,) = random_dataset(1, LengthRange(5, 5), LengthRange(1, 1), TokenSpace(200), seed=0, codec=CharCodec())
    user = conv.turns[0].user
    assert user.ids is not None and user.text == "".join(chr(i) for i in user.ids)


def test_token_space_rejects_a_vocabulary_with_nothing_left() -> None:
    with pytest.raises(ValueError):
        TokenSpace(2, frozenset({0, 1}))


def test_shared_prefix_groups_share_their_system_prompt() -> None:
    convs = shared_prefix_dataset(3, 4, 20, 5, LengthRange(7, 7), SPACE, seed=0)
    assert len(convs) == 12
    systems = {c.system.ids for c in convs if c.system is not None}
    assert len(systems) == 3
    assert all(len(s or ()) == 20 for s in systems)
    for system in systems:
        assert sum(1 for c in convs if c.system is not None and c.system.ids == system) == 4
    assert all(len(c.turns) == 1 and c.turns[0].user.num_tokens == 5 and c.turns[0].output_len == 7 for c in convs)
    request = build_request(convs[0], 0, [])
    assert convs[0].system is not None and request.token_ids is not None
    assert request.token_ids[:20] == list(convs[0].system.ids or ())
    assert request.expected_prompt_tokens == 25 and request.max_tokens == 7
    with pytest.raises(ValueError):
        shared_prefix_dataset(0, 4, 20, 5, LengthRange(7, 7), SPACE, seed=0)


def test_multi_turn_requests_carry_the_history() -> None:
    (conv,) = multi_turn_dataset(1, 3, LengthRange(4, 4), LengthRange(2, 2), SPACE, seed=3, codec=CharCodec())
    assert num_requests([conv]) == 3
    first = build_request(conv, 0, [])
    assert first.token_ids == list(conv.turns[0].user.ids or ())
    reply = Reply("xy", (120, 121))
    second = build_request(conv, 1, [reply])
    assert second.token_ids == [*(conv.turns[0].user.ids or ()), 120, 121, *(conv.turns[1].user.ids or ())]
    assert second.expected_prompt_tokens == 10
    assert second.messages is not None
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[1]["content"] == "xy"
    # an HTTP reply has text only: the history can still be sent as text and messages, not as token ids
    third = build_request(conv, 2, [reply, Reply("zz", None)])
    assert third.token_ids is None and third.text is not None and third.messages is not None
    assert third.text.endswith(conv.turns[2].user.text or "<missing>")
    with pytest.raises(ValueError):
        build_request(conv, 2, [reply])


def test_text_only_segments_have_no_token_form() -> None:
    conv = Conversation((Turn(Segment(3, None, "abc"), 5),))
    request = build_request(conv, 0, [])
    assert request.token_ids is None and request.text == "abc"
    assert request.messages == [{"role": "user", "content": "abc"}]
    with pytest.raises(ValueError):
        Segment(1)


def test_sharegpt_takes_first_human_turn_and_filters_to_context(tmp_path: Path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi!"}]},
        {"conversations": [{"from": "gpt", "value": "no human first"}, {"from": "human", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "q" * 60}, {"from": "gpt", "value": "a" * 60}]},  # too long
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "z"}, {"from": "gpt", "value": "too short prompt"}]},
        {"conversations": [{"from": "human", "value": "what is up"}, {"from": "gpt", "value": "the sky"}]},
        "not a dict",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    convs = load_sharegpt(path, 10, CharCodec(), max_model_len=100, seed=0)
    got = sorted((c.turns[0].user.text, c.turns[0].output_len, c.turns[0].user.num_tokens) for c in convs)
    assert got == [("hello there", 3, 11), ("what is up", 7, 10)]
    assert len(load_sharegpt(path, 1, CharCodec(), max_model_len=100, seed=0)) == 1
    fixed = load_sharegpt(path, 10, CharCodec(), max_model_len=100, seed=0, output_len=4)
    assert {c.turns[0].output_len for c in fixed} == {4}
    with pytest.raises(ValueError, match="fits"):
        load_sharegpt(path, 10, CharCodec(), max_model_len=5, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        load_sharegpt(tmp_path / "missing.json", 10, CharCodec(), 100, 0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sharegpt(tmp_path / "bad.json", 10, CharCodec(), 100, 0)
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(tmp_path / "dict.json", 10, CharCodec(), 100, 0)


def test_distribution_percentiles_known_values_and_order() -> None:
    d = Distribution.of([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d.count == 100
    assert d.mean == pytest.approx(50.5)
    assert d.median == pytest.approx(50.5)
    assert d.p90 == pytest.approx(90.1)
    assert d.p99 == pytest.approx(99.01)
    rng = random.Random(0)
    for _ in range(20):
        s = Distribution.of([rng.expovariate(3) for _ in range(rng.randint(1, 50))])
        assert s.median is not None and s.p90 is not None and s.p99 is not None
        assert s.median <= s.p90 <= s.p99
    assert Distribution.of([]).median is None


def test_tpot_definition() -> None:
    r = _record(0, ttft=0.1, e2e=1.1, out=11)
    assert r.tpot_s == pytest.approx(0.1)
    assert _record(0, ttft=0.1, e2e=0.1, out=1).tpot_s == 0.0
    assert _record(0, 0.1, 1.0, 5, success=False).tpot_s is None


def test_goodput_and_attainment() -> None:
    records = [
        _record(0, ttft=0.05, e2e=0.5, out=10),   # tpot 50 ms: meets both
        _record(1, ttft=0.30, e2e=0.75, out=10),  # ttft misses
        _record(2, ttft=0.05, e2e=1.85, out=10),  # tpot 200 ms: misses
        _record(3, ttft=0.01, e2e=0.1, out=10),   # tpot 10 ms: meets
        _record(4, ttft=0.01, e2e=0.1, out=10, success=False),  # failed: a miss, not goodput
    ]
    slo = Slo.parse(["ttft:100", "tpot:60"])
    s = summarize(records, duration_s=2.0, slo=slo)
    assert s.completed == 4 and s.failed == 1 and s.errors == {"boom": 1}
    assert s.goodput == pytest.approx(1.0)  # 2 requests met both targets in 2 s
    assert s.slo_attainment_pct == pytest.approx(40.0)
    assert s.request_throughput == pytest.approx(2.0)
    assert s.goodput <= s.request_throughput
    assert s.total_output_tokens == 40 and s.total_input_tokens == 40
    assert s.output_throughput == pytest.approx(20.0)
    assert s.total_token_throughput == pytest.approx(40.0)
    none = summarize(records, 2.0)
    assert none.goodput is None and none.slo_attainment_pct is None
    e2e_only = summarize(records, 2.0, Slo.parse(["e2el:600"]))
    assert e2e_only.slo_attainment_pct == pytest.approx(40.0)
    with pytest.raises(ValueError):
        summarize(records, 0.0)


@pytest.mark.parametrize("specs", [["ttft"], ["ttft:abc"], ["foo:10"], ["ttft:-5"], ["ttft:0"], []])
def test_slo_parse_rejects_bad_targets(specs: list[str]) -> None:
    with pytest.raises(ValueError):
        Slo.parse(specs)


def test_arrivals_and_rates() -> None:
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    times = arrival_times(4000, 20.0, seed=5)
    assert times[0] == 0.0 and times == sorted(times)
    assert times == arrival_times(4000, 20.0, seed=5)
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 20, rel=0.1)
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("0", "-1", "fast", "1,,2"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    with pytest.raises(ValueError):
        LoadConfig(request_rate=1.0, max_concurrency=0)


def test_result_json_is_strict_json_with_inf_rate() -> None:
    records = [_record(0, 0.01, 0.2, 5), _record(1, 0.02, 0.3, 5)]
    run = RunResult(LoadConfig(math.inf, 2), 1.0, records)
    payload = result_json({"request_rate": "inf"}, [(run, summarize(records, 1.0, Slo(ttft_ms=15)))])
    text = json.dumps(payload, allow_nan=False)
    back = json.loads(text)
    (entry,) = back["runs"]
    assert entry["request_rate"] == "inf" and entry["max_concurrency"] == 2
    assert entry["summary"]["goodput"] == pytest.approx(1.0)
    assert len(entry["requests"]) == 2 and entry["requests"][0]["tpot_s"] == pytest.approx(0.19 / 4)


def test_token_stage_medians_are_read_from_the_run_s_own_buckets() -> None:
    from services.bench.token_stages import quantile, stage_medians

    inf = float("inf")
    assert quantile(0.5, {0.001: 0, 0.002: 10, inf: 10}) == pytest.approx(0.0015)
    assert quantile(0.5, {0.001: 0, 0.002: 0, inf: 0}) is None
    assert quantile(0.5, {0.001: 0, inf: 4}) == 0.001  # past the last finite bound: that bound
    before = {"router": {0.001: 5, 0.002: 5, inf: 5}}
    after = {"router": {0.001: 5, 0.002: 15, inf: 15}, "engine_step": {0.01: 3, inf: 3}}
    medians = stage_medians(before, after)
    assert medians["router"] == pytest.approx(0.0015)  # the 5 earlier tokens under 1 ms do not count
    assert medians["engine_step"] == pytest.approx(0.005)
