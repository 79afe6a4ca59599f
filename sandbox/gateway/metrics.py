"""Prometheus metrics per upstream, in a registry owned by one gateway instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("agentbox_gateway_upstream_calls", "Tool calls sent to an upstream",
                             ["upstream"], registry=self.registry)
        self.errors = Counter("agentbox_gateway_upstream_errors", "Failed tool calls by kind "
                              "(tool, timeout, transport, unavailable)", ["upstream", "kind"],
                              registry=self.registry)
        self.latency = Histogram("agentbox_gateway_upstream_call_seconds", "Tool call latency through the "
                                 "gateway", ["upstream"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.up = Gauge("agentbox_gateway_upstream_up", "1 while the upstream session is connected",
                        ["upstream"], registry=self.registry)
        self.reloads = Counter("agentbox_gateway_config_reloads", "Config reload attempts by outcome",
                               ["outcome"], registry=self.registry)
