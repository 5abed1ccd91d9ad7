"""Help text for command-line flags, taken from the settings dataclasses' field docstrings,
so a setting is documented in exactly one place."""

from __future__ import annotations

import ast
import inspect
import itertools


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under each field of a settings dataclass, for --help (with `%`
    doubled: argparse formats help strings)."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            text = " ".join(str(following.value.value).split())
            docs[node.target.id] = text.replace("%", "%%")
    return docs
