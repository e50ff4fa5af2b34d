"""The limits' parts on their own: the head slots that push out the heaviest client, the per-client token bucket."""

from __future__ import annotations

import asyncio

import pytest

from egressd.limits import LIMITS, HeadSlots, LimitExceeded, RateLimiter, flag, heaviest
from harness import Clock


class FakeSide:
    """Stands in for a client connection: the slots only abort it."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()

    def abort(self) -> None:
        self.aborted.set()


def test_every_limit_has_a_flag_of_its_name():
    assert [flag(limit) for limit in LIMITS] == [
        "--max-connections", "--max-connections-per-client", "--max-pending-heads", "--max-pending-lookups",
        "--max-addresses-per-name", "--dns-max-qps-per-client", "--dns-max-tcp-connections",
    ]


def test_heaviest_is_the_largest_group_and_the_first_of_a_tie():
    assert heaviest({"a": [1], "b": [1, 2], "c": [1, 2]}) == "b"


def test_head_slots_reset_the_oldest_head_of_the_client_with_the_most():
    """At the limit a new head takes the slot of the oldest head of the heaviest client, whose read raises
    LimitExceeded; the others' heads go on and end as they end."""

    async def go():
        clock = Clock()
        slots = HeadSlots(3, clock)
        sides = {name: FakeSide() for name in ("a1", "a2", "b1", "c1")}
        reads = {}
        for name, ip in (("a1", "10.0.0.1"), ("b1", "10.0.0.2"), ("a2", "10.0.0.1")):
            reads[name] = asyncio.create_task(slots.reading(sides[name], ip, sides[name].aborted.wait()))
            await asyncio.sleep(0)
            clock.now += 1.0
        assert len(slots) == 3
        reads["c1"] = asyncio.create_task(slots.reading(sides["c1"], "10.0.0.3", asyncio.sleep(0, "hello")))
        assert await reads["c1"] == "hello"  # served: its head came whole
        assert sides["a1"].aborted.is_set() and not sides["a2"].aborted.is_set() and not sides["b1"].aborted.is_set()
        with pytest.raises(LimitExceeded) as refused:
            await reads["a1"]
        assert refused.value.limit == "max_pending_heads" and refused.value.status == 503
        assert "incomplete after 3.0s while 3 heads were arriving, 2 of them from 10.0.0.1" in str(refused.value)
        assert len(slots) == 2  # a2 and b1 still arriving
        for name in ("a2", "b1"):
            sides[name].abort()
            assert await reads[name] is True
        assert len(slots) == 0

    asyncio.run(go())


def test_a_head_that_fails_by_itself_raises_its_own_error():
    async def go():
        slots = HeadSlots(1)

        async def bad():
            raise ValueError("not a head")

        with pytest.raises(ValueError, match="not a head"):
            await slots.reading(FakeSide(), "10.0.0.1", bad())
        assert len(slots) == 0

    asyncio.run(go())


def test_rate_limiter_allows_a_burst_of_two_seconds_then_the_rate():
    clock = Clock()
    rates = RateLimiter(10, clock)
    assert sum(rates.allow("a") for _ in range(25)) == 20  # the burst: 2 s worth
    assert rates.allow("b")  # another key has its own bucket
    clock.now += 0.5
    assert sum(rates.allow("a") for _ in range(10)) == 5
    clock.now += 100
    assert sum(rates.allow("a") for _ in range(25)) == 20  # never more than the burst


def test_rate_limiter_forgets_full_buckets_and_bounds_its_table():
    clock = Clock()
    rates = RateLimiter(10, clock, max_keys=4)
    for key in range(4):
        rates.allow(key)
    clock.now += 10  # every bucket has filled up again: nothing to remember
    rates.allow("new")
    assert len(rates) == 1
    for key in range(10):  # none refills: past max_keys the oldest go
        rates.allow(("x", key))
    assert len(rates) <= 4
