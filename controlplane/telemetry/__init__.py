"""Telemetry from agents: deduplication, gap accounting, latest samples and subscriptions,
and the relay of samples between replicas."""

from controlplane.telemetry._hub import AcceptOutcome, Sample, SubscriberTooSlow, TelemetryHub
from controlplane.telemetry._relay import TelemetryRelay

__all__ = ["AcceptOutcome", "Sample", "SubscriberTooSlow", "TelemetryHub", "TelemetryRelay"]
