"""One /metrics for several workers: counters and histograms from prometheus-client's
multiprocess files, and the values read at scrape time gathered from every worker and summed.

- `relay_requests`, the histograms and every other metric object relay increments are written
  by each worker to its own files in `PROMETHEUS_MULTIPROC_DIR` (the supervisor's run
  directory) and summed by `MultiProcessCollector`. A dead worker's counts stay in the files,
  so the sums never go down when a worker is replaced.
- What relay reads at scrape time (streams in flight, the upstream pool, downloads, the
  cache's counters and size, the process) lives in each worker's memory: the scraped worker
  asks every peer for its own values (`relay.net.peers`, as JSON) and adds them to its own.
  Summed, except the families in `SERVER_WIDE` (a value every worker reports for the whole
  server: the largest is taken), the process start time (the earliest) and a mirror's
  `relay_upstream_mirror_up` and `relay_ready` (the smallest: each worker keeps its own
  passive health, and reports its own readiness). A
  peer that does not answer in time is left out of that scrape (its gauges only;
  `relay_scrape_peers_missing` says how many).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SERVER_WIDE = frozenset(
    {
        "relay_max_downloads",
        "relay_max_streams",
        "relay_cache_max_bytes",
        "relay_cache_size_bytes",
        "relay_cache_objects",
        "relay_cache_max_background_fills",
        "process_max_fds",
    }
)
"""Families each worker reports for the whole server (the same limit, one shared store)."""
EARLIEST = frozenset({"process_start_time_seconds"})
LEAST = frozenset({"relay_upstream_mirror_up", "relay_ready"})
"""Families whose smallest value speaks for the server: each worker keeps its own passive
health, and a mirror counts as up only while no worker rests it; the server is ready only
while every worker answers ready."""

Family = dict[str, Any]
"""A metric family as JSON: name, documentation, type, unit, samples [[name, labels, value]]."""


def families_json(registry: CollectorRegistry) -> list[Family]:
    """This worker's scrape-time families, for a peer to merge."""
    return [
        {
            "name": family.name,
            "documentation": family.documentation,
            "type": family.type,
            "unit": family.unit,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in registry.collect()
    ]


def merge(workers: Iterable[list[Family]]) -> list[Metric]:
    """The families of every worker, one family per name, samples combined by name and labels."""
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in workers:
        for family in families:
            name = family["name"]
            if name not in merged:
                merged[name] = (family, {})
            values = merged[name][1]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                elif name in SERVER_WIDE:
                    values[key] = max(values[key], value)
                elif name in EARLIEST or name in LEAST:
                    values[key] = min(values[key], value)
                else:
                    values[key] += value
    out = []
    for name, (family, values) in merged.items():
        metric = Metric(name, family["documentation"], family["type"], family["unit"])
        for (sample_name, labels), value in values.items():
            metric.add_sample(sample_name, dict(labels), value)
        out.append(metric)
    return out


class Fixed(Collector):
    """Families gathered for one scrape, exposed through a registry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def peers_missing(count: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "relay_scrape_peers_missing",
        "Workers that did not answer this scrape in time: their gauges are left out of it.",
        value=count,
    )
