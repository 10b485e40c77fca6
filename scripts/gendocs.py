#!/usr/bin/env python3
"""Generate shell completions (completions/) and man pages (man/) from the Typer app.

    python scripts/gendocs.py           write them
    python scripts/gendocs.py --check   exit 1 if the committed files differ from the code

The generator is haifctl/docgen.py (`haifctl completion SHELL` prints the same scripts).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from haifctl.docgen import render

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args()
    files = render()
    stale = []
    for rel, text in files.items():
        path = ROOT / rel
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(rel)
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True), text.splitlines(True), str(rel), f"{rel} (generated)"
                )
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    for directory in ("completions", "man"):
        for path in sorted((ROOT / directory).glob("*")):
            if path.relative_to(ROOT) not in files:
                stale.append(path.relative_to(ROOT))
                print(f"{path.relative_to(ROOT)} is not generated any more: remove it")
    if stale:
        print(f"stale: {', '.join(map(str, stale))}; run: python scripts/gendocs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
