"""Telemetry from agents: deduplication, gap accounting, latest samples and subscriptions."""

from controlplane.telemetry._hub import AcceptOutcome, Sample, SubscriberTooSlow, TelemetryHub

__all__ = ["AcceptOutcome", "Sample", "SubscriberTooSlow", "TelemetryHub"]
