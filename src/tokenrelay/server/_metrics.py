"""Prometheus metrics for the server, all named ``tokenrelay_*``, in a registry of their own
(so that two apps in one process, or two tests, never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._relay import RelayStatistics, Run

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The server's metrics. ``statistics`` is called at scrape time for the gauges that
    describe what the relay holds."""

    def __init__(
        self,
        statistics: Callable[[], RelayStatistics | None],
        store_errors: Callable[[], int] = lambda: 0,
        redis: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_started = Counter("tokenrelay_runs_started", "Runs started.", registry=r)
        self.runs_ended = Counter(
            "tokenrelay_runs_ended",
            "Runs ended, by status (done, stopped, error) and reason.",
            ["status", "reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "tokenrelay_client_disconnects",
            "Streaming clients that went away before their stream ended.",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "tokenrelay_time_to_first_token_seconds",
            "From the start of a run to the first visible text of its answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_output = Histogram(
            "tokenrelay_time_to_first_output_seconds",
            "From the start of a run to the model's first output of any kind (reasoning, a "
            "tool call, text).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "tokenrelay_inter_token_seconds",
            "Gaps between consecutive outputs of the model (text, reasoning, tool calls).",
            buckets=_GAP_BUCKETS,
            registry=r,
        )

        r.register(_RelayCollector(statistics, store_errors, redis))

    def run_ended(self, run: Run) -> None:
        """Count a run's ending."""
        self.runs_ended.labels(run.status.value, run.reason or "done").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


#: The gauges that describe what the relay holds: (metric, RelayStatistics field, help).
_GAUGES = (
    ("tokenrelay_runs_in_flight", "runs_running", "Runs whose producer is running."),
    ("tokenrelay_runs_waiting", "runs_waiting", "Runs waiting for their turn."),
    ("tokenrelay_runs_retained", "runs_retained", "Finished runs held for replay."),
    ("tokenrelay_sessions", "sessions", "Sessions with a run held or in progress."),
    ("tokenrelay_subscribers", "subscribers", "Open subscriptions on held runs."),
    ("tokenrelay_replay_bytes_held", "bytes_held", "Bytes of event data held."),
)


class _RelayCollector(Collector):
    """The relay's gauges, from one :meth:`Relay.statistics` call per scrape (it walks every
    session, so it is taken once, not once per gauge)."""

    def __init__(
        self,
        statistics: Callable[[], RelayStatistics | None],
        store_errors: Callable[[], int],
        redis: Callable[[], tuple[int, int] | None],
    ) -> None:
        self._statistics = statistics
        self._store_errors = store_errors
        self._redis = redis

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._statistics()
        for name, field, text in _GAUGES:
            value = float(getattr(stats, field)) if stats is not None else 0.0
            yield GaugeMetricFamily(name, text, value=value)
        yield CounterMetricFamily(
            "tokenrelay_store_errors",
            "Batches the store could not write (serving went on in memory).",
            value=float(self._store_errors()),
        )
        redis = self._redis()
        if redis is not None:
            round_trips, errors = redis
            yield CounterMetricFamily(
                "tokenrelay_redis_round_trips",
                "Round trips to Redis (a pipeline of many commands counts once).",
                value=float(round_trips),
            )
            yield CounterMetricFamily(
                "tokenrelay_redis_errors",
                "Round trips to Redis that failed (it was unreachable, or answered an error).",
                value=float(errors),
            )
