"""Request metrics of one worker, and their Prometheus text rendering.

Each worker counts, per app, requests by status, a latency histogram and upstream
errors, and the open client connections. The counters are cumulative and plain
JSON-able dicts (``snapshot``), so worker processes send them to the main process, which
adds them up (``merge``) with the module's process figures and renders
``GET /metrics`` in the Prometheus text format (``render``). No I/O here.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Cumulative counters of one worker."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (app, status) -> count
        self.latency: dict[str, list[int]] = {}  # app -> bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = {}
        self.upstream_errors: dict[str, int] = {}
        self.open_connections = 0

    def observe(self, app: str, status: int, duration: float) -> None:
        """Count one finished request."""
        key = (app, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.latency.get(app)
        if counts is None:
            counts = self.latency[app] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, duration)] += 1
        self.latency_sum[app] = self.latency_sum.get(app, 0.0) + duration
        if status in (502, 504):
            self.upstream_errors[app] = self.upstream_errors.get(app, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy of the counters."""
        return {
            "requests": [[app, status, n] for (app, status), n in self.requests.items()],
            "latency": {app: list(c) for app, c in self.latency.items()},
            "latency_sum": dict(self.latency_sum),
            "upstream_errors": dict(self.upstream_errors),
            "open_connections": self.open_connections,
        }


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add up the snapshots of several workers."""
    requests: dict[tuple[str, int], int] = {}
    latency: dict[str, list[int]] = {}
    latency_sum: dict[str, float] = {}
    errors: dict[str, int] = {}
    connections = 0
    for snap in snapshots:
        for app, status, n in snap.get("requests", []):
            requests[(app, status)] = requests.get((app, status), 0) + n
        for app, counts in snap.get("latency", {}).items():
            total = latency.setdefault(app, [0] * len(counts))
            for i, n in enumerate(counts):
                total[i] += n
        for app, value in snap.get("latency_sum", {}).items():
            latency_sum[app] = latency_sum.get(app, 0.0) + value
        for app, n in snap.get("upstream_errors", {}).items():
            errors[app] = errors.get(app, 0) + n
        connections += snap.get("open_connections", 0)
    return {
        "requests": [[a, s, n] for (a, s), n in requests.items()],
        "latency": latency,
        "latency_sum": latency_sum,
        "upstream_errors": errors,
        "open_connections": connections,
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(merged: dict[str, Any], status: dict[str, Any], workers: int) -> str:
    """The Prometheus text exposition of ``merged`` worker metrics and module ``status``."""
    out: list[str] = []
    out += ["# HELP bastion_requests_total Requests answered, by app and status.",
            "# TYPE bastion_requests_total counter"]
    for app, code, n in sorted(merged["requests"], key=lambda r: (r[0], r[1])):
        out.append(f'bastion_requests_total{{app="{_label(app)}",status="{code}"}} {n}')
    out += ["# HELP bastion_request_duration_seconds Time from request to response end.",
            "# TYPE bastion_request_duration_seconds histogram"]
    for app, counts in sorted(merged["latency"].items()):
        cumulative = 0
        for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'bastion_request_duration_seconds_bucket{{app="{_label(app)}",'
                       f'le="{le}"}} {cumulative}')
        out.append(f'bastion_request_duration_seconds_sum{{app="{_label(app)}"}} '
                   f'{merged["latency_sum"].get(app, 0.0):.6f}')
        out.append(f'bastion_request_duration_seconds_count{{app="{_label(app)}"}} {cumulative}')
    out += ["# HELP bastion_upstream_errors_total Requests answered 502 or 504.",
            "# TYPE bastion_upstream_errors_total counter"]
    for app, n in sorted(merged["upstream_errors"].items()):
        out.append(f'bastion_upstream_errors_total{{app="{_label(app)}"}} {n}')
    out += ["# HELP bastion_app_restarts_total Crashes and failed starts, by app.",
            "# TYPE bastion_app_restarts_total counter"]
    for name, app in sorted(status["apps"].items()):
        out.append(f'bastion_app_restarts_total{{app="{_label(name)}"}} {app["restarts"]}')
    out += ["# HELP bastion_app_processes App processes, by app and state.",
            "# TYPE bastion_app_processes gauge"]
    for name, app in sorted(status["apps"].items()):
        by_state: dict[str, int] = {}
        for proc in app["processes"]:
            by_state[proc["state"]] = by_state.get(proc["state"], 0) + 1
        for state in ("ready", "starting", "draining"):
            out.append(f'bastion_app_processes{{app="{_label(name)}",state="{state}"}} '
                       f'{by_state.get(state, 0)}')
    out += ["# HELP bastion_open_connections Client connections open now.",
            "# TYPE bastion_open_connections gauge",
            f"bastion_open_connections {merged['open_connections']}",
            "# HELP bastion_workers Proxy worker processes.",
            "# TYPE bastion_workers gauge",
            f"bastion_workers {workers}"]
    return "\n".join(out) + "\n"
