"""The prometheus_client families of every MetricSpec, built in one registry and looked up by name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.router.metric_specs import PREFIX, SPECS, MetricSpec

Family = Counter | Gauge | Histogram


def _build(spec: MetricSpec, registry: CollectorRegistry) -> Family:
    if spec.kind == "counter":
        # prometheus_client appends `_total` to a counter's name itself.
        return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


class Families:
    """One family per entry of SPECS. The typed getters take the name without PREFIX; `family` and
    `drop` take it whole, as SPECS spells it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_name: dict[str, Family] = {s.name: _build(s, registry) for s in SPECS}

    def family(self, name: str) -> Family:
        return self._by_name[name]

    def counter(self, name: str) -> Counter:
        family = self._by_name[PREFIX + name]
        assert isinstance(family, Counter)
        return family

    def gauge(self, name: str) -> Gauge:
        family = self._by_name[PREFIX + name]
        assert isinstance(family, Gauge)
        return family

    def histogram(self, name: str) -> Histogram:
        family = self._by_name[PREFIX + name]
        assert isinstance(family, Histogram)
        return family

    def drop(self, name: str, key: tuple[str, ...]) -> None:
        """Removes the series of family `name` with label values `key`, if it was ever created."""
        try:
            self._by_name[name].remove(*key)
        except KeyError:
            pass  # the series was never created
