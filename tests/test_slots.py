"""The slot granter (proxy/slots.py): shared ``max_concurrency`` / ``max_queue``, with
plain values: no sockets, no event loop, a clock of our own."""

from __future__ import annotations

from bastion.module.messages import (
    AppState,
    Endpoint,
    SlotFreed,
    SlotGranted,
    SlotRefused,
    SlotWanted,
)
from bastion.proxy.control.slots import Answer, SlotGranter
from bastion.proxy.edge.endpoints import QueueLimits

EP1 = Endpoint(101, 30001, "tok1")
EP2 = Endpoint(102, 30002, "tok2")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def granter(concurrency: int = 1, queue: int = 100, *endpoints: Endpoint,
            clock: Clock | None = None) -> SlotGranter:
    g = SlotGranter({"shop": QueueLimits(concurrency, queue)}, clock=clock or Clock())
    if endpoints:
        assert g.update(AppState("shop", 1, "ready", endpoints=endpoints)) == []
    return g


def grants(answers: list[Answer]) -> list[tuple[int, int, int]]:
    """(worker, ticket, pid) of every grant, in order; fails on anything else."""
    out = []
    for worker, message in answers:
        assert isinstance(message, SlotGranted), message
        assert message.worker == worker
        out.append((worker, message.ticket, message.endpoint.pid))
    return out


def want(g: SlotGranter, worker: int, ticket: int) -> list[Answer]:
    return g.want(SlotWanted("shop", worker, ticket))


def free(g: SlotGranter, worker: int, ticket: int) -> list[Answer]:
    return g.free(SlotFreed("shop", worker, ticket))


def test_limit_one_grants_one_per_process_across_workers() -> None:
    g = granter(1, 100, EP1, EP2)
    assert grants(want(g, 1, 1)) == [(1, 1, 101)]
    assert grants(want(g, 2, 1)) == [(2, 1, 102)]  # another worker: the other process
    assert want(g, 1, 2) == []  # both busy: it waits
    assert want(g, 2, 2) == []
    assert g.in_flight("shop") == {101: 1, 102: 1}
    assert g.waiting("shop") == [(1, 2), (2, 2)]
    # The freed slot goes to the first waiter, whichever worker it came from.
    assert grants(free(g, 2, 1)) == [(1, 2, 102)]
    assert grants(free(g, 1, 1)) == [(2, 2, 101)]
    assert g.in_flight("shop") == {101: 1, 102: 1}
    assert g.waiting("shop") == []


def test_waiters_are_served_in_arrival_order() -> None:
    g = granter(1, 100, EP1)
    assert grants(want(g, 1, 0)) == [(1, 0, 101)]
    order = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]
    for worker, ticket in order:
        assert want(g, worker, ticket) == []
    served = []
    current = (1, 0)
    for _ in order:
        (granted,) = grants(free(g, *current))
        current = granted[:2]
        served.append(current)
    assert served == order


def test_queue_full_is_refused_counting_every_worker() -> None:
    g = granter(1, 2, EP1)
    assert grants(want(g, 1, 1)) == [(1, 1, 101)]
    assert want(g, 1, 2) == []
    assert want(g, 2, 1) == []  # 2 waiting: the queue is full, whatever the worker
    (answer,) = want(g, 3, 1)
    assert answer[0] == 3
    assert isinstance(answer[1], SlotRefused) and answer[1].ticket == 1
    assert answer[1].retry_after >= 1
    assert g.waiting("shop") == [(1, 2), (2, 1)]  # the refused one never queued
    assert grants(free(g, 1, 1)) == [(1, 2, 101)]
    assert want(g, 3, 2) == []  # room again


def test_least_busy_process_below_the_limit() -> None:
    g = granter(2, 100, EP1, EP2)
    assert [pid for _, _, pid in grants(want(g, 1, 1) + want(g, 2, 1) + want(g, 1, 2))] \
        == [101, 102, 101]
    free(g, 1, 1)  # 101 now has 1, 102 has 1
    assert grants(want(g, 2, 2)) == [(2, 2, 101)]
    assert grants(want(g, 2, 3)) == [(2, 3, 102)]
    assert want(g, 2, 4) == []  # 2 + 2: every process at max_concurrency


def test_no_limit_grants_every_want_of_a_ready_app() -> None:
    g = granter(0, 0, EP1)
    assert [pid for _, _, pid in grants(
        [a for i in range(50) for a in want(g, 1, i)])] == [101] * 50


