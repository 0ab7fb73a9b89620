"""Files generated from the repository's sources, and the one command line that writes
them or, with `--check`, says which are stale (CI runs the checks)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Render = Callable[[Path], dict[Path, str]]
"""The generated files' texts by path relative to the repository root."""


def stale_files(root: Path, rendered: dict[Path, str]) -> list[Path]:
    return [path for path, text in rendered.items()
            if not (root / path).is_file() or (root / path).read_text() != text]


def generator_main(argv: Sequence[str] | None, prog: str, description: str | None,
                   required: Path, render: Render,
                   errors: tuple[type[Exception], ...] = (OSError, ValueError)) -> int:
    """Write the stale files, or with `--check` only name them (exit 1); 2 when the
    sources cannot be rendered. `required` is a path the repository root must hold."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated file is stale")
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    root: Path = args.root
    if not (root / required).exists():
        parser.error(f"{root / required} not found: run from the repository root or pass "
                     "--root")
    try:
        rendered = render(root)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = stale_files(root, rendered)
    if args.check:
        for path in stale:
            print(f"{path} is stale: regenerate it with `{prog}`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        (root / path).write_text(rendered[path])
        print(f"wrote {path}")
    if not stale:
        print("generated files are up to date")
    return 0
