"""services.router.metrics (and metric_specs): stats records in, Prometheus exposition out, checked by promtool."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.engine.stats import FinishedRequestStats, RequestTimes, TransferStats, WorkerStats
from services.router.metric_specs import (
    HISTOGRAM_NAMES,
    METRIC_NAMES,
    REQUEST_FAILURE_REASONS,
    TRANSFER_FAILURE_REASONS,
    TTFT_BUCKETS,
    MetricSpec,
)
from services.router.metrics import Metrics, stage_durations

MODEL = "tiny-llama"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered exposition, keyed by (sample name, label set)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset({"model_name": MODEL, **labels}.items())))


def bucket(metrics: Metrics, name: str, le: float, **labels: str) -> float | None:
    """The cumulative count of histogram `name` at upper bound `le` (compared as a float)."""
    want = {"model_name": MODEL, **labels}
    for (sample, lbl), v in samples(metrics).items():
        got = dict(lbl)
        if sample == name + "_bucket" and float(got.pop("le")) == le and got == want:
            return v
    return None


def disagg_request(reason: str = "stop", gen: int = 5) -> FinishedRequestStats:
    # arrival 0, dispatched .1, prefill_done .3, kv_ready .35, decode_start .4, first token .3, finished .7
    times = RequestTimes(arrival=0.0, dispatched=0.1, prefill_done=0.3, kv_ready=0.35, decode_start=0.4,
                         first_token=0.3, finished=0.7)
    return FinishedRequestStats(finish_reason=reason, prompt_tokens=12, generation_tokens=gen,
                                cached_tokens=4, times=times)


def worker(name: str = "prefill-0", role: str = "prefill", **kw: int) -> WorkerStats:
    return WorkerStats(worker=name, role=role, **kw)


def test_full_flow_is_promtool_clean_and_has_expected_values(promtool: Path) -> None:
    m = Metrics(model_name=MODEL, slo_ttft_ms=500, slo_tpot_ms=200)
    m.update_worker(worker(num_running=3, num_waiting=2, num_free_blocks=25, num_total_blocks=100,
                           queued_prefill_tokens=640, prefix_cache_queries_delta=100,
                           prefix_cache_hits_delta=40, num_preemptions_delta=1))
    m.update_worker(worker("decode-0", "decode", num_running=7, num_waiting_for_remote_kv=2,
                           num_free_blocks=90, num_total_blocks=100, kv_reservations_expired_delta=3))
    m.observe_first_token(0.3)
    m.observe_generated_tokens(1)
    m.observe_token_gap(0.02)
    m.observe_token_gap(0.04)
    m.observe_generated_tokens(4)
    m.observe_finished(disagg_request())
    m.observe_failure("invalid_request")
    m.observe_transfer(TransferStats(seconds=0.004, num_bytes=3 << 20, transport="tcp"))
    m.observe_transfer(TransferStats(seconds=1.0, num_bytes=0, failure_reason="peer_gone"))
    m.record_disagg_decision("remote_prefill")
    m.record_disagg_decision("remote_prefill")
    m.record_disagg_decision("local_prefill")

    text = m.render()
    check = subprocess.run([str(promtool), "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr).decode()
    _check_worker_series(m)
    _check_request_series(m)
    _check_transfer_series(m)


def _check_worker_series(m: Metrics) -> None:
    p = {"role": "prefill", "worker": "prefill-0"}
    d = {"role": "decode", "worker": "decode-0"}
    assert value(m, "pdserve_worker_up", **p) == 1.0
    assert value(m, "pdserve_num_requests_running", **p) == 3.0
    assert value(m, "pdserve_num_requests_waiting", **p) == 2.0
    assert value(m, "pdserve_queued_prefill_tokens", **p) == 640.0
    assert value(m, "pdserve_kv_cache_usage_perc", **p) == pytest.approx(0.75)
    assert value(m, "pdserve_prefix_cache_queries_total", **p) == 100.0
    assert value(m, "pdserve_prefix_cache_hits_total", **p) == 40.0
    assert value(m, "pdserve_num_preemptions_total", **p) == 1.0
    assert value(m, "pdserve_num_requests_running", **d) == 7.0
    assert value(m, "pdserve_num_requests_waiting_for_remote_kv", **d) == 2.0
    assert value(m, "pdserve_kv_cache_usage_perc", **d) == pytest.approx(0.10)
    assert value(m, "pdserve_kv_reservations_expired_total", **d) == 3.0


def _check_request_series(m: Metrics) -> None:
    assert value(m, "pdserve_time_to_first_token_seconds_count") == 1.0
    assert bucket(m, "pdserve_time_to_first_token_seconds", 0.25) == 0.0
    assert bucket(m, "pdserve_time_to_first_token_seconds", 0.5) == 1.0
    assert value(m, "pdserve_inter_token_latency_seconds_count") == 2.0
    assert value(m, "pdserve_inter_token_latency_seconds_sum") == pytest.approx(0.06)
    assert value(m, "pdserve_e2e_request_latency_seconds_sum") == pytest.approx(0.7)
    assert value(m, "pdserve_request_queue_time_seconds_sum") == pytest.approx(0.1)
    assert value(m, "pdserve_request_prefill_time_seconds_sum") == pytest.approx(0.2)
    assert value(m, "pdserve_request_decode_time_seconds_sum") == pytest.approx(0.3)
    assert value(m, "pdserve_request_time_per_output_token_seconds_sum") == pytest.approx(0.1)  # 0.4 s / 4
    for stage, seconds in {"queue": 0.1, "prefill": 0.2, "transfer": 0.05, "decode_queue": 0.05,
                           "decode": 0.3}.items():
        assert value(m, "pdserve_request_stage_seconds_sum", stage=stage) == pytest.approx(seconds), stage
        assert value(m, "pdserve_request_stage_seconds_count", stage=stage) == 1.0, stage
    assert value(m, "pdserve_prompt_tokens_total") == 12.0
    assert value(m, "pdserve_prompt_tokens_cached_total") == 4.0
    assert value(m, "pdserve_generation_tokens_total") == 5.0
    assert value(m, "pdserve_request_failures_total", reason="invalid_request") == 1.0
    assert value(m, "pdserve_request_failures_total", reason="worker_failed") == 0.0
    assert value(m, "pdserve_request_success_total", finished_reason="stop") == 1.0
    assert value(m, "pdserve_request_success_total", finished_reason="abort") == 0.0
    assert value(m, "pdserve_requests_finished_total") == 1.0
    assert value(m, "pdserve_requests_slo_met_total") == 1.0
    assert value(m, "pdserve_slo_target_seconds", slo="ttft") == pytest.approx(0.5)


def _check_transfer_series(m: Metrics) -> None:
    tcp = {"transport": "tcp"}
    assert value(m, "pdserve_kv_transfer_seconds_count", **tcp) == 1.0  # the failure is not a transfer time
    assert value(m, "pdserve_kv_transfer_bytes_sum", **tcp) == float(3 << 20)
    assert bucket(m, "pdserve_kv_transfer_bytes", 4 << 20, **tcp) == 1.0
    assert bucket(m, "pdserve_kv_transfer_bytes", 1 << 20, **tcp) == 0.0
    assert value(m, "pdserve_kv_transfer_failures_total", reason="peer_gone") == 1.0
    assert value(m, "pdserve_kv_transfer_failures_total", reason="timeout") == 0.0
    assert value(m, "pdserve_disagg_decisions_total", decision="remote_prefill") == 2.0
    assert value(m, "pdserve_disagg_decisions_total", decision="local_prefill") == 1.0


def test_every_declared_family_is_exported_and_nothing_else() -> None:
    m = Metrics(model_name=MODEL, slo_ttft_ms=100, slo_tpot_ms=100)
    m.update_worker(worker())
    types: dict[str, str] = {}
    for line in m.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    declared = {name: kind for name, kind in types.items() if not name.endswith("_created")}
    assert set(declared) == set(METRIC_NAMES)
    assert {name for name, kind in declared.items() if kind == "histogram"} == set(HISTOGRAM_NAMES)
    assert all(name.endswith("_total") for name, kind in declared.items() if kind == "counter")
    assert all(name.startswith("pdserve_") for name in METRIC_NAMES)


def test_transfer_failure_reasons_are_the_transfer_layers() -> None:
    """metric_specs writes the list out (importing services.transfer would pull in torch): it must stay the same."""
    from services.transfer.errors import FAILURE_REASONS

    assert TRANSFER_FAILURE_REASONS == FAILURE_REASONS


def test_metric_specs_import_no_heavy_modules() -> None:
    code = ("import sys; import services.router.metric_specs; "
            "heavy = [m for m in ('torch', 'ray', 'prometheus_client') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


def test_ttft_buckets_are_vllms() -> None:
    m = Metrics(model_name=MODEL)
    les = [float(dict(lbl)["le"]) for (name, lbl) in samples(m)
           if name == "pdserve_time_to_first_token_seconds_bucket"]
    assert sorted(les) == [*TTFT_BUCKETS, math.inf]


def test_worker_deltas_accumulate_and_gauges_are_replaced() -> None:
    m = Metrics(model_name=MODEL)
    m.update_worker(worker(num_running=4, prefix_cache_queries_delta=10, prefix_cache_hits_delta=5))
    m.update_worker(worker(num_running=1, prefix_cache_queries_delta=7, prefix_cache_hits_delta=0))
    labels = {"role": "prefill", "worker": "prefill-0"}
    assert value(m, "pdserve_num_requests_running", **labels) == 1.0
    assert value(m, "pdserve_prefix_cache_queries_total", **labels) == 17.0
    assert value(m, "pdserve_prefix_cache_hits_total", **labels) == 5.0


def test_worker_down_then_removed() -> None:
    m = Metrics(model_name=MODEL)
    m.update_worker(worker("decode-1", "decode", num_running=2, num_preemptions_delta=4))
    labels = {"role": "decode", "worker": "decode-1"}

    m.mark_worker_down("decode-1", "decode")
    assert value(m, "pdserve_worker_up", **labels) == 0.0
    assert value(m, "pdserve_num_requests_running", **labels) is None  # stale gauge dropped
    assert value(m, "pdserve_num_preemptions_total", **labels) == 4.0  # counters kept

    m.update_worker(worker("decode-1", "decode", num_running=1))
    assert value(m, "pdserve_worker_up", **labels) == 1.0

    m.remove_worker("decode-1", "decode")
    left = [key for key in samples(m) if ("worker", "decode-1") in key[1]]
    assert left == []
    m.remove_worker("decode-1", "decode")  # removing twice is harmless


def test_worker_changing_role_drops_its_old_series() -> None:
    m = Metrics(model_name=MODEL)
    m.update_worker(worker("w0", "prefill", num_running=1))
    m.update_worker(worker("w0", "decode", num_running=2))
    assert value(m, "pdserve_num_requests_running", role="prefill", worker="w0") is None
    assert value(m, "pdserve_num_requests_running", role="decode", worker="w0") == 2.0


def test_slo_violations_and_goodput() -> None:
    m = Metrics(model_name=MODEL, slo_ttft_ms=200, slo_tpot_ms=50)
    m.observe_finished(disagg_request())  # ttft 0.3 > 0.2, tpot 0.1 > 0.05
    m.observe_finished(disagg_request(gen=1))  # ttft over, no tpot
    fast = FinishedRequestStats("length", 4, 3, 0, RequestTimes(arrival=0.0, first_token=0.1, finished=0.15))
    m.observe_finished(fast)  # ttft 0.1, tpot 0.025: met
    m.observe_finished(FinishedRequestStats("abort", 4, 3, 0, fast.times))  # fast but aborted: not met
    m.observe_finished(FinishedRequestStats("error", 4, 0, 0, RequestTimes(arrival=0.0, finished=1.0)))
    assert value(m, "pdserve_requests_finished_total") == 5.0
    assert value(m, "pdserve_requests_slo_met_total") == 1.0
    assert value(m, "pdserve_requests_slo_violations_total", slo="ttft") == 3.0  # two slow, one never started
    assert value(m, "pdserve_requests_slo_violations_total", slo="tpot") == 1.0
    assert value(m, "pdserve_request_success_total", finished_reason="error") == 1.0


def test_generation_tokens_count_when_streamed_not_when_finished() -> None:
    m = Metrics(model_name=MODEL)
    m.observe_generated_tokens(3)
    assert value(m, "pdserve_generation_tokens_total") == 3.0
    m.observe_finished(disagg_request(gen=3))
    assert value(m, "pdserve_generation_tokens_total") == 3.0  # not again
    m.observe_generated_tokens(0)
    assert value(m, "pdserve_generation_tokens_total") == 3.0


def test_every_request_failure_reason_is_exported_at_zero() -> None:
    m = Metrics(model_name=MODEL)
    for reason in REQUEST_FAILURE_REASONS:
        assert value(m, "pdserve_request_failures_total", reason=reason) == 0.0, reason
        m.observe_failure(reason)
        assert value(m, "pdserve_request_failures_total", reason=reason) == 1.0, reason


def test_without_slo_nothing_counts_as_met() -> None:
    m = Metrics(model_name=MODEL)
    m.observe_finished(disagg_request())
    assert value(m, "pdserve_requests_slo_met_total") is None
    assert value(m, "pdserve_slo_target_seconds", slo="ttft") is None
    assert value(m, "pdserve_requests_finished_total") == 1.0


def test_stage_breakdown_without_transfer() -> None:
    colocated = FinishedRequestStats("stop", 8, 4, 0, RequestTimes(
        arrival=1.0, dispatched=1.5, prefill_done=2.0, decode_start=2.25, first_token=2.0, finished=3.0))
    stages = stage_durations(colocated)
    assert stages == pytest.approx({"queue": 0.5, "prefill": 0.5, "decode_queue": 0.25, "decode": 0.75})
    assert sum(stages.values()) == pytest.approx(colocated.e2e)
    queued_abort = FinishedRequestStats("abort", 8, 0, 0, RequestTimes(arrival=1.0, finished=4.0))
    assert stage_durations(queued_abort) == {}


def test_independent_instances_have_their_own_registries() -> None:
    a, b = Metrics(model_name=MODEL), Metrics(model_name=MODEL)
    a.record_disagg_decision("local_prefill")
    assert value(a, "pdserve_disagg_decisions_total", decision="local_prefill") == 1.0
    assert value(b, "pdserve_disagg_decisions_total", decision="local_prefill") == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda m: m.update_worker(worker(role="mixed")), "unknown role 'mixed'"),
    (lambda m: m.update_worker(worker(name="")), "worker name must be non-empty"),
    (lambda m: m.mark_worker_down("", "decode"), "worker name must be non-empty"),
    (lambda m: m.update_worker(worker(num_preemptions_delta=-1)), "non-negative"),
    (lambda m: m.update_worker(worker(num_free_blocks=5, num_total_blocks=4)), "free blocks"),
    (lambda m: m.mark_worker_down("w", "router"), "unknown role"),
    (lambda m: m.remove_worker("w", ""), "unknown role"),
    (lambda m: m.observe_first_token(-0.1), "ttft_s must be a non-negative"),
    (lambda m: m.observe_token_gap(float("nan")), "itl_s must be a non-negative"),
    (lambda m: m.observe_finished(disagg_request(reason="done")), "unknown finish_reason 'done'"),
    (lambda m: m.observe_finished(FinishedRequestStats("stop", 2, 1, 3, RequestTimes(arrival=0.0))),
     "cached_tokens 3 > prompt_tokens 2"),
    (lambda m: m.observe_finished(FinishedRequestStats("stop", 2, 1, 0, RequestTimes(5.0, dispatched=4.0))),
     "out of order"),
    (lambda m: m.observe_transfer(TransferStats(0.1, 10, failure_reason="cosmic_ray")),
     "transfer failure reason"),
    (lambda m: m.observe_transfer(TransferStats(-1.0, 10)), "TransferStats.seconds"),
    (lambda m: m.observe_transfer(TransferStats(0.1, -10)), "num_bytes"),
    (lambda m: m.record_disagg_decision("remote"), "unknown disagg decision 'remote'"),
    (lambda m: m.observe_failure("oops"), "unknown request failure reason 'oops'"),
    (lambda m: m.observe_generated_tokens(-1), "count must be non-negative"),
])
def test_bad_input_is_rejected_clearly_and_records_nothing(call, message: str) -> None:  # noqa: ANN001
    m = Metrics(model_name=MODEL)
    before = samples(m)
    with pytest.raises(ValueError, match=message):
        call(m)
    after = {k: v for k, v in samples(m).items() if not k[0].endswith("_created")}
    assert after == {k: v for k, v in before.items() if not k[0].endswith("_created")}


@pytest.mark.parametrize("kwargs", [{"slo_ttft_ms": 0}, {"slo_tpot_ms": -5.0}])
def test_bad_slo_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive number of milliseconds"):
        Metrics(**kwargs)


@pytest.mark.parametrize("spec, message", [
    (lambda: MetricSpec("vllm_requests_total", "counter", "h", ("model_name",)), "must start with"),
    (lambda: MetricSpec("pdserve_requests", "counter", "h", ("model_name",)), "only counters end in '_total'"),
    (lambda: MetricSpec("pdserve_up_total", "gauge", "h", ("model_name",)), "only counters end in '_total'"),
    (lambda: MetricSpec("pdserve_seconds", "histogram", "h", ("model_name",)), "required there"),
    (lambda: MetricSpec("pdserve_up", "gauge", "h", ("model_name",), (1.0,)), "histograms only"),
    (lambda: MetricSpec("pdserve_seconds", "histogram", "h", ("model_name",), (1.0, 1.0)), "strictly increasing"),
])
def test_metric_spec_rejects_a_malformed_family(spec, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        spec()
