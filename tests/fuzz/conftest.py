"""The fuzzing budget: two hypothesis profiles that every test in this directory runs under.

``egressd-fuzz`` is the profile of the cheap targets (parsers over bytes and text);
``egressd-fuzz-heavy`` runs a fifth as many examples, for the tests whose every
example writes files, signs a token or drives the DNS filter. A test takes one
of them by name (``@settings.get_profile(FUZZ)``); neither is loaded as the
default, so the rest of the suite keeps its own settings.

* ``EGRESSD_FUZZ_EXAMPLES`` (default :data:`DEFAULT_EXAMPLES`) is the examples per
  cheap test; the default keeps the whole directory near a minute on two cores.
  Set it to fuzz longer locally, e.g. ``EGRESSD_FUZZ_EXAMPLES=10000 bash tests/run
  tests/fuzz -q`` (about ten minutes).
* With ``CI`` set (any non-empty value) examples are derandomized (the same ones on
  every run, so a failure in CI fails again on a rerun and locally with ``CI=1``)
  and hypothesis keeps no example database; elsewhere each run draws new examples
  and remembers failing ones in ``.hypothesis/``.
* ``deadline=None`` everywhere: slow examples are a benchmark's business; bounded
  work is asserted through input sizes (``tests/fuzz/README.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES_ENV = "EGRESSD_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 1000
HEAVY_SHARE = 5  # a heavy test runs 1/HEAVY_SHARE of the examples
FUZZ = "egressd-fuzz"
FUZZ_HEAVY = "egressd-fuzz-heavy"


def examples(env: Mapping[str, str] = os.environ) -> int:
    """The examples per cheap test: ``EGRESSD_FUZZ_EXAMPLES``, else :data:`DEFAULT_EXAMPLES`."""
    text = env.get(EXAMPLES_ENV, "").strip()
    if not text:
        return DEFAULT_EXAMPLES
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"{EXAMPLES_ENV}={text!r} is not a positive whole number; set e.g. "
                                f"{EXAMPLES_ENV}=5000 to fuzz longer, or unset it for the CI budget")
    return int(text)


def register(env: Mapping[str, str] = os.environ) -> None:
    """Register the two profiles for the budget ``env`` asks for."""
    in_ci = bool(env.get("CI"))
    common = {
        "deadline": None,
        "derandomize": in_ci,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    }
    if in_ci:
        common["database"] = None
    n = examples(env)
    settings.register_profile(FUZZ, max_examples=n, **common)
    settings.register_profile(FUZZ_HEAVY, max_examples=max(1, n // HEAVY_SHARE), **common)


register()
