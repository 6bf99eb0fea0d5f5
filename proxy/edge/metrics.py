"""Request metrics of one worker, and their Prometheus text rendering.

Each worker counts, per app, requests by status, a latency histogram and upstream
errors, failed TLS handshakes, and has gauges: the open client connections and, per app,
the requests in flight and queued, and the bytes held for slow clients
(``proxy.edge.buffers``: now, the peak, the per-worker cap, how often it was reached).
The counters are cumulative and plain JSON-able dicts (``snapshot``), so worker
processes send them to the main process, which adds them up (``merge``) with the module's process figures and renders ``GET /metrics`` in the
Prometheus text format (``render``), with ``bastion_build_info`` and the standard
``process_*`` figures of the main process. No I/O here but reading /proc for those.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import Any, Final

from ..version import version

BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _AppCounts:
    """One app's request counters in one worker (what ``observe`` touches)."""

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.latency = [0] * (len(BUCKETS) + 1)  # bucket counts, +Inf last
        self.latency_sum = 0.0
        self.upstream_errors = 0


class Metrics:
    """Cumulative counters of one worker."""

    def __init__(self) -> None:
        self._apps: dict[str, _AppCounts] = {}  # per app: made at its first request
        self.tls_handshake_errors = 0
        self.access_log_lost = 0  # access log lines a failed write lost
        self.open_connections = 0
        self.proxy_refused: dict[str, int] = {}  # PROXY protocol refusals by reason
        self.draining = 0  # 1 while this node drains (``bastion drain``, SIGTERM)
        self.in_flight: dict[str, int] = {}  # app -> requests being served now
        self.queued: dict[str, int] = {}  # app -> requests waiting for it now
        self.buffered = 0  # bytes held for slow clients now (proxy.edge.buffers)
        self.buffered_peak = 0
        self.buffer_cap = 0  # limits.buffer_memory, per worker
        self.buffer_refusals = 0  # times the cap was reached (streamed instead)

    def tls_handshake_failed(self) -> None:
        """Count one TLS handshake that failed (the data plane calls this)."""
        self.tls_handshake_errors += 1

    def proxy_protocol_refused(self, reason: str) -> None:
        """Count one connection refused on a ``proxy_protocol`` listener."""
        self.proxy_refused[reason] = self.proxy_refused.get(reason, 0) + 1

    def set_load(self, app: str, in_flight: int, queued: int) -> None:
        """The requests ``app`` serves and has waiting, as this worker sees them now."""
        self.in_flight[app] = in_flight
        self.queued[app] = queued

    def set_buffers(self, used: int, peak: int, cap: int, refusals: int) -> None:
        """The worker's buffer budget as it stands now."""
        self.buffered = used
        self.buffered_peak = peak
        self.buffer_cap = cap
        self.buffer_refusals = refusals

    def observe(self, app: str, status: int, duration: float) -> None:
        """Count one finished request."""
        counts = self._apps.get(app)
        if counts is None:
            counts = self._apps[app] = _AppCounts()
        by_status = counts.by_status
        by_status[status] = by_status.get(status, 0) + 1
        bucket = 0
        for bound in BUCKETS:  # (a short loop: cheaper compiled than bisect's call)
            if duration <= bound:
                break
            bucket += 1
        counts.latency[bucket] += 1
        counts.latency_sum += duration
        if status == 502 or status == 504:
            counts.upstream_errors += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy of the counters."""
        apps = self._apps
        return {
            "requests": [[app, status, n] for app, c in apps.items()
                         for status, n in c.by_status.items()],
            "latency": {app: list(c.latency) for app, c in apps.items()},
            "latency_sum": {app: c.latency_sum for app, c in apps.items()},
            "upstream_errors": {app: c.upstream_errors for app, c in apps.items()
                                if c.upstream_errors},
            "tls_handshake_errors": self.tls_handshake_errors,
            "access_log_lost": self.access_log_lost,
            "open_connections": self.open_connections,
            "proxy_refused": dict(self.proxy_refused),
            "draining": self.draining,
            "in_flight": dict(self.in_flight),
            "queued": dict(self.queued),
            "buffered": self.buffered,
            "buffered_peak": self.buffered_peak,
            "buffer_cap": self.buffer_cap,
            "buffer_refusals": self.buffer_refusals,
        }


def retired(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot of a worker that is gone: its counters stay, its gauges are 0."""
    return {**snapshot, "open_connections": 0, "in_flight": {}, "queued": {}, "draining": 0,
            "buffered": 0}


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add up the snapshots of several workers."""
    requests: dict[tuple[str, int], int] = {}
    latency: dict[str, list[int]] = {}
    latency_sum: dict[str, float] = {}
    errors: dict[str, int] = {}
    in_flight: dict[str, int] = {}
    queued: dict[str, int] = {}
    refused: dict[str, int] = {}
    draining = 0
    handshakes = 0
    lost = 0
    connections = 0
    buffered = peak = cap = refusals = 0
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
        for app, n in snap.get("in_flight", {}).items():
            in_flight[app] = in_flight.get(app, 0) + n
        for app, n in snap.get("queued", {}).items():
            queued[app] = queued.get(app, 0) + n
        for reason, n in snap.get("proxy_refused", {}).items():
            refused[reason] = refused.get(reason, 0) + n
        draining = max(draining, snap.get("draining", 0))
        handshakes += snap.get("tls_handshake_errors", 0)
        lost += snap.get("access_log_lost", 0)
        connections += snap.get("open_connections", 0)
        buffered += snap.get("buffered", 0)
        peak = max(peak, snap.get("buffered_peak", 0))
        cap = max(cap, snap.get("buffer_cap", 0))
        refusals += snap.get("buffer_refusals", 0)
    return {
        "requests": [[a, s, n] for (a, s), n in requests.items()],
        "latency": latency,
        "latency_sum": latency_sum,
        "upstream_errors": errors,
        "tls_handshake_errors": handshakes,
        "access_log_lost": lost,
        "open_connections": connections,
        "proxy_refused": refused,
        "draining": draining,
        "in_flight": in_flight,
        "queued": queued,
        "buffered": buffered,
        "buffered_peak": peak,
        "buffer_cap": cap,
        "buffer_refusals": refusals,
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _process_figures(started: float | None) -> list[str]:
    """The standard ``process_*`` metrics of this (the main) process, from /proc."""
    out: list[str] = []
    try:
        import psutil

        proc = psutil.Process()
        with proc.oneshot():
            cpu = proc.cpu_times()
            memory = proc.memory_info()
            fds = proc.num_fds()
            created = proc.create_time()
        limit = proc.rlimit(psutil.RLIMIT_NOFILE)[0]
    except Exception:  # noqa: BLE001 - the figures are a bonus; never fail /metrics
        return out
    figures = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.",
         f"{cpu.user + cpu.system:.2f}"),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
         str(memory.rss)),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
         str(memory.vms)),
        ("process_start_time_seconds", "gauge",
         "Start time of the process since the Unix epoch in seconds.",
         f"{started if started is not None else created:.3f}"),
        ("process_open_fds", "gauge", "Open file descriptors.", str(fds)),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors.",
         str(limit if limit >= 0 else 2**31)),
    ]
    for name, kind, text, value in figures:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return out


def render(merged: dict[str, Any], status: dict[str, Any], workers: int,
           started: float | None = None) -> str:
    """The Prometheus text exposition of ``merged`` worker metrics and module ``status``.

    ``started`` (Unix time) is Bastion's start, for ``process_start_time_seconds``."""
    out: list[str] = [
        "# HELP bastion_build_info Bastion's version and the Python it runs on.",
        "# TYPE bastion_build_info gauge",
        f'bastion_build_info{{version="{_label(version())}",'
        f'python="{_label(platform.python_version())}"}} 1',
    ]
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
    in_flight, queued = merged.get("in_flight", {}), merged.get("queued", {})
    out += ["# HELP bastion_app_requests_in_flight Requests being served by the app now.",
            "# TYPE bastion_app_requests_in_flight gauge"]
    for name in sorted(status["apps"]):
        out.append(f'bastion_app_requests_in_flight{{app="{_label(name)}"}} '
                   f'{in_flight.get(name, 0)}')
    out += ["# HELP bastion_app_requests_queued Requests waiting for the app now.",
            "# TYPE bastion_app_requests_queued gauge"]
    for name in sorted(status["apps"]):
        out.append(f'bastion_app_requests_queued{{app="{_label(name)}"}} '
                   f'{queued.get(name, 0)}')
    out += ["# HELP bastion_tls_handshake_errors_total TLS handshakes that failed.",
            "# TYPE bastion_tls_handshake_errors_total counter",
            f"bastion_tls_handshake_errors_total {merged.get('tls_handshake_errors', 0)}"]
    out += ["# HELP bastion_access_log_lost_lines_total Access log lines lost to failed writes.",
            "# TYPE bastion_access_log_lost_lines_total counter",
            f"bastion_access_log_lost_lines_total {merged.get('access_log_lost', 0)}"]
    out += ["# HELP bastion_proxy_protocol_refused_total Connections refused on "
            "proxy_protocol listeners, by reason.",
            "# TYPE bastion_proxy_protocol_refused_total counter"]
    for reason, n in sorted(merged.get("proxy_refused", {}).items()):
        out.append(f'bastion_proxy_protocol_refused_total{{reason="{_label(reason)}"}} {n}')
    out += ["# HELP bastion_draining 1 while the node drains (health answers 503).",
            "# TYPE bastion_draining gauge",
            f"bastion_draining {merged.get('draining', 0)}"]
    out += ["# HELP bastion_open_connections Client connections open now.",
            "# TYPE bastion_open_connections gauge",
            f"bastion_open_connections {merged['open_connections']}",
            "# HELP bastion_buffered_bytes Bytes held for slow clients now, all workers.",
            "# TYPE bastion_buffered_bytes gauge",
            f"bastion_buffered_bytes {merged.get('buffered', 0)}",
            "# HELP bastion_buffered_bytes_peak The most bytes one worker has held for "
            "slow clients.",
            "# TYPE bastion_buffered_bytes_peak gauge",
            f"bastion_buffered_bytes_peak {merged.get('buffered_peak', 0)}",
            "# HELP bastion_buffer_cap_bytes The cap on buffered bytes per worker "
            "(limits.buffer_memory).",
            "# TYPE bastion_buffer_cap_bytes gauge",
            f"bastion_buffer_cap_bytes {merged.get('buffer_cap', 0)}",
            "# HELP bastion_buffer_cap_reached_total Times buffering fell back to "
            "streaming because a worker's cap was reached.",
            "# TYPE bastion_buffer_cap_reached_total counter",
            f"bastion_buffer_cap_reached_total {merged.get('buffer_refusals', 0)}",
            "# HELP bastion_workers Proxy worker processes.",
            "# TYPE bastion_workers gauge",
            f"bastion_workers {workers}"]
    out += _process_figures(started)
    return "\n".join(out) + "\n"
