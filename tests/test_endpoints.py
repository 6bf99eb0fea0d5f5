"""The proxy's endpoint table (proxy/endpoints.py) against a module played in memory,
plus the error pages and upstream-error mapping the table's failures turn into."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from bastion.module.messages import (
    AppState,
    Endpoint,
    EndpointFailed,
    FromProxy,
    NeedApp,
    SlotFreed,
    SlotWanted,
)
from bastion.proxy.control.slots import Answer, SlotGranter
from bastion.proxy.edge.endpoints import EndpointTable, QueueLimits
from bastion.proxy.edge.error_pages import render
from bastion.proxy.edge.errors import (
    BadGateway,
    ConnectRefused,
    GatewayTimeout,
    NotFound,
    ProxyError,
    Unavailable,
    from_upstream,
)
from bastion.proxy.edge.upstream import Closed, ConnectFailed, InvalidResponse, UpstreamBroken

EP1 = Endpoint(101, 30001, "tok1")
EP2 = Endpoint(102, 30002, "tok2")


class FakeModule:
    """Plays the main process: the module's part (records what the table sends, answers
    ``NeedApp`` through ``on_need``) and the slot granter (a real ``SlotGranter``).

    ``update`` publishes a state the way the main process does: to the worker's table
    first, then to the granter. The granter answers in the same loop, as with
    ``workers: 1``; with ``round_trip`` its answers arrive on a later loop turn, as
    from the main process over the channel to a worker process.
    """

    def __init__(self, limits: dict[str, QueueLimits] | None = None,
                 round_trip: bool = False) -> None:
        self.sent: list[FromProxy] = []
        self.on_need: Callable[[FakeModule, NeedApp], None] | None = None
        self.table = EndpointTable(self.send, limits, worker=1)
        self.granter = SlotGranter(limits)
        self.round_trip = round_trip

    def send(self, message: FromProxy) -> None:
        self.sent.append(message)
        if isinstance(message, NeedApp) and self.on_need is not None:
            self.on_need(self, message)
        elif isinstance(message, SlotWanted | SlotFreed):
            self.answer(self.granter.handle(message))

    def answer(self, answers: list[Answer]) -> None:
        for worker, message in answers:
            assert worker == 1
            if self.round_trip:
                asyncio.get_running_loop().call_soon(self.table.deliver, message)
            else:
                self.table.deliver(message)

    def update(self, state: AppState) -> None:
        self.table.update(state)
        self.answer(self.granter.update(state))

    def state(self, app: str) -> AppState | None:
        return self.table.state(app)

    def needs(self) -> int:
        return sum(isinstance(m, NeedApp) for m in self.sent)

    def requests(self) -> list[FromProxy]:
        """What was sent to the module (no usage reports, no slot messages)."""
        return [m for m in self.sent if isinstance(m, NeedApp | EndpointFailed)]

    def slots(self) -> list[FromProxy]:
        """The slot messages sent."""
        return [m for m in self.sent if isinstance(m, SlotWanted | SlotFreed)]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def test_ready_takes_least_busy_endpoint_and_release_frees_it() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 1, "ready", endpoints=(EP1, EP2)))
        a = await table.acquire("shop", 1.0)
        b = await table.acquire("shop", 1.0)
        assert {a.endpoint.pid, b.endpoint.pid} == {101, 102}
        a.release()
        c = await table.acquire("shop", 1.0)
        assert c.endpoint.pid == a.endpoint.pid  # the freed one is least busy
        assert table.counters("shop")[a.endpoint.pid] == (1, 2)
        assert table.counters("shop")[b.endpoint.pid] == (1, 1)
        c.release()
        c.release()  # idempotent
        assert table.counters("shop")[a.endpoint.pid] == (0, 2)
        assert module.requests() == []

    run(main())


def test_lease_failed_sends_endpoint_failed() -> None:
    async def main() -> None:
        module = FakeModule()
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        lease = await module.table.acquire("shop", 1.0)
        lease.failed("refused")
        assert module.requests() == [EndpointFailed("shop", 101, "refused")]

    run(main())


def test_unknown_app_is_502() -> None:
    async def main() -> None:
        with pytest.raises(BadGateway):
            await FakeModule().table.acquire("nope", 0.1)

    run(main())


def test_stopped_app_sends_need_once_and_waits_for_ready() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            module.update(AppState("shop", 3, "starting"))  # progress, still not ready
            await asyncio.sleep(0.02)
            module.update(AppState("shop", 4, "ready", endpoints=(EP1,)))

        task = asyncio.ensure_future(later())
        lease = await table.acquire("shop", 2.0)
        await task
        assert lease.endpoint == EP1
        assert module.requests() == [NeedApp("shop")]

    run(main())


def test_need_answered_at_once_with_ready() -> None:
    async def main() -> None:
        module = FakeModule()
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "ready", endpoints=(EP2,)))
        lease = await module.table.acquire("shop", 1.0)
        assert lease.endpoint == EP2
        assert module.needs() == 1

    run(main())


def test_newer_failed_state_is_502_with_reason() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            module.update(AppState("shop", 3, "failed", reason="exited with status 3",
                                  detail="Traceback: boom"))

        task = asyncio.ensure_future(later())
        with pytest.raises(BadGateway) as info:
            await table.acquire("shop", 2.0)
        await task
        assert info.value.status == 502
        # the module's reason and output travel with the error (the page shows the
        # exit status and output only with detailed_errors)
        told = f"{info.value.message}\n{info.value.detail}"
        assert "exited with status 3" in told
        assert "Traceback: boom" in info.value.detail
        assert info.value.app == "shop"
        assert module.needs() == 1

    run(main())


def test_older_failed_state_triggers_need_not_502() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 5, "failed", reason="exited with status 1"))
        module.on_need = lambda t, m: t.update(AppState("shop", 6, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            module.update(AppState("shop", 7, "ready", endpoints=(EP1,)))

        task = asyncio.ensure_future(later())
        lease = await table.acquire("shop", 2.0)
        await task
        assert lease.endpoint == EP1
        assert module.requests() == [NeedApp("shop")]

    run(main())


def test_backoff_in_future_is_503_with_retry_after() -> None:
    async def main() -> None:
        module = FakeModule()
        retry_at = time.monotonic() + 7.3
        module.update(AppState("shop", 4, "backoff", retry_at=retry_at, reason="crashed"))
        with pytest.raises(Unavailable) as info:
            await module.table.acquire("shop", 1.0)
        assert info.value.status == 503
        assert info.value.retry_after == math.ceil(retry_at - time.monotonic()) == 8
        assert module.requests() == []

    run(main())


def test_backoff_in_past_asks_module_again() -> None:
    async def main() -> None:
        module = FakeModule()
        module.update(AppState("shop", 4, "backoff", retry_at=time.monotonic() - 1))
        module.on_need = lambda t, m: t.update(AppState("shop", 5, "ready", endpoints=(EP1,)))
        lease = await module.table.acquire("shop", 1.0)
        assert lease.endpoint == EP1
        assert module.needs() == 1

    run(main())


def test_need_answered_with_backoff_is_503() -> None:
    async def main() -> None:
        module = FakeModule()
        module.update(AppState("shop", 1, "failed"))
        module.on_need = lambda t, m: t.update(
            AppState("shop", 2, "backoff", retry_at=time.monotonic() + 30))
        with pytest.raises(Unavailable) as info:
            await module.table.acquire("shop", 1.0)
        assert info.value.retry_after is not None and 29 <= info.value.retry_after <= 30

    run(main())


def test_offline_is_503_with_body() -> None:
    async def main() -> None:
        module = FakeModule()
        body = "<html>back soon</html>"
        module.update(AppState("shop", 2, "offline", offline_body=body))
        with pytest.raises(Unavailable) as info:
            await module.table.acquire("shop", 1.0)
        assert info.value.status == 503
        assert info.value.body == body
        assert render(info.value, detailed=False) == body
        assert module.requests() == []

    run(main())


def test_out_of_order_older_update_is_ignored() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 5, "ready", endpoints=(EP1,)))
        module.update(AppState("shop", 4, "failed", reason="old news"))
        state = table.state("shop")
        assert state is not None and state.version == 5 and state.state == "ready"
        lease = await table.acquire("shop", 1.0)
        assert lease.endpoint == EP1
        assert module.requests() == []

    run(main())


def test_wait_limit_exceeded_is_502() -> None:
    async def main() -> None:
        module = FakeModule()
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "starting"))
        started = time.monotonic()
        with pytest.raises(BadGateway) as info:
            await module.table.acquire("shop", 0.1)
        assert 0.09 <= time.monotonic() - started < 1.0
        assert "in time" in info.value.message
        assert module.needs() == 1

    run(main())


def test_waiters_are_woken_by_every_update() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", t.state("shop").version + 1, "starting"))
        waiters = [asyncio.ensure_future(table.acquire("shop", 2.0)) for _ in range(3)]
        await asyncio.sleep(0.02)
        asked = module.needs()
        assert 1 <= asked <= 3  # at most once per request (an idempotent hint)
        module.update(AppState("shop", 9, "starting"))
        await asyncio.sleep(0.02)
        module.update(AppState("shop", 10, "ready", endpoints=(EP1, EP2)))
        leases = await asyncio.gather(*waiters)
        assert sorted(lease.endpoint.pid for lease in leases) == [101, 101, 102]
        assert module.needs() == asked  # woken by updates, none asked again

    run(main())


# -- error pages ---------------------------------------------------------------------


def test_render_hides_detail_unless_detailed() -> None:
    error = BadGateway("the app 'shop' failed to start", app="shop", detail="SECRET output line")
    plain = render(error, detailed=False)
    assert "502 Bad Gateway" in plain
    assert "shop" in plain
    assert "SECRET" not in plain
    detailed = render(error, detailed=True)
    assert "<pre>SECRET output line</pre>" in detailed


def test_render_escapes_html() -> None:
    error = BadGateway("app <script>x</script>", app="<b>", detail="<img src=x onerror=1>")
    page = render(error, detailed=True)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=1&gt;" in page


def test_render_without_app_hides_internal_message_for_5xx() -> None:
    page = render(ProxyError("internal /etc/secret path"), detailed=False)
    assert "secret" not in page
    assert "500 Internal Server Error" in page
    assert "no such page" in render(NotFound("no such page"), detailed=False)


def test_render_app_offline_body_verbatim_even_detailed() -> None:
    body = "<h1>Maintenance</h1><script>ok()</script>"
    error = Unavailable("offline", app="shop", body=body, detail="x")
    assert render(error, detailed=True) == body


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (asyncio.TimeoutError(), 504),  # noqa: UP041 - the name asyncio raises
        (TimeoutError(), 504),
        (Closed("closed before answering", early=True), 502),
        (ConnectFailed("cannot connect"), 502),
        (ConnectionRefusedError(111, "refused"), 502),
        (ConnectionResetError(104, "reset"), 502),
        (UpstreamBroken("bad chunk"), 502),
        (InvalidResponse("invalid status code 999"), 502),
        (RuntimeError("odd"), 502),
    ],
)
def test_from_upstream_maps_statuses(exc: BaseException, status: int) -> None:
    error = from_upstream(exc, "shop", 12.0)
    assert error.status == status
    assert error.app == "shop"
    if status == 504:
        assert isinstance(error, GatewayTimeout) and "12s" in error.message


def test_from_upstream_refused_message_and_proxy_error_passthrough() -> None:
    assert "refused" in from_upstream(ConnectionRefusedError(), "shop", 1).message
    assert "refused" in from_upstream(ConnectFailed("no"), "shop", 1).message
    assert isinstance(from_upstream(ConnectFailed("no"), "shop", 1), ConnectRefused)
    assert "closed" in from_upstream(Closed("gone", early=False), "shop", 1).message
    assert "invalid" in from_upstream(InvalidResponse("bad"), "shop", 1).message
    original = Unavailable("queue full")
    assert from_upstream(original, "shop", 1) is original


def test_queue_wait_limit_exceeded_while_ready_is_503_with_retry_after() -> None:
    """Queued behind busy processes of a ready app for too long: it never reached the
    app, so 503 + Retry-After (HAProxy's ``timeout queue``), not 504."""
    async def main() -> None:
        module = FakeModule(limits={"shop": QueueLimits(max_concurrency=1)})
        table = module.table
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        busy = await table.acquire("shop", 1.0)
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await table.acquire("shop", 0.1)
        assert 0.09 <= time.monotonic() - started < 1.0
        assert info.value.status == 503
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        assert "queue" in info.value.message
        busy.release()
        again = await table.acquire("shop", 1.0)  # the timed-out waiter took no slot
        assert again.endpoint == EP1
        assert module.requests() == []

    run(main())


# -- shared limits: slots from the main process's granter -----------------------------

LIMIT_ONE = {"shop": QueueLimits(max_concurrency=1, max_queue=1)}


@pytest.mark.parametrize("round_trip", [False, True], ids=["same-loop", "round-trip"])
def test_limited_app_takes_slots_from_the_granter(round_trip: bool) -> None:
    async def main() -> None:
        module = FakeModule(LIMIT_ONE, round_trip=round_trip)
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        first = await module.table.acquire("shop", 1.0)
        assert first.endpoint == EP1 and first.ticket is not None
        assert module.slots() == [SlotWanted("shop", 1, first.ticket)]
        second = asyncio.ensure_future(module.table.acquire("shop", 2.0))
        await asyncio.sleep(0.05)
        assert not second.done()  # EP1 is at max_concurrency: it waits
        assert module.granter.in_flight("shop") == {101: 1}
        first.release()
        lease = await asyncio.wait_for(second, 1.0)
        assert lease.endpoint == EP1
        assert module.table.counters("shop")[101] == (1, 2)
        lease.release()
        lease.release()  # idempotent: one SlotFreed
        assert module.slots()[-1] == SlotFreed("shop", 1, lease.ticket)  # type: ignore[arg-type]
        assert sum(isinstance(m, SlotFreed) for m in module.slots()) == 2
        assert module.granter.in_flight("shop") == {}
        assert module.requests() == []

    run(main())


def test_try_acquire_serves_at_once_only_without_a_limit_or_a_wait() -> None:
    async def main() -> None:
        module = FakeModule({"shop": QueueLimits(0, 10), "one": QueueLimits(1, 10)})
        module.update(AppState("shop", 1, "ready", endpoints=(EP1, EP2)))
        module.update(AppState("one", 1, "ready", endpoints=(EP1,)))
        a = module.table.try_acquire("shop")
        b = module.table.try_acquire("shop")
        assert a is not None and b is not None
        assert {a.endpoint.pid, b.endpoint.pid} == {101, 102}  # least busy
        assert a.ticket is None and module.sent == []  # no message at all
        a.release()
        assert module.slots() == []
        assert module.table.try_acquire("one") is None  # a limit: slots come from main
        module.update(AppState("shop", 2, "stopped"))
        assert module.table.try_acquire("shop") is None  # not ready: acquire starts it
        assert module.sent == []  # nothing asked yet: that is acquire's job
        module.update(AppState("shop", 3, "offline", offline_body="<p>later</p>"))
        with pytest.raises(Unavailable) as offline:
            module.table.try_acquire("shop")
        assert offline.value.body == "<p>later</p>"
        module.update(AppState("shop", 4, "backoff", retry_at=time.time() + 5))
        with pytest.raises(Unavailable) as resting:
            module.table.try_acquire("shop")
        assert resting.value.retry_after is not None and resting.value.retry_after >= 4
        with pytest.raises(BadGateway):
            module.table.try_acquire("nope")

    run(main())


@pytest.mark.parametrize("round_trip", [False, True], ids=["same-loop", "round-trip"])
def test_queue_full_in_the_granter_is_503_at_once(round_trip: bool) -> None:
    async def main() -> None:
        module = FakeModule(LIMIT_ONE, round_trip=round_trip)
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        held = await module.table.acquire("shop", 1.0)
        waiting = asyncio.ensure_future(module.table.acquire("shop", 5.0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await module.table.acquire("shop", 5.0)  # max_queue 1: one waits already
        assert time.monotonic() - started < 0.5
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        held.release()
        (await waiting).release()
        assert module.granter.in_flight("shop") == {}

    run(main())


@pytest.mark.parametrize("round_trip", [False, True], ids=["same-loop", "round-trip"])
def test_waiter_that_times_out_withdraws_its_ticket(round_trip: bool) -> None:
    async def main() -> None:
        module = FakeModule({"shop": QueueLimits(1, 5)}, round_trip=round_trip)
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        held = await module.table.acquire("shop", 1.0)
        with pytest.raises(Unavailable):
            await module.table.acquire("shop", 0.05)
        assert module.granter.waiting("shop") == []
        held.release()
        assert module.granter.in_flight("shop") == {}  # nobody got the slot meanwhile

    run(main())


def test_cancelled_waiter_gives_back_a_slot_granted_meanwhile() -> None:
    async def main() -> None:
        module = FakeModule({"shop": QueueLimits(1, 5)}, round_trip=True)
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        held = await module.table.acquire("shop", 1.0)
        waiting = asyncio.ensure_future(module.table.acquire("shop", 5.0))
        await asyncio.sleep(0.01)
        held.release()  # the grant for the waiter is on its way...
        waiting.cancel()  # ...and the client goes away before it arrives
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.01)
        assert module.granter.in_flight("shop") == {}
        assert module.granter.waiting("shop") == []
        assert module.table.counters("shop")[101] == (0, 2)
        again = await asyncio.wait_for(module.table.acquire("shop", 1.0), 0.5)
        assert again.endpoint == EP1

    run(main())


@pytest.mark.parametrize("round_trip", [False, True], ids=["same-loop", "round-trip"])
def test_app_going_offline_fails_slot_waiters_and_withdraws_their_tickets(
        round_trip: bool) -> None:
    async def main() -> None:
        module = FakeModule({"shop": QueueLimits(1, 5)}, round_trip=round_trip)
        module.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
        held = await module.table.acquire("shop", 1.0)
        waiters = [asyncio.ensure_future(module.table.acquire("shop", 5.0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert len(module.granter.waiting("shop")) == 3
        module.update(AppState("shop", 2, "offline", offline_body="<p>down</p>"))
        for waiter in waiters:
            with pytest.raises(Unavailable) as info:
                await waiter
            assert info.value.body == "<p>down</p>"
        assert module.granter.waiting("shop") == []
        held.release()
        await asyncio.sleep(0.01)
        assert module.granter.in_flight("shop") == {}

    run(main())


def test_requests_waiting_for_a_start_count_against_max_queue() -> None:
    async def main() -> None:
        module = FakeModule({"shop": QueueLimits(0, 1)})
        module.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda m, _: m.update(AppState("shop", 2, "starting"))
        first = asyncio.ensure_future(module.table.acquire("shop", 5.0))
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await module.table.acquire("shop", 5.0)
        module.update(AppState("shop", 3, "ready", endpoints=(EP1,)))
        lease = await asyncio.wait_for(first, 1.0)
        assert lease.endpoint == EP1 and lease.ticket is not None
        lease.release()
        assert module.granter.in_flight("shop") == {}
        # Ready, no limit: the fast path again, no slot.
        assert (await module.table.acquire("shop", 1.0)).ticket is None

    run(main())
