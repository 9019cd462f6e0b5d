"""Fails right after start, as the broken task E of AGATA's experiment 2."""

raise RuntimeError("experiment 2: this task's client fails on purpose right after it starts")
