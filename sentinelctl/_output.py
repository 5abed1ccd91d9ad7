"""How read commands print: `-o table` (aligned columns for people, the default of lists),
`-o json` and `-o yaml` (the API's messages with their proto field names, for scripts)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

FORMATS = ("table", "json", "yaml")


def add_output_argument(parser: argparse.ArgumentParser, default: str = "table") -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=default,
        help=f"table, json or yaml (default {default})",
    )


def message_data(message: Message) -> dict[str, Any]:
    """A message as plain data under its proto field names (what plan and policy files use)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_data(data: Any, output: str) -> None:
    """Prints data as one JSON document or one YAML document."""
    if output == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")


def print_messages(messages: Iterable[Message], output: str) -> None:
    """A list of messages as one JSON array or one YAML list."""
    print_data([message_data(m) for m in messages], output)


def print_streamed(message: Message, output: str) -> None:
    """One message of a stream: a JSON line, or a YAML document after `---`."""
    if output == "json":
        print(json.dumps(message_data(message), ensure_ascii=False), flush=True)
    else:
        print("---", flush=False)
        print(yaml.safe_dump(message_data(message), sort_keys=False), end="", flush=True)
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of left-aligned columns, two spaces apart; the last column is not padded."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *cells]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return lines
