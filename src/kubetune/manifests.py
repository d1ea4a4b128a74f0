"""Read YAML manifests with the line of every field, so errors can say FILE:LINE."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Document:
    """One YAML document of a file, with its node tree for line lookups."""

    path: str
    index: int
    data: Any
    node: yaml.Node | None

    def line_of(self, field_path: str) -> int:
        """1-based line of a dotted field path; the nearest existing parent if it is missing."""
        node = self.node
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in _split_path(field_path):
            found = _child(node, part)
            if found is None:
                break
            anchor, node = found
            line = anchor.start_mark.line + 1
        return line

    @property
    def first_line(self) -> int:
        return self.node.start_mark.line + 1 if self.node is not None else 1


class ManifestError(Exception):
    """A file that cannot be read as YAML."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
        self.path, self.line, self.problem = path, line, problem


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return parts


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """The (node to point at, node to descend into) for one path step: the key's line for a
    mapping entry, the item's own line for a list entry."""
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if getattr(key, "value", None) == part:
                return key, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item = node.value[part]
        return item, item
    return None


def load_documents(path: str | Path) -> list[Document]:
    """Every non-empty document of a YAML file ("-" reads standard input)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8") if name != "-" else _stdin()
    except OSError as exc:
        raise ManifestError(name, 0, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(name, 0, f"not UTF-8 text ({exc.reason})") from exc
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(name, line, f"invalid YAML: {problem}") from exc
    return [
        Document(name, i, data, node)
        for i, (data, node) in enumerate(zip(datas, nodes, strict=True))
        if data is not None
    ]


def _stdin() -> str:
    import sys

    return sys.stdin.read()
