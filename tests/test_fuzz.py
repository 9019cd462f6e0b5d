"""Property-based fuzzing (hypothesis) of everything that parses outside input: the codec, the
envelope, the criteria parser, the manifest parsers, bundle unpacking, and the RPC server with
random and mutated requests against every method of every service.  A few hundred cases each
here; bench/fuzz.py runs >= 10,000 per target and counts crashes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_corpus import TARGETS, RpcFuzz, rpc_fuzz

CI = settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", sorted(TARGETS))
@CI
@given(data=st.data())
def test_outside_input_is_answered_or_refused_never_a_crash(name: str, data: st.DataObject) -> None:
    target = TARGETS[name]
    target.check(data.draw(target.strategy, label=name))


@pytest.fixture(scope="module")
def rpc_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RpcFuzz, Any]]:
    with rpc_fuzz(Path(tmp_path_factory.mktemp("fuzz"))) as target:
        yield target


def test_every_method_of_every_service_survives_random_and_mutated_requests(rpc_target: tuple[RpcFuzz, Any]) -> None:
    fuzz, verify = rpc_target
    assert {"tasks", "devices", "bundles", "events", "identities"} <= set(fuzz.methods)

    @CI
    @given(case=fuzz.strategy())
    def run(case: Any) -> None:
        fuzz.check(case)

    run()
    assert fuzz.cases >= 300
    verify()  # every service answers ping afterwards, and nothing logged a traceback or an error
