"""The aggregator election: pure rendezvous hashing, checked as properties over random views."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.ftdl.serverless.election import Candidate, elect, rank, sample

devices = st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True)
candidates = st.lists(st.builds(Candidate, devices, st.integers(0, 2**40)), min_size=1, max_size=30,
                      unique_by=lambda c: c.device)
rounds = st.integers(0, 10_000)
tasks = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@settings(max_examples=120, deadline=None)
@given(tasks, rounds, candidates, st.randoms())
def test_everyone_with_the_same_view_elects_the_same_one(task: str, round_: int, view: list[Candidate],
                                                         shuffler: random.Random) -> None:
    shuffled = list(view)
    shuffler.shuffle(shuffled)
    assert elect(task, round_, view) == elect(task, round_, shuffled) == elect(task, round_, set(view))
    assert elect(task, round_, view) in view


@settings(max_examples=120, deadline=None)
@given(tasks, rounds, candidates)
def test_without_the_winner_the_runner_up_wins(task: str, round_: int, view: list[Candidate]) -> None:
    ranked = rank(task, round_, view)
    remaining = [c for c in view if c != ranked[0]]
    assert elect(task, round_, remaining) == (ranked[1] if len(ranked) > 1 else None)


@settings(max_examples=120, deadline=None)
@given(tasks, rounds, candidates, st.data())
def test_removing_anyone_else_keeps_the_winner(task: str, round_: int, view: list[Candidate],
                                               data: st.DataObject) -> None:
    winner = elect(task, round_, view)
    others = [c for c in view if c != winner]
    gone = data.draw(st.sets(st.sampled_from(others)) if others else st.just(set()))
    assert elect(task, round_, [c for c in view if c not in gone]) == winner


@settings(max_examples=80, deadline=None)
@given(tasks, rounds, candidates, st.builds(Candidate, devices, st.integers(0, 2**40)))
def test_a_newcomer_changes_the_winner_only_by_winning(task: str, round_: int, view: list[Candidate],
                                                       newcomer: Candidate) -> None:
    winner = elect(task, round_, view)
    after = elect(task, round_, [*view, newcomer])
    assert after in (winner, newcomer)


def test_a_new_session_is_a_new_candidate_and_rounds_spread_the_work() -> None:
    view = [Candidate(f"dev-{i}", 1) for i in range(5)]
    winners = {elect("t", r, view) for r in range(200)}
    assert winners == set(view)                      # every participant aggregates some rounds
    reconnected = [Candidate("dev-0", 2), *view[1:]]
    assert {elect("t", r, reconnected) for r in range(200)} >= {Candidate("dev-0", 2)}
    assert elect("t", 1, []) is None


@settings(max_examples=80, deadline=None)
@given(tasks, rounds, candidates, st.floats(0.01, 1.0))
def test_the_sample_is_deterministic_and_sized_by_the_fraction(task: str, round_: int, view: list[Candidate],
                                                               fraction: float) -> None:
    chosen = sample(task, round_, view, fraction)
    assert chosen == sample(task, round_, list(reversed(view)), fraction)
    assert chosen <= {c.device for c in view}
    assert len(chosen) == max(1, min(len(view), -(-round(fraction * len(view) * 1e9) // 1_000_000_000)))
