"""Write (or, with --check, compare) every file generated from the API models.

    python -m kubetune.api.generate [--check] [--root DIR]

`make generate` writes them; `make verify` and the test suite fail when one is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune.api.crd import build_crds, crd_filename, to_yaml
from kubetune.api.docs import render_api_doc


def generated_files() -> dict[str, str]:
    """Relative path → content of every generated file."""
    files = {f"crds/{crd_filename(crd)}": to_yaml([crd]) for crd in build_crds()}
    files["docs/api.md"] = render_api_doc()
    # The Helm chart carries the same CRDs (Helm installs charts/kubetune/crds/ first).
    files.update(
        {f"charts/kubetune/{p}": text for p, text in list(files.items()) if p.startswith("crds/")}
    )
    return files


def stale_files(root: Path) -> list[str]:
    """Generated files that are missing or differ from what the models produce."""
    return [
        path
        for path, content in generated_files().items()
        if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != content
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    parser.add_argument("--root", default=".", help="repository root")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.check:
        stale = stale_files(root)
        for path in stale:
            print(f"{path} is stale: run `make generate`", file=sys.stderr)
        return 1 if stale else 0
    for path, content in generated_files().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
