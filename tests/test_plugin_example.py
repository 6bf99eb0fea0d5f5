"""The ``bastion`` pytest fixture (proxy/pytest_plugin.py), used the way a user would.

These tests use the fixture through the ``pytest11`` entry point (no import, no
conftest), against the sample user project in ``tests/plugin_example/`` (Starlette +
uvicorn + the integration middleware), and check the failure behaviour of the README's table
with each fault the fixture injects: kill, hang, a failed start, app_offline.htm.
If ``bastion`` is not found, reinstall the package: ``pip install -e .``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bastion.proxy.pytest_plugin import BastionFactory, BastionHandle, wait_until

PROJECT = Path(__file__).resolve().parent / "plugin_example"
SHOP = [sys.executable, "-m", "uvicorn", "--app-dir", str(PROJECT), "shop:app",
        "--host", "127.0.0.1", "--port", "{port}", "--no-access-log"]


@pytest.fixture
def shop(bastion: BastionFactory) -> BastionHandle:
    """The shop at /shop, started and answering."""
    return bastion(command=SHOP, app="shop", path="/shop", request_timeout=10,
                   warmup="/shop/")


def test_the_app_is_served_over_https_under_its_path(shop: BastionHandle) -> None:
    response = shop.get("/shop/whoami")
    assert response.status == 200, response.text
    seen = response.json()
    assert seen["scheme"] == "https"
    assert seen["home"] == f"{shop.https_url}/shop/"
    assert seen["pid"] in shop.pids("shop")
    assert shop.get("/shop/", https=False).text == "welcome to the shop\n"
    # The app's own port refuses requests that did not come through Bastion.
    port = shop.ports("shop")[0]
    import http.client
    direct = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    direct.request("GET", "/shop/")
    assert direct.getresponse().status == 400
    direct.close()


def test_kill_gives_502_to_the_request_in_flight_and_a_new_process_serves_the_next(
        shop: BastionHandle) -> None:
    old = shop.pids("shop")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(shop.get, "/shop/slow?s=8", timeout=20)
        assert wait_until(lambda: shop.in_flight("shop") >= 1, timeout=5)
        started = time.monotonic()
        assert shop.kill("shop") == old
        in_flight = slow.result(timeout=20)
        assert in_flight.status == 502, in_flight.text
        assert "shop" in in_flight.text  # the page names the app
        assert time.monotonic() - started < 5  # at once, not after request_timeout
    after = shop.get("/shop/whoami")
    assert after.status == 200, after.text
    assert after.json()["pid"] not in old
    assert shop.pids("shop") == [after.json()["pid"]]
    assert shop.app_status("shop")["restarts"] == 1


def test_hang_gives_504_after_request_timeout(bastion: BastionFactory) -> None:
    b = bastion(command=SHOP, app="shop", path="/shop", request_timeout=1.5,
                warmup="/shop/")
    pids = b.hang("shop")
    started = time.monotonic()
    response = b.get("/shop/", timeout=20)
    elapsed = time.monotonic() - started
    assert response.status == 504, response.text
    assert 1.4 <= elapsed < 6, elapsed
    b.resume("shop")
    again = b.get("/shop/whoami")
    assert again.status == 200
    assert again.json()["pid"] in pids


def test_a_failed_start_gives_502_and_the_next_request_starts_it_again(
        bastion: BastionFactory) -> None:
    b = bastion(command=SHOP, app="shop", path="/shop")  # on demand: not started yet
    b.fail_next_start("shop")
    failed = b.get("/shop/")
    assert failed.status == 502, failed.text
    assert "shop" in failed.text
    assert b.pids("shop") == []
    recovered = b.get("/shop/")
    assert recovered.status == 200, recovered.text
    assert recovered.text == "welcome to the shop\n"


def test_a_crash_followed_by_a_failed_restart_recovers(shop: BastionHandle) -> None:
    shop.fail_next_start("shop")
    old = shop.kill("shop")
    assert shop.get("/shop/").status == 502
    response = shop.get("/shop/whoami")
    assert response.status == 200, response.text
    assert response.json()["pid"] not in old


def test_offline_gives_503_with_the_page_and_online_serves_again(shop: BastionHandle) -> None:
    page = "<html><body><h1>Back in five minutes</h1></body></html>"
    old = shop.pids("shop")
    shop.offline("shop", html=page)
    response = shop.get("/shop/whoami")
    assert response.status == 503
    assert response.text == page
    assert shop.pids("shop") == []  # the app was stopped
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in old))
    shop.online("shop")
    back = shop.get("/shop/whoami")
    assert back.status == 200, back.text
    assert back.json()["pid"] not in old


# -- the plugin's own guarantees ----------------------------------------------------------
def test_loading_the_plugin_imports_nothing_heavy() -> None:
    import subprocess

    code = ("import sys, bastion.proxy.pytest_plugin; "
            "heavy = {'psutil', 'trustme', 'yaml', 'aiohttp', 'cryptography',"
            " 'bastion.proxy.control.devcert', 'bastion.proxy.control.main',"
            " 'bastion.module'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout.strip() == "[]"


def test_the_shim_fails_once_then_execs(tmp_path: Path) -> None:
    import subprocess

    flag = tmp_path / "flag"
    flag.write_text("x")
    argv = [sys.executable, "-m", "bastion.proxy.pytest_plugin_shim", str(flag), "--",
            sys.executable, "-c", "import os; print(os.getpid())"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert first.returncode == 1
    assert "fail_next_start" in first.stderr
    assert not flag.exists()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert int(out) == proc.pid  # exec'd in place: the same pid Bastion started


def test_teardown_reports_and_kills_processes_left_alive(tmp_path: Path) -> None:
    import subprocess

    leftover = subprocess.Popen(["sleep", "60"])
    handle = BastionHandle(tmp_path, {"listen": [], "apps": {}}, ca_path=None)
    handle.proc = subprocess.Popen(["true"])  # stands in for a Bastion that already exited
    handle.proc.wait()
    handle._seen.add(leftover.pid)  # as if the test had seen this app pid
    problems = handle.close()
    assert len(problems) == 1
    assert f"pid {leftover.pid}: sleep 60" in problems[0]
    assert leftover.wait(timeout=5) == -9  # and it was killed
