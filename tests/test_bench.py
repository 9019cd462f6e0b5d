"""The benchmarks run as their docs say: ``.venv/bin/python -m bench.<name>`` from the repository
root (they import each other and the fuzzing corpus, so a script path would not do)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHES)
def test_each_benchmark_starts_from_the_repository_root_as_documented(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert f"python -m bench.{name}" in (ROOT / "bench" / f"{name}.py").read_text()  # the documented way


def test_fuzz_bench_counts_cases_and_crashes() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.fuzz", "--cases", "20", "--targets", "codec,unpack"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["crashes"] == 0 and report["targets"]["codec"]["cases"] == 20
