"""The hostile-input table itself: enough rows, each named once, each with an answer and a reason."""

from __future__ import annotations

from hostile import (
    test_dns_filter,
    test_explicit,
    test_explicit_tls,
    test_identity,
    test_resolution,
    test_transparent,
)

MODULES = (test_explicit, test_explicit_tls, test_resolution, test_transparent, test_dns_filter, test_identity)
ANSWERS = {"200", "400", "403", "407", "408", "431", "502", "tunnel+tls", "tunnel+closed", "tunnel+echo", "tls",
           "alert", "closed", "gone", "NOERROR", "FORMERR", "NXDOMAIN", "NOTIMP", "BADVERS", "none"}


def test_the_table_has_at_least_60_named_rows_across_the_listeners() -> None:
    """Every listener has rows, at least 60 in all, each with a unique name in its module, a known answer and
    a reason (none only for a row that leaves no record)."""
    total = 0
    for module in MODULES:
        rows = module.ROWS
        assert rows, module.__name__
        names = [row.name for row in rows]
        assert len(names) == len(set(names)), module.__name__
        for row in rows:
            assert row.answer in ANSWERS, (module.__name__, row.name, row.answer)
            assert (row.reason is None) == (row.count == 0), (module.__name__, row.name)
        total += len(rows)
    assert total >= 60
