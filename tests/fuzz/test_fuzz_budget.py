"""The fuzzing budget of :mod:`fuzz.conftest`: examples from the environment, derandomized in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from fuzz.conftest import DEFAULT_EXAMPLES, FUZZ, FUZZ_HEAVY, HEAVY_SHARE, examples, register


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    """The profiles this run registered are registered again after each test."""
    yield
    register(os.environ)


BUDGETS = [
    ("default", {}, DEFAULT_EXAMPLES, False),
    ("longer", {"EGRESSD_FUZZ_EXAMPLES": "20000"}, 20000, False),
    ("ci", {"CI": "true"}, DEFAULT_EXAMPLES, True),
    ("ci-longer", {"CI": "1", "EGRESSD_FUZZ_EXAMPLES": " 7 "}, 7, True),
    ("ci-empty-is-not-ci", {"CI": ""}, DEFAULT_EXAMPLES, False),
]


@pytest.mark.parametrize(("case", "env", "n", "in_ci"), BUDGETS, ids=[b[0] for b in BUDGETS])
def test_the_profiles_follow_the_environment(case: str, env: dict[str, str], n: int, in_ci: bool) -> None:
    """Cheap tests get EGRESSD_FUZZ_EXAMPLES examples (heavy ones a fifth), no deadline; CI derandomizes and keeps
    no example database."""
    register(env)
    cheap, heavy = settings.get_profile(FUZZ), settings.get_profile(FUZZ_HEAVY)
    assert (cheap.max_examples, heavy.max_examples) == (n, max(1, n // HEAVY_SHARE))
    assert cheap.deadline is None and heavy.deadline is None
    assert cheap.derandomize is in_ci and heavy.derandomize is in_ci
    if in_ci:  # (elsewhere the database is hypothesis's default, which is none when this run itself is in CI)
        assert cheap.database is None and heavy.database is None


@pytest.mark.parametrize("value", ["0", "-5", "many", "1e4"])
def test_a_budget_that_is_not_a_count_stops_the_run(value: str) -> None:
    """A value that is not a positive whole number is a usage error naming the variable and an example."""
    with pytest.raises(pytest.UsageError, match="EGRESSD_FUZZ_EXAMPLES=.*e.g. EGRESSD_FUZZ_EXAMPLES=5000"):
        examples({"EGRESSD_FUZZ_EXAMPLES": value})
