"""Command running: the control plane's commands one at a time, in the order received, each
executed at most once (also across agent restarts), with its ack and result sent on whatever
session is open.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from sentinel.v1 import agent_pb2

from nodeagent import encode
from nodeagent._state import StateFull
from nodeagent.actions import ACTIONS, ActionError, AgentControls
from processkit import log_context

log = logging.getLogger(__name__)

_OUTCOMES = {
    name.removeprefix("COMMAND_OUTCOME_"): value for name, value in agent_pb2.CommandOutcome.items()
}


class CommandRunner:
    """Runs the control plane's commands in order, each at most once, and reports each result.

    Runs for the agent's life, not a session's, so a dropped session never cuts a command
    short; a result that finds no session is re-sent when the command is re-delivered.
    """

    def __init__(
        self,
        *,
        command_timeout_s: float,
        send: Callable[[agent_pb2.ConnectRequest], bool],
    ) -> None:
        self._command_timeout_s = command_timeout_s
        self._send = send
        self._commands: asyncio.Queue[agent_pb2.Command] = asyncio.Queue()
        self._in_flight: set[str] = set()

    def receive(self, command: agent_pb2.Command) -> None:
        """Queues a command from the session; one already queued or running is only acked."""
        if command.command_id in self._in_flight:
            # Re-delivered while we are still on it: confirm, the result follows when done.
            self._send(
                agent_pb2.ConnectRequest(
                    command_ack=agent_pb2.CommandAck(command_id=command.command_id)
                )
            )
            return
        self._in_flight.add(command.command_id)
        self._commands.put_nowait(command)

    async def run(self, controls: AgentControls) -> None:
        """One command at a time, in the order received: ordering is part of the contract."""
        while True:
            command = await self._commands.get()
            try:
                with log_context(command_id=command.command_id):
                    result = await self._execute(command, controls)
                self._send(agent_pb2.ConnectRequest(command_result=result))
            finally:
                self._in_flight.discard(command.command_id)

    async def _execute(
        self, command: agent_pb2.Command, controls: AgentControls
    ) -> agent_pb2.CommandResult:
        state = controls.state
        self._send(
            agent_pb2.ConnectRequest(
                command_ack=agent_pb2.CommandAck(command_id=command.command_id)
            )
        )
        done = await asyncio.to_thread(state.executed, command.command_id)
        if done is not None:
            if done.finished and done.result is not None:
                # Delivered again (our result was lost with the last session): same result.
                result = agent_pb2.CommandResult.FromString(done.result)
            else:
                result = self._result(
                    command,
                    "FAILED",
                    "the agent restarted while executing this command; "
                    "it is not run again and its effect is unknown",
                    None,
                    encode.now_timestamp(),
                )
                await asyncio.to_thread(
                    state.mark_finished, command.command_id, result.SerializeToString()
                )
            return result

        started = encode.now_timestamp()
        try:
            await asyncio.to_thread(state.mark_started, command.command_id)
        except StateFull as exc:
            # Never run without the record that stops a second run: refused, not attempted.
            log.error("command %s refused: %s", command.action, exc.strerror)
            return self._result(
                command,
                "FAILED",
                f"not run: {exc.strerror} (the agent's disk is full)",
                None,
                started,
            )
        deadline = command.deadline.ToDatetime(dt.UTC) if command.HasField("deadline") else None
        remaining = (
            (deadline - dt.datetime.now(dt.UTC)).total_seconds()
            if deadline
            else self._command_timeout_s
        )
        action = ACTIONS.get(command.action)
        output: dict[str, Any] | None = None
        if remaining <= 0:
            outcome, message = "EXPIRED", "the deadline passed before the command could start"
        elif action is None:
            outcome, message = (
                "UNSUPPORTED",
                f"action {command.action!r} is not supported by this agent",
            )
        else:
            parameters = json_format.MessageToDict(command.parameters)
            try:
                output = await asyncio.wait_for(
                    action(controls, parameters), min(remaining, self._command_timeout_s)
                )
                outcome, message = "SUCCEEDED", ""
            except ActionError as exc:
                outcome, message = exc.outcome, str(exc)
            except TimeoutError:
                outcome, message = "FAILED", f"{command.action} did not finish before its deadline"
            except Exception as exc:
                log.exception("action %s failed", command.action)
                outcome, message = "FAILED", f"{command.action} failed: {exc}"
        log.info("command %s finished: %s %s", command.action, outcome, message)
        result = self._result(command, outcome, message, output, started)
        await asyncio.to_thread(state.mark_finished, command.command_id, result.SerializeToString())
        return result

    @staticmethod
    def _result(
        command: agent_pb2.Command,
        outcome: str,
        message: str,
        output: dict[str, Any] | None,
        started: timestamp_pb2.Timestamp,
    ) -> agent_pb2.CommandResult:
        result = agent_pb2.CommandResult(
            command_id=command.command_id,
            outcome=_OUTCOMES[outcome],
            message=message,
            start_time=started,
            finish_time=encode.now_timestamp(),
        )
        if output:
            struct = struct_pb2.Struct()
            struct.update(output)
            result.output.CopyFrom(struct)
        return result
