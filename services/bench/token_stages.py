"""The per-token path of a pdserve target during a run: the median of each stage of pdserve_token_stage_seconds
(engine step, worker to router, router, router to client; see services/router/output.py), from two scrapes of the
router's /metrics, before and after, so that only the run's own tokens count.

The median is read from the histogram's buckets as Prometheus's histogram_quantile reads them: linear within the
bucket that holds it.
"""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILY = "pdserve_token_stage_seconds"
Buckets = dict[str, dict[float, float]]  # by stage: cumulative count by upper bound


async def scrape(url: str) -> Buckets:
    """The stage histograms on `url` (a pdserve router's /metrics); empty when it has none, as a server that is
    not pdserve (no /metrics, or other metrics) has none."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    if response.status_code != 200:
        return {}
    try:
        families = list(text_string_to_metric_families(response.text))
    except ValueError:  # not the Prometheus text format
        return {}
    found: Buckets = {}
    for family in families:
        if family.name != FAMILY:
            continue
        for sample in family.samples:
            if sample.name == FAMILY + "_bucket":
                found.setdefault(sample.labels["stage"], {})[float(sample.labels["le"])] = sample.value
    return found


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of one cumulative histogram; None when it holds no observation."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bound: its value, as histogram_quantile gives
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def stage_medians(before: Buckets, after: Buckets) -> dict[str, float | None]:
    """Each stage's median seconds per token over what `after` holds beyond `before`."""
    medians: dict[str, float | None] = {}
    for stage, buckets in after.items():
        earlier = before.get(stage, {})
        medians[stage] = quantile(0.5, {le: count - earlier.get(le, 0.0) for le, count in buckets.items()})
    return medians
