"""Prometheus metrics of the service: API-side histograms plus a collector that reads, at scrape
time, what lives elsewhere (queue depths and live workers in Redis, job durations the workers
record in Redis, versions per branch in the store)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from workers import protocol

log = logging.getLogger("lmedit.api")


class ServiceCollector:
    def __init__(self, services):
        self.services = services

    def collect(self):
        jobs, settings = self.services.jobs, self.services.settings
        depth = GaugeMetricFamily("lmedit_queue_depth", "Jobs waiting in a queue", labels=["queue"])
        workers = GaugeMetricFamily("lmedit_workers", "Live workers (by queue they serve)", labels=["queue"])
        durations = HistogramMetricFamily("lmedit_job_seconds", "Job durations measured by workers",
                                          labels=["job"])
        try:
            conn = jobs.redis
            cutoff = time.time() - settings.worker_ttl_s
            for queue in protocol.QUEUES:
                depth.add_metric([queue], conn.llen(f"rq:queue:{queue}"))
                workers.add_metric([queue], conn.zcount(protocol.workers_key(queue), cutoff, "+inf"))
            for name in ("generate", "edit_succeeded", "edit_failed", "edit_canceled"):
                raw = {k.decode(): float(v) for k, v in conn.hgetall(protocol.stats_key(name)).items()}
                if not raw:
                    continue
                buckets = [(str(b), raw.get(f"le:{b}", 0.0)) for b in protocol.DURATION_BUCKETS]
                buckets.append(("+Inf", raw.get("count", 0.0)))
                durations.add_metric([name], buckets, raw.get("sum", 0.0))
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because Redis is down
            log.warning("metrics: Redis unreadable: %s", e)
        yield depth
        yield workers
        yield durations
        versions = GaugeMetricFamily("lmedit_versions", "Versions on a branch (its ancestry, base excluded)",
                                     labels=["branch"])
        try:
            store = self.services.store()
            for branch in store.branches():
                versions.add_metric([branch], len(store.ancestry(branch)) - 1)
        except Exception as e:  # noqa: BLE001
            log.debug("metrics: store unreadable: %s", e)
        yield versions


class Metrics:
    def __init__(self, services):
        self.registry = CollectorRegistry()
        self.generate_seconds = Histogram("lmedit_generate_seconds", "Generation latency seen by the API",
                                          buckets=protocol.DURATION_BUCKETS, registry=self.registry)
        self.requests = Counter("lmedit_http_requests", "HTTP requests", ["method", "status"],
                                registry=self.registry)
        self.registry.register(ServiceCollector(services))
