"""The bad-input catalog in tests/data/invalid: manifests with the error a user must see.

Each file starts with comments: what is wrong, the field path and the exact message
(in the API server's wording for schema errors, the rule's message for CEL rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CATALOG_DIR = Path(__file__).parent / "data" / "invalid"


@dataclass(frozen=True)
class Case:
    name: str
    why: str
    path: str
    message: str
    manifest: dict[str, Any]


def load_case(file: Path) -> Case:
    text = file.read_text(encoding="utf-8")
    header = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    fields = dict(line.split(": ", 1) for line in header[1:] if ": " in line)
    path = next(line.split(":", 1)[1].strip() for line in header if line.startswith("path:"))
    return Case(
        name=file.stem,
        why=header[0],
        path=path,
        message=fields["message"],
        manifest=yaml.safe_load(text),
    )


def load_catalog() -> list[Case]:
    return [load_case(f) for f in sorted(CATALOG_DIR.glob("*.yaml"))]
