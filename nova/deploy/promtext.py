"""Merging Prometheus text from several processes into one exposition (no Ray).

Each replica's ``/metrics`` text gets a ``replica`` label on every sample; families of the same
name from different replicas become one family (one HELP/TYPE block), as Prometheus requires.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


def relabel(text: str, **labels: str) -> list[Metric]:
    """The families of exposition ``text`` with ``labels`` added to every sample (a sample's own
    label of the same name wins)."""
    out = []
    for fam in text_string_to_metric_families(text):
        m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        for s in fam.samples:
            m.add_sample(s.name, {**labels, **s.labels}, s.value, s.timestamp, s.exemplar)
        out.append(m)
    return out


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(groups: Iterable[list[Metric]]) -> bytes:
    """One exposition of all ``groups``' families; same-named families are joined (the first
    group's HELP and TYPE are kept)."""
    by_name: dict[str, Metric] = {}
    for families in groups:
        for fam in families:
            if fam.name in by_name:
                by_name[fam.name].samples.extend(fam.samples)
            else:
                joined = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                joined.samples = list(fam.samples)
                by_name[fam.name] = joined
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(by_name.values())))
    return generate_latest(registry)
