"""The fuzzing corpus at volume: every target of tests/fuzz_corpus.py (codec, envelope, criteria,
manifests, bundle unpacking) and the RPC server of a real cloud (every method of every service,
on the embedded broker) run with >= 10,000 generated cases each; crashes are counted, not raised.

    .venv/bin/python -m bench.fuzz [--cases 10000] [--targets codec,rpc,...] [--seed 0]

A crash is a broken contract: a parser raising something other than its own error type, writing
outside its folder, or the RPC server answering ``internal``, leaving a request unanswered, or
logging a traceback.  Prints one JSON document; exits 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz_corpus import TARGETS, rpc_fuzz


def run_target(strategy: st.SearchStrategy[Any], check: Callable[[Any], None], cases: int,
               random_seed: int) -> dict[str, Any]:
    """Generation only (no shrinking): every case counts once and a crash is recorded, not raised."""
    counted = {"cases": 0, "crashes": 0}
    first: list[str] = []

    @seed(random_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        counted["cases"] += 1
        try:
            check(case)
        except Exception as exc:  # the count is the result; keep a few for the report
            counted["crashes"] += 1
            if len(first) < 3:
                first.append(f"{type(exc).__name__}: {str(exc)[:300]} <- {case!r:.300}")

    started = time.perf_counter()
    fuzz()
    elapsed = time.perf_counter() - started
    return {**counted, "seconds": round(elapsed, 1), "cases_per_s": round(counted["cases"] / elapsed, 1),
            "first_crashes": first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated cases per target")
    parser.add_argument("--targets", default=",".join([*sorted(TARGETS), "rpc"]))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # dropped hostile requests are warnings: expected here
    names = [n for n in args.targets.split(",") if n]
    unknown = set(names) - {*TARGETS, "rpc"}
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted([*TARGETS, 'rpc'])}")
    results: dict[str, Any] = {}
    for name in names:
        if name == "rpc":
            continue
        print(f"fuzzing {name} ...", file=sys.stderr, flush=True)
        target = TARGETS[name]
        results[name] = run_target(target.strategy, target.check, args.cases, args.seed)
    if "rpc" in names:
        print("fuzzing rpc (a cloud with every service on the embedded broker) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp, rpc_fuzz(Path(tmp)) as (target, verify):
            results["rpc"] = run_target(target.strategy(), target.check, args.cases, args.seed)
            try:
                verify()
                results["rpc"]["after"] = "every service answers ping; no error or traceback logged"
            except AssertionError as exc:
                results["rpc"]["crashes"] += 1
                results["rpc"]["after"] = f"FAILED: {str(exc)[:500]}"
            results["rpc"]["methods"] = sum(len(m) for m in target.methods.values())
    total = sum(r["crashes"] for r in results.values())
    print(json.dumps({"cases_per_target": args.cases, "seed": args.seed, "targets": results,
                      "crashes": total}, indent=2))
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
