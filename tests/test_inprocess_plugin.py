"""The ``bastion`` pytest fixture with an in-process app: ``in_process="module:attr"``,
``kill_worker``, ``fail_next_import`` and ``hang`` (the worker watchdog), against the
sample project in ``tests/plugin_example/`` (the same app the out-of-process plugin tests
run under uvicorn; its integration middleware changes nothing in process).
"""

from __future__ import annotations

from pathlib import Path

from bastion.proxy.pytest_plugin import BastionFactory, wait_until

PROJECT = Path(__file__).resolve().parent / "plugin_example"


def test_in_process_app_and_a_killed_worker(bastion: BastionFactory) -> None:
    b = bastion(in_process="shop:app", app="shop", path="/shop", cwd=str(PROJECT),
                warmup="/shop/")
    assert b.in_process("shop")
    me = b.get("/shop/whoami").json()
    assert me["scheme"] == "https" and me["client"] == "127.0.0.1"
    assert me["home"] == f"{b.https_url}/shop/"
    assert me["pid"] in b.pids("shop") and me["pid"] != b.pid
    killed = b.kill_worker("shop")
    assert killed not in b.pids("shop")
    assert b.get("/shop/").text == "welcome to the shop\n"
    assert b.app_status("shop")["restarts"] == 1


def test_fail_next_import_then_served_again(bastion: BastionFactory) -> None:
    b = bastion({"workers": 1, "detailed_errors": True,
                 "apps": {"shop": {"path": "/shop", "hosting_model": "in_process",
                                   "app": "shop:app", "cwd": str(PROJECT)}}},
                warmup="/shop/")
    b.fail_next_import("shop")
    b.kill_worker(wait=False)  # its replacement's load is the one that fails
    assert wait_until(lambda: "fails on purpose" in b.app_status("shop")["reason"], 20), \
        b.log()
    assert b.app_status("shop")["state"] == "failed"
    # the next request loads it again (a failed load is retried as a start would be)
    assert wait_until(lambda: b.get("/shop/").status == 200, 10), b.log()
    assert b.app_status("shop")["state"] == "ready"


def test_a_hung_worker_is_replaced_by_the_watchdog(bastion: BastionFactory) -> None:
    b = bastion({"workers": 1, "worker_timeout": "2s",
                 "apps": {"shop": {"path": "/shop", "hosting_model": "in_process",
                                   "app": "shop:app", "cwd": str(PROJECT)}}},
                warmup="/shop/")
    (hung,) = b.hang("shop")
    response = b.get("/shop/", timeout=20)  # waits in the backlog for the replacement
    assert response.status == 200
    assert hung not in b.pids("shop")
    b.resume("shop")
