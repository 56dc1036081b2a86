"""Prometheus metrics of a node, served on `port + 2` at /metrics.

The collector reads the node's counters and partition cores when scraped, so the event loop
pays nothing per message for metrics. Reads happen on the HTTP server's thread: it copies the
small dicts it walks (a scrape may be one loop pass stale, never inconsistent enough to crash).
"""
from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("zq.metrics")


class NodeCollector:
    def __init__(self, node) -> None:
        self.node = node

    def collect(self):
        node = self.node
        labels = ["node"]
        counters = CounterMetricFamily("zq_events", "Things a node counted, by kind", labels=["node", "kind"])
        for kind, value in sorted(dict(node.counters).items()):
            counters.add_metric([node.name, kind], value)
        yield counters
        parked = GaugeMetricFamily("zq_parked_fetches", "Long-poll fetches waiting for data", labels=labels)
        parked.add_metric([node.name], node.parked_count)
        yield parked
        saturation = GaugeMetricFamily("zq_parked_fetches_saturation",
                                       "Parked fetches as a fraction of their bound", labels=labels)
        saturation.add_metric([node.name], node.parked_count / max(1, node.limits.pending_fetches_max))
        yield saturation
        hw = GaugeMetricFamily("zq_partition_high_watermark", "First offset not yet committed",
                               labels=["node", "topic", "partition"])
        end = GaugeMetricFamily("zq_partition_log_end", "Next offset to be written", labels=["node", "topic", "partition"])
        lag = GaugeMetricFamily("zq_partition_uncommitted", "log end minus high watermark (messages)",
                                labels=["node", "topic", "partition"])
        for row in node._local_partitions_view():
            lbl = [node.name, row["topic"], str(row["partition"])]
            hw.add_metric(lbl, row["high_watermark"])
            end.add_metric(lbl, row["log_end"])
            lag.add_metric(lbl, row["log_end"] - row["high_watermark"])
        yield hw
        yield end
        yield lag


def serve_metrics(node, host: str, port: int):
    """Start the /metrics endpoint; a port in use is logged, never fatal (metrics are advisory)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        log.warning("metrics endpoint %s:%d not started: %s", host, port, e.strerror)
        return None
    log.info("metrics at http://%s:%d/metrics", host, port)
    return server