def test_not_ready_app_queues_until_ready_then_grants_in_order() -> None:
    g = granter(1, 100)
    assert g.update(AppState("shop", 1, "starting")) == []
    for worker, ticket in [(1, 1), (2, 1), (1, 2)]:
        assert want(g, worker, ticket) == []
    assert grants(g.update(AppState("shop", 2, "ready", endpoints=(EP1, EP2)))) == [
        (1, 1, 101), (2, 1, 102)]
    assert g.waiting("shop") == [(1, 2)]
    # A crash withdraws 101; its ticket still counts until it is freed.
    assert g.update(AppState("shop", 3, "ready", endpoints=(EP2,))) == []
    assert g.in_flight("shop") == {101: 1, 102: 1}
    assert free(g, 1, 1) == []  # 101 is gone: its slot gives nobody anything
    assert g.in_flight("shop") == {102: 1}
    assert grants(free(g, 2, 1)) == [(1, 2, 102)]


def test_older_state_is_ignored() -> None:
    g = granter(1, 100)
    g.update(AppState("shop", 5, "ready", endpoints=(EP1,)))
    g.update(AppState("shop", 4, "failed"))
    assert grants(want(g, 1, 1)) == [(1, 1, 101)]


def test_failed_state_keeps_waiters_queued_for_the_next_start() -> None:
    g = granter(1, 100, EP1)
    grants(want(g, 1, 1))
    want(g, 1, 2)
    assert g.update(AppState("shop", 2, "failed")) == []
    assert free(g, 1, 1) == []  # not ready: no grant
    assert g.waiting("shop") == [(1, 2)]
    assert grants(g.update(AppState("shop", 3, "ready", endpoints=(EP2,)))) == [(1, 2, 102)]


def test_freeing_a_waiting_ticket_withdraws_it_and_free_is_idempotent() -> None:
    g = granter(1, 100, EP1)
    grants(want(g, 1, 1))
    want(g, 1, 2)
    want(g, 2, 1)
    assert free(g, 1, 2) == []  # timed out while waiting
    assert g.waiting("shop") == [(2, 1)]
    assert grants(free(g, 1, 1)) == [(2, 1, 101)]
    assert free(g, 1, 1) == []  # again: nothing
    assert free(g, 9, 9) == []  # never seen: nothing
    assert g.in_flight("shop") == {101: 1}


def test_duplicate_want_is_not_granted_twice() -> None:
    g = granter(1, 100, EP1, EP2)
    assert len(want(g, 1, 1)) == 1
    assert want(g, 1, 1) == []
    assert g.in_flight("shop") == {101: 1}


def test_dead_worker_gives_back_its_slots_and_its_queue() -> None:
    g = granter(1, 100, EP1, EP2)
    grants(want(g, 1, 1) + want(g, 2, 1))  # worker 1 on 101, worker 2 on 102
    want(g, 2, 2)
    want(g, 1, 2)
    want(g, 2, 3)
    # Worker 2 dies: 102 is free again and goes to the first waiter of another worker.
    assert grants(g.worker_gone(2)) == [(1, 2, 102)]
    assert g.waiting("shop") == []
    assert g.in_flight("shop") == {101: 1, 102: 1}
    # What was still on its way from the dead worker changes nothing.
    assert want(g, 2, 4) == []
    assert free(g, 2, 1) == []
    assert g.in_flight("shop") == {101: 1, 102: 1}
    assert g.waiting("shop") == []


def test_a_process_that_refused_is_chosen_last_for_a_moment() -> None:
    clock = Clock()
    g = granter(2, 100, EP1, EP2, clock=clock)
    g.endpoint_failed("shop", 101)
    assert [pid for _, _, pid in grants(want(g, 1, 1) + want(g, 1, 2) + want(g, 1, 3))] \
        == [102, 102, 101]  # 101 only when nothing else is below the limit
    free(g, 1, 1)
    free(g, 1, 2)
    free(g, 1, 3)
    clock.now += 2.0  # SUSPEND_FOR is over
    assert grants(want(g, 1, 4)) == [(1, 4, 101)]


def test_raised_limit_on_reload_serves_waiters() -> None:
    g = granter(1, 100, EP1)
    grants(want(g, 1, 1))
    want(g, 1, 2)
    want(g, 2, 1)
    assert grants(g.configure({"shop": QueueLimits(2, 100)})) == [(1, 2, 101)]
    assert g.waiting("shop") == [(2, 1)]


def test_unknown_app_is_refused() -> None:
    g = granter(1, 100, EP1)
    ((worker, message),) = g.want(SlotWanted("nope", 3, 1))
    assert worker == 3 and isinstance(message, SlotRefused)
