"""The proxy's endpoint table (proxy/endpoints.py) against a module played in memory,
plus the error pages and upstream-error mapping the table's failures turn into."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest

from module.messages import AppState, Endpoint, EndpointFailed, NeedApp
from proxy.endpoints import EndpointTable
from proxy.error_pages import render
from proxy.errors import (
    BadGateway,
    GatewayTimeout,
    NotFound,
    ProxyError,
    Unavailable,
    from_upstream,
)

EP1 = Endpoint(101, 30001, "tok1")
EP2 = Endpoint(102, 30002, "tok2")


class FakeModule:
    """Plays the module's part: records what the table sends and answers with AppStates."""

    def __init__(self) -> None:
        self.sent: list[NeedApp | EndpointFailed] = []
        self.on_need: Callable[[EndpointTable, NeedApp], None] | None = None
        self.table = EndpointTable(self.send)

    def send(self, message: NeedApp | EndpointFailed) -> None:
        self.sent.append(message)
        if isinstance(message, NeedApp) and self.on_need is not None:
            self.on_need(self.table, message)

    def needs(self) -> int:
        return sum(isinstance(m, NeedApp) for m in self.sent)

    def requests(self) -> list[NeedApp | EndpointFailed]:
        """What was sent, without usage reports (counters, not requests)."""
        return [m for m in self.sent if isinstance(m, NeedApp | EndpointFailed)]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def test_ready_takes_least_busy_endpoint_and_release_frees_it() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        table.update(AppState("shop", 1, "ready", endpoints=(EP1, EP2)))
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
        module.table.update(AppState("shop", 1, "ready", endpoints=(EP1,)))
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
        table.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            table.update(AppState("shop", 3, "starting"))  # progress, still not ready
            await asyncio.sleep(0.02)
            table.update(AppState("shop", 4, "ready", endpoints=(EP1,)))

        task = asyncio.ensure_future(later())
        lease = await table.acquire("shop", 2.0)
        await task
        assert lease.endpoint == EP1
        assert module.requests() == [NeedApp("shop")]

    run(main())


def test_need_answered_at_once_with_ready() -> None:
    async def main() -> None:
        module = FakeModule()
        module.table.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "ready", endpoints=(EP2,)))
        lease = await module.table.acquire("shop", 1.0)
        assert lease.endpoint == EP2
        assert module.needs() == 1

    run(main())


def test_newer_failed_state_is_502_with_reason() -> None:
    async def main() -> None:
        module = FakeModule()
        table = module.table
        table.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", 2, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            table.update(AppState("shop", 3, "failed", reason="exited with status 3",
                                  detail="Traceback: boom"))

        task = asyncio.ensure_future(later())
        with pytest.raises(BadGateway) as info:
            await table.acquire("shop", 2.0)
        await task
        assert info.value.status == 502
        # the module's reason and output travel with the error (the page shows the
        # exit status and output only with detailed_errors, SPEC 7)
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
        table.update(AppState("shop", 5, "failed", reason="exited with status 1"))
        module.on_need = lambda t, m: t.update(AppState("shop", 6, "starting"))

        async def later() -> None:
            await asyncio.sleep(0.02)
            table.update(AppState("shop", 7, "ready", endpoints=(EP1,)))

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
        module.table.update(AppState("shop", 4, "backoff", retry_at=retry_at, reason="crashed"))
        with pytest.raises(Unavailable) as info:
            await module.table.acquire("shop", 1.0)
        assert info.value.status == 503
        assert info.value.retry_after == math.ceil(retry_at - time.monotonic()) == 8
        assert module.requests() == []

    run(main())


def test_backoff_in_past_asks_module_again() -> None:
    async def main() -> None:
        module = FakeModule()
        module.table.update(AppState("shop", 4, "backoff", retry_at=time.monotonic() - 1))
        module.on_need = lambda t, m: t.update(AppState("shop", 5, "ready", endpoints=(EP1,)))
        lease = await module.table.acquire("shop", 1.0)
        assert lease.endpoint == EP1
        assert module.needs() == 1

    run(main())


def test_need_answered_with_backoff_is_503() -> None:
    async def main() -> None:
        module = FakeModule()
        module.table.update(AppState("shop", 1, "failed"))
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
        module.table.update(AppState("shop", 2, "offline", offline_body=body))
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
        table.update(AppState("shop", 5, "ready", endpoints=(EP1,)))
        table.update(AppState("shop", 4, "failed", reason="old news"))
        state = table.state("shop")
        assert state is not None and state.version == 5 and state.state == "ready"
        lease = await table.acquire("shop", 1.0)
        assert lease.endpoint == EP1
        assert module.requests() == []

    run(main())


def test_wait_limit_exceeded_is_502() -> None:
    async def main() -> None:
        module = FakeModule()
        module.table.update(AppState("shop", 1, "stopped"))
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
        table.update(AppState("shop", 1, "stopped"))
        module.on_need = lambda t, m: t.update(AppState("shop", t.state("shop").version + 1, "starting"))
        waiters = [asyncio.ensure_future(table.acquire("shop", 2.0)) for _ in range(3)]
        await asyncio.sleep(0.02)
        asked = module.needs()
        assert 1 <= asked <= 3  # at most once per request (an idempotent hint)
        table.update(AppState("shop", 9, "starting"))
        await asyncio.sleep(0.02)
        table.update(AppState("shop", 10, "ready", endpoints=(EP1, EP2)))
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
        (asyncio.TimeoutError(), 504),  # noqa: UP041 - the name aiohttp raises
        (TimeoutError(), 504),
        (aiohttp.ServerTimeoutError("slow"), 504),
        (aiohttp.ServerDisconnectedError(), 502),
        (ConnectionRefusedError(111, "refused"), 502),
        (ConnectionResetError(104, "reset"), 502),
        (aiohttp.ClientPayloadError("bad chunk"), 502),
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
    assert "closed" in from_upstream(aiohttp.ServerDisconnectedError(), "shop", 1).message
    original = Unavailable("queue full")
    assert from_upstream(original, "shop", 1) is original
