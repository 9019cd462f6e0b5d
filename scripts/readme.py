"""The commands README.md shows, read from README.md itself, so CI runs exactly what a reader types.

    python3 scripts/readme.py demo       # the first command of the README (install + demo)
    python3 scripts/readme.py tests      # the second one (install + test suite)
    python3 scripts/readme.py failover   # the demo's second scenario, as the README writes it
    python3 scripts/readme.py serverless # the serverless scenario, likewise
    python3 scripts/readme.py tour       # the quick tour's script

Standard library only: CI runs this before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SCENARIOS = ("failover", "serverless")  # the demo's scenarios beyond the first command's
README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")


def bash_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every ```bash block as (the heading above it, its lines)."""
    blocks: list[tuple[str, list[str]]] = []
    heading, language, current = "", None, []  # language is None outside a fenced block
    for line in text.splitlines():
        fence = FENCE.match(line)
        if language is None:
            if fence:
                language, current = fence.group(1) or "text", []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if language in ("bash", "sh", "shell"):
                blocks.append((heading, current))
            language = None
        else:
            current.append(line)
    return blocks


def command(name: str, text: str | None = None) -> str:
    blocks = bash_blocks(text if text is not None else README.read_text())
    if not blocks:
        raise SystemExit("README.md has no bash block")
    if name in ("demo", "tests"):
        first = [line for line in blocks[0][1] if line.strip() and not line.lstrip().startswith("#")]
        if len(first) != 2:
            raise SystemExit(f"README.md's first block must hold exactly two commands, it holds {len(first)}")
        return first[0] if name == "demo" else first[1]
    if name in SCENARIOS:
        for _, lines in blocks:
            for line in lines:
                if "fedmq demo" in line and f"--scenario {name}" in line:
                    return line.split("  #")[0].strip()
        raise SystemExit(f"README.md shows no 'fedmq demo --scenario {name}' command")
    if name == "tour":
        for heading, lines in blocks:
            if heading.lower().startswith("a quick tour"):
                return "\n".join(lines) + "\n"
        raise SystemExit("README.md has no '## A quick tour' block")
    raise SystemExit(f"unknown command {name!r}: demo, tests, failover or tour")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.stdout.write(command(sys.argv[1]) + ("" if sys.argv[1] == "tour" else "\n"))
