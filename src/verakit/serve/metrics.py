"""Prometheus metrics of one server, in a registry of its own (so several apps in one process never clash).

Request counts and latency by endpoint (the route template, so adapter names cannot blow up the label
set) and status; batch sizes and distinct adapters per batch; and, read from the bank at scrape time,
resident adapters, loads and evictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Counters and histograms; `bank_stats` returns (resident, capacity, loads, evictions, load_failures)."""

    def __init__(self, bank_stats: Callable[[], tuple[int, int, int, int, int]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "verakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "verakit_request_seconds", "HTTP request latency by endpoint and status", ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = Histogram(
            "verakit_batch_rows", "model rows per batched forward", buckets=_SIZE_BUCKETS, registry=self.registry
        )
        self.batch_adapters = Histogram(
            "verakit_batch_adapters", "distinct adapters (base model included) per batched forward",
            buckets=_SIZE_BUCKETS, registry=self.registry,
        )
        self.registry.register(_BankCollector(bank_stats))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)

    def observe_batch(self, rows: int, adapters: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BankCollector:
    """Reads the bank's counters when scraped, so the bank needs no Prometheus code."""

    def __init__(self, stats: Callable[[], tuple[int, int, int, int, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        resident, capacity, loads, evictions, failures = self._stats()
        yield GaugeMetricFamily("verakit_resident_adapters", "adapters resident in the bank", value=resident)
        yield GaugeMetricFamily("verakit_bank_capacity", "adapter slots in the bank", value=capacity)
        yield CounterMetricFamily("verakit_adapter_loads", "adapters loaded into a slot", value=loads)
        yield CounterMetricFamily("verakit_adapter_evictions", "adapters evicted (least recently used)", value=evictions)
        yield CounterMetricFamily("verakit_adapter_load_failures", "adapter files that failed to load", value=failures)

    def describe(self) -> Iterator[Any]:
        return iter(())
