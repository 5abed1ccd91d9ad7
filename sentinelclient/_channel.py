"""Mutual-TLS channels to a control plane, sync and asyncio, built from ConnectionSettings; the
settings become channel options in one place."""

from __future__ import annotations

from typing import Any

import grpc

from sentinelclient._settings import ConnectionSettings

_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _channel_options(settings: ConnectionSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # Pings only while a call is open: the server accepts them at this rate (it allows one
        # per half its own keepalive interval), and an idle client has nothing to keep alive.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        # Retries are ours (with the same request_id); gRPC's transparent ones are not counted.
        ("grpc.enable_retries", 0),
    ]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return options


def _credentials(settings: ConnectionSettings) -> grpc.ChannelCredentials:
    ca, key, cert = settings.tls_files().read()
    return grpc.ssl_channel_credentials(ca, key, cert)


def async_channel(settings: ConnectionSettings) -> grpc.aio.Channel:
    """An asyncio channel presenting the settings' client certificate."""
    return grpc.aio.secure_channel(
        settings.server, _credentials(settings), options=_channel_options(settings)
    )


def sync_channel(settings: ConnectionSettings) -> grpc.Channel:
    """A blocking channel presenting the settings' client certificate."""
    return grpc.secure_channel(
        settings.server, _credentials(settings), options=_channel_options(settings)
    )
