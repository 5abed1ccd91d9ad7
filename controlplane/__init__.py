"""Sentinel's control plane."""

from controlplane.app import ControlPlane
from controlplane.settings import ControlPlaneSettings, TlsFiles

__all__ = ["ControlPlane", "ControlPlaneSettings", "TlsFiles"]
