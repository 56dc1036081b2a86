"""Prometheus metrics of a node, served on `port + 2` at /metrics.

The collector reads the node's counters and a per-partition snapshot that the loop thread
refreshes every second, so the event loop pays nothing per message for metrics and the HTTP
server's thread never touches the store or the cores (a scrape may be a second stale).
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
        # Bad batches (zq.batch.verify_produced): produced ones refused, and undecodable stored ones that
        # group leases stepped over (each also in zq_events under its own kind).
        bad = CounterMetricFamily("zq_bad_batches", "Batches refused at produce or stepped over by group leases",
                                  labels=["node", "where"])
        for where, kind in (("produce_refused", "produce_batches_refused"),
                            ("group_lease_skipped", "group_undecodable_batches_skipped")):
            bad.add_metric([node.name, where], node.counters.get(kind, 0))
        yield bad
        parked = GaugeMetricFamily("zq_parked_fetches", "Long-poll fetches waiting for data", labels=labels)
        parked.add_metric([node.name], node.parked_count)
        yield parked
        saturation = GaugeMetricFamily("zq_parked_fetches_saturation",
                                       "Parked fetches as a fraction of their bound", labels=labels)
        saturation.add_metric([node.name], node.parked_count / max(1, node.limits.pending_fetches_max))
        yield saturation
        labels3 = ["node", "topic", "partition"]
        hw = GaugeMetricFamily("zq_partition_high_watermark", "First offset not yet committed", labels=labels3)
        end = GaugeMetricFamily("zq_partition_log_end", "Next offset to be written", labels=labels3)
        uncommitted = GaugeMetricFamily("zq_partition_uncommitted", "Log end minus high watermark (messages)",
                                        labels=labels3)
        lag = GaugeMetricFamily("zq_replication_lag_messages", "Messages the slowest replica lacks", labels=labels3)
        lag_ms = GaugeMetricFamily("zq_replication_lag_ms", "Age of the oldest batch the slowest replica lacks",
                                   labels=labels3)
        in_sync = GaugeMetricFamily("zq_partition_in_sync_replicas", "Replicas in sync with the leader", labels=labels3)
        for row in list(node.metrics_rows):   # a snapshot the loop thread refreshes every second
            lbl = [node.name, row["topic"], str(row["partition"])]
            hw.add_metric(lbl, row["high_watermark"])
            end.add_metric(lbl, row["log_end"])
            uncommitted.add_metric(lbl, row["log_end"] - row["high_watermark"])
            lag.add_metric(lbl, row["replication_lag"])
            lag_ms.add_metric(lbl, row["replication_lag_ms"])
            in_sync.add_metric(lbl, len(row["in_sync"]))
        yield from (hw, end, uncommitted, lag, lag_ms, in_sync)
        labels4 = ["node", "group", "topic", "partition"]
        families = {
            "lag": GaugeMetricFamily("zq_group_lag_messages", "High watermark minus the group's committed offset",
                                     labels=labels4),
            "lag_seconds": GaugeMetricFamily("zq_group_lag_seconds", "Age of the oldest message the group has not "
                                             "committed", labels=labels4),
            "in_flight": GaugeMetricFamily("zq_group_in_flight", "Messages leased and not settled", labels=labels4),
            "retrying": GaugeMetricFamily("zq_group_retrying", "Messages waiting for a retry", labels=labels4),
            "dead_lettered": CounterMetricFamily("zq_group_dead_lettered", "Messages moved to the dead-letter topic",
                                                 labels=labels4),
        }
        for row in list(node.group_metrics_rows):
            lbl = [node.name, row["group"], row["topic"], str(row["partition"])]
            for field, family in families.items():
                family.add_metric(lbl, row[field] or 0)
        yield from families.values()


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
