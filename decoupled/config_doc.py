"""Every configuration key with its value, default and a one-line description, as YAML.

The descriptions are the comments written above (or beside) each field of the config
dataclasses in ``decoupled/config.py``: the schema stays the one place a key is explained.
``decoupled train CONFIG [KEY=VALUE ...] --print-config`` prints this for the resolved config.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any

import yaml

from decoupled.config import Config


def field_comments(cls: type[Any]) -> dict[str, str]:
    """{field name: its comment} for a dataclass, from the comment lines right above the field
    (joined) or the comment at the end of its line."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    comments: dict[str, str] = {}
    for item in node.body:
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        line = lines[item.lineno - 1]
        above: list[str] = []
        row = item.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        beside = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        text = " ".join(above) or beside
        if text:
            comments[item.target.id] = text
    return comments


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _section(obj: Any, defaults: Any, indent: int) -> list[str]:
    out: list[str] = []
    comments = field_comments(type(obj))
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        name = f.name
        value, default = getattr(obj, name), getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            note = f"  # {comments[name]}" if name in comments else ""
            out.append(f"{pad}{name}:{note}")
            out += _section(value, default, indent + 1)
            continue
        notes = []
        if value != default:
            notes.append(f"default {_yaml_value(default)}")
        if name in comments:
            notes.append(comments[name])
        choices = f.metadata.get("choices")
        if choices:
            also = " or module:function" if f.metadata.get("factory") else ""
            notes.append(f"one of {', '.join(choices)}{also}")
        note = f"  # {'; '.join(notes)}" if notes else ""
        out.append(f"{pad}{name}: {_yaml_value(value)}{note}")
    return out


def describe(cfg: Config) -> str:
    """``cfg`` as YAML, every key annotated with its description, allowed values, and its
    default where the value differs."""
    return "\n".join(_section(cfg, Config(), 0)) + "\n"
