"""The `--help` text: every config key with its type, default and meaning, generated from the schema."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from .schema import Config, choices


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every config key, from the dataclasses: the meaning is the field's
    trailing `#` comment (a section's own line comes from its field in the parent), the valid names of a
    name-valued key are appended from its registry. Feeds --help; a test requires a meaning for every key."""
    valid = choices()
    rows: list[tuple[str, str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        comments, hints = _field_comments(type(obj)), typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                rows.append((key, "section", None, comments.get(f.name, "")))
                walk(value, f"{key}.")
                continue
            meaning = comments.get(f.name, "")
            if key in valid:
                meaning += f" [{' | '.join(valid[key])}]"
            rows.append((key, _type_name(hints[f.name]), value, meaning.strip()))

    walk(Config(), "")
    return rows


def help_text() -> str:
    """The config keys as --help lists them (an argparse epilog)."""
    lines = ["config keys (in the --config YAML, nested by section, or as key=value; lists as [0.001,0.01]):"]
    for key, kind, default, meaning in describe_keys():
        if kind == "section":
            lines.append(f"\n {key}.*: {meaning}")
        else:
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()
            lines.append(f"  {key:30} {kind + ' = ' + shown:28} {meaning}")
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """field name → the `#` comment at the end of its line in the class body."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: by_line[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in by_line}


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return f"{_type_name(args[0])}|null"
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    return hint.__name__
