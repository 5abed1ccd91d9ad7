"""Structured logs: JSON lines carry the context fields and never secrets."""

from __future__ import annotations

import json
import logging

import pytest

from processkit import configure_logging, log_context


def test_json_lines_carry_context_and_redact_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    try:
        with log_context(node_id="node-1", session_id="s-1"):
            logging.getLogger("sentinel.test").info(
                "command done", extra={"command_id": "c-1", "token": "s3cr3t"}
            )
    finally:
        logging.getLogger().handlers.clear()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["message"] == "command done"
    assert record["node_id"] == "node-1"
    assert record["session_id"] == "s-1"
    assert record["command_id"] == "c-1"
    assert record["token"] == "[redacted]"
    assert "s3cr3t" not in line


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
