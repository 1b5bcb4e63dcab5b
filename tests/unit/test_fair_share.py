"""The fair share of one model among tenants (serving.fair_share), with no Ray and no model:
threads stand in for restores and a fake clock for the time they use."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pfstorer.deadline import CancelledError, Deadline
from serving.fair_share import FairShare, RunQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _worker(share: FairShare, tenant: str, batches: int, log: list[str], clock: Clock) -> threading.Thread:
    """A restore of ``batches`` tile batches, each one second of model time."""

    def run() -> None:
        with share.lease([tenant]) as lease:
            for _ in range(batches):
                lease.check()
                clock.now += 1.0
                log.append(tenant)

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_small_request_overtakes_a_long_one_between_tile_batches() -> None:
    clock, log = Clock(), []
    share = FairShare(credit_s=2.0, clock=clock)
    small: list[threading.Thread] = []

    def big() -> None:
        with share.lease(["big"]) as lease:
            for i in range(20):
                if i == 10:  # another tenant's small request arrives mid-way
                    small.append(_worker(share, "small", 3, log, clock))
                    _wait_until(lambda: len(share._waiting) == 1)
                lease.check()
                clock.now += 1.0
                log.append("big")

    tb = threading.Thread(target=big)
    tb.start()
    tb.join(10)
    small[0].join(10)
    # it takes the model at the next tile batch and keeps it to its end (3 s of work, 2 s credit:
    # it starts 2 s behind the big tenant's 10 s and only passes it on its last batch)
    assert log == ["big"] * 10 + ["small"] * 3 + ["big"] * 10
    assert share.handovers == 1


def test_two_busy_tenants_alternate_and_get_equal_time() -> None:
    clock, log = Clock(), []
    share = FairShare(credit_s=0.0, clock=clock)
    lock = share.lease(["x"]).__enter__()  # hold the model while both queue up
    a = _worker(share, "a", 10, log, clock)
    b = _worker(share, "b", 10, log, clock)
    _wait_until(lambda: len(share._waiting) == 2)
    lock.__exit__(None, None, None)
    a.join(10)
    b.join(10)
    assert sorted(log) == ["a"] * 10 + ["b"] * 10
    # while both run, neither is ever more than one batch ahead of the other
    ahead = 0
    for who in log[:19]:
        ahead += 1 if who == "a" else -1
        assert abs(ahead) <= 1, log


def test_usage_of_a_newcomer_is_clamped_to_credit() -> None:
    clock = Clock()
    share = FairShare(credit_s=3.0, clock=clock)
    busy = share.lease(["busy"])
    busy.__enter__()
    clock.now += 100.0
    busy.check()  # charged: 100 s
    assert share.usage(["busy"]) == pytest.approx(100.0)
    waiter = threading.Thread(target=lambda: share.lease(["late"]).__enter__().__exit__(None, None, None))
    waiter.start()
    _wait_until(lambda: len(share._waiting) == 1)
    assert share.usage(["late"]) == pytest.approx(97.0)  # 100 - credit, not 0
    busy.__exit__(None, None, None)
    waiter.join(10)
    assert not share._active and not share._used  # nobody busy: all forgotten


def test_a_cancelled_request_stops_waiting_for_the_model() -> None:
    share = FairShare()
    holder = share.lease(["a"]).__enter__()
    deadline = Deadline()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            with share.lease(["b"], deadline):
                pass
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    _wait_until(lambda: len(share._waiting) == 1)
    deadline.cancel()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], CancelledError)
    assert not share._waiting and share._active == {"a": 1}
    holder.__exit__(None, None, None)
    with share.lease(["c"]):  # the model is free again
        pass


def test_run_queue_runs_one_request_per_tenant_and_keeps_people_within_slots() -> None:
    async def main() -> list[str]:
        share = FairShare()
        q = RunQueue(share, slots=2)
        events: list[str] = []
        release = {name: asyncio.Event() for name in ("a1", "a2", "b1", "c1")}

        async def request(name: str, tenant: str, person: str) -> None:
            async with q.start([tenant], [person]):
                events.append(f"start {name}")
                await release[name].wait()
            events.append(f"end {name}")

        tasks = [asyncio.create_task(request("a1", "a", "a/p")),
                 asyncio.create_task(request("a2", "a", "a/q")),
                 asyncio.create_task(request("b1", "b", "b/p")),
                 asyncio.create_task(request("c1", "c", "c/p"))]
        await asyncio.sleep(0.01)
        assert events == ["start a1", "start b1"]  # a2: a's second; c1: no third slot
        assert q.people == {"a/p", "b/p"} and q.waiting == 2
        release["b1"].set()
        await asyncio.sleep(0.01)
        assert events[-1] == "start c1"  # b's slot freed; a2 still waits for a1
        release["a1"].set()
        await asyncio.sleep(0.01)
        assert events[-1] == "start a2"
        release["a2"].set()
        release["c1"].set()
        await asyncio.gather(*tasks)
        assert q.running == 0 and q.people == frozenset()
        return events

    asyncio.run(main())


def test_run_queue_forgets_a_cancelled_waiter() -> None:
    async def main() -> None:
        q = RunQueue(FairShare(), slots=1)
        hold = asyncio.Event()

        async def first() -> None:
            async with q.start(["a"], ["a/p"]):
                await hold.wait()

        t1 = asyncio.create_task(first())
        await asyncio.sleep(0.01)

        async def second() -> None:
            async with q.start(["b"], ["b/p"]):
                pass

        t2 = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        assert q.waiting == 1
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert q.waiting == 0
        hold.set()
        await t1
        assert q.running == 0

    asyncio.run(main())
