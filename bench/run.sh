#!/usr/bin/env bash
# Bastion vs nginx, side by side on 127.0.0.1, in one bounded run (about 8 minutes).
#
#   bench/run.sh                    # RUNS=3 DURATION=5 (seconds per run), median of the runs
#   QUICK=1 bench/run.sh            # RUNS=1 DURATION=2, 64 MiB stream: about 2 minutes, a smoke test
#   RUNS=5 DURATION=10 bench/run.sh
#   CELLS="http h2" bench/run.sh    # only some load cells (http tls handshake h2 c1 stream h2stream)
#   CELLS="static static-big" bench/run.sh  # static files, nginx vs Bastion (opt-in cells)
#   CELLS="gzip slow" bench/run.sh  # compression vs nginx's gzip; slow clients vs a sync worker
#   CELLS="inprocess" bench/run.sh  # in-process hosting vs uvicorn direct and out of process
#   NO_DOC=1 bench/run.sh           # write bench/results/latest.{md,png}, not docs/performance.*
#
# Targets: the app directly (bench/app.py), nginx -> app, Bastion workers=1 -> app and
# Bastion workers=auto -> app; in the HTTP/2 cells also Bastion workers=auto on the
# fallback HTTP/2 engine (bh2: BASTION_H2_ENGINE=h2). Cells: HTTP/1.1 keep-alive, TLS
# keep-alive, TLS with a new connection (full handshake) per request, HTTP/2 (h2load -c10
# -m10), one connection (wrk -c1, latency), a 1 GiB download over HTTP/1.1 and one over
# HTTP/2 (curl --http2); the proxies' CPU per request and peak RSS (growth for the downloads); the
# start-up latency of an on-demand app and the time to recover from kill -9 of an app, each
# against the app's own start time; a py-spy profile of a Bastion worker under load.
# Writes docs/performance.md + docs/performance.png and bench/results/ (raw JSON, profile).
# Everything it starts is stopped on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -n "${QUICK:-}" ]]; then
    RUNS="${RUNS:-1}"; DURATION="${DURATION:-2}"; STREAM_SIZE="${STREAM_SIZE:-67108864}"
    LIFECYCLE_SAMPLES="${LIFECYCLE_SAMPLES:-3}"; PROFILE_SECONDS="${PROFILE_SECONDS:-3}"
fi
RUNS="${RUNS:-3}"                           # runs per load cell; the report shows the median
DURATION="${DURATION:-5}"                   # seconds per run (whole seconds)
DURATION="${DURATION%s}"
WARMUP="${WARMUP:-1}"                       # seconds, before the first run of each cell
WARMUP="${WARMUP%s}"
STREAM_SIZE="${STREAM_SIZE:-1073741824}"    # bytes of the download cell (1 GiB)
LIFECYCLE_SAMPLES="${LIFECYCLE_SAMPLES:-5}" # start-up and crash samples per Bastion
PROFILE_SECONDS="${PROFILE_SECONDS:-5}"     # py-spy on a Bastion worker
NGINX_WORKERS="${NGINX_WORKERS:-auto}"
MAX_SECONDS="${MAX_SECONDS:-900}"           # the whole run, including installs
SLOW_SECONDS="${SLOW_SECONDS:-20}"          # each run of the slow cell (uploads take 8 s each)

APP_PORT=18080                 # the standalone upstream (direct and nginx)
NGINX_HTTP=18081
NGINX_HTTPS=18443
B1_HTTP=18082                  # Bastion workers: 1
B1_HTTPS=18444
BA_HTTP=18083                  # Bastion workers: auto
BA_HTTPS=18445
BH2_HTTP=18084                 # Bastion workers: auto, HTTP/2 on the h2 engine (BASTION_H2_ENGINE=h2)
BH2_HTTPS=18446

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# --- the Python to use --------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
elif [[ -x /work/venv/bin/python ]]; then
    PY=/work/venv/bin/python
else
    PY="$(command -v python3)"
fi

# --- tools --------------------------------------------------------------------------------
need_apt=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! timeout 300 apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null; then
            timeout 300 apt-get update >/dev/null
            timeout 300 apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null
        fi
    else
        die "missing ${need_apt[*]}: install them (apt-get install ${need_apt[*]}) or run as root"
    fi
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

if ! "$PY" -c 'import bastion.proxy.control.main, aiohttp, psutil' 2>/dev/null; then
    log "installing Bastion into $PY"
    timeout 300 "$PY" -m pip install -q -e "$ROOT"
fi
if [[ " ${CELLS:-} " == *" slow "* ]] && ! "$PY" -c 'import gunicorn' 2>/dev/null; then
    log "installing gunicorn into $PY (the slow cell's sync app)"
    timeout 120 "$PY" -m pip install -q gunicorn
fi
if ! "$PY" -c 'import trustme' 2>/dev/null; then
    log "installing trustme into $PY"
    timeout 120 "$PY" -m pip install -q trustme
fi
# Bench-only tools, not project dependencies: matplotlib (the chart) and py-spy (the profile).
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
    log "installing matplotlib into $PY (for the chart only)"
    timeout 300 "$PY" -m pip install -q matplotlib || log "no matplotlib: the chart is skipped"
fi
PYSPY="$(dirname "$PY")/py-spy"
if [[ ! -x "$PYSPY" ]]; then
    log "installing py-spy into $PY (for the profile only)"
    timeout 300 "$PY" -m pip install -q py-spy || log "no py-spy: the profile is skipped"
fi
[[ -x "$PYSPY" ]] || PYSPY=""

# --- the opt-in in-process hosting cell (bench/inprocess.py runs its own targets) ---------
if [[ " ${CELLS:-} " == *" inprocess "* ]]; then
    for module in gunicorn fastapi flask; do
        if ! "$PY" -c "import $module" 2>/dev/null; then
            log "installing $module into $PY (the inprocess cell's apps)"
            timeout 300 "$PY" -m pip install -q "$module"
        fi
    done
    mkdir -p "$HERE/results"
    log "inprocess: uvicorn direct vs Bastion in process vs out of process"
    timeout "$MAX_SECONDS" "$PY" "$HERE/inprocess.py" --runs "$RUNS" --duration "$DURATION" \
        --warmup "$WARMUP" --python "$PY" --json "$HERE/results/inprocess.json" \
        --markdown "$HERE/results/inprocess.md"
    log "written: bench/results/inprocess.md (and .json)"
    CELLS="$(echo " $CELLS " | sed 's/ inprocess / /g' | xargs)"
    if [[ -z "$CELLS" ]]; then
        exit 0
    fi
fi

# --- processes and cleanup ----------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bastion-bench.XXXXXX")"
chmod 755 "$WORK"
PIDS=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${KEEP_WORK:-}" ]]; then
        log "work files kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A watchdog bounds the whole run.
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$MAX_SECONDS" & sleeper=$!
    wait "$sleeper"
    printf '[bench] error: over %ss, giving up\n' "$MAX_SECONDS" >&2
    kill -TERM $$
) &
PIDS+=($!)

for port in $APP_PORT $NGINX_HTTP $NGINX_HTTPS $B1_HTTP $B1_HTTPS $BA_HTTP $BA_HTTPS $BH2_HTTP $BH2_HTTPS; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is already in use"
    fi
done

"$PY" "$HERE/measure.py" cert "$WORK/tls"

# --- static files (served at /files/ by nginx and by Bastion's static location) -----------
mkdir -p "$WORK/files"
head -c 1024 /dev/urandom >"$WORK/files/1k.bin"
if [[ " ${CELLS:-} " == *" static-big "* ]]; then
    log "writing a ${STATIC_SIZE:=$STREAM_SIZE}-byte file for the static-big cell"
    head -c "$STATIC_SIZE" /dev/zero >"$WORK/files/big.bin"
fi
chmod -R a+rX "$WORK/files"

# --- the upstream app ---------------------------------------------------------------------
log "starting the upstream app on 127.0.0.1:$APP_PORT"
"$PY" "$HERE/app.py" --port "$APP_PORT" >"$WORK/app.log" 2>&1 &
APP_PID=$!
PIDS+=("$APP_PID")
"$PY" "$HERE/measure.py" wait "http://127.0.0.1:$APP_PORT/" 20

# --- nginx --------------------------------------------------------------------------------
mkdir -p "$WORK/nginx"
NGINX_USER=""
if [[ $(id -u) -eq 0 ]]; then
    if id www-data >/dev/null 2>&1; then NGINX_USER="user www-data;"; else NGINX_USER="user nobody nogroup;"; fi
fi
# HTTP/2: "listen ... ssl http2" before nginx 1.25.1, "http2 on;" from it on.
NGINX_V="$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')"
if [[ "$NGINX_V" != "1.25.1" ]] && printf '%s\n1.25.1\n' "$NGINX_V" | sort -V -C; then
    NGINX_TLS_LISTEN="listen 127.0.0.1:$NGINX_HTTPS ssl http2;"; NGINX_H2=""
else
    NGINX_TLS_LISTEN="listen 127.0.0.1:$NGINX_HTTPS ssl;"; NGINX_H2="http2 on;"
fi
cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes $NGINX_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_timeout 75s;
    sendfile on;
    keepalive_requests 100000;
    upstream app {
        server 127.0.0.1:$APP_PORT;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen 127.0.0.1:$NGINX_HTTP;
        $NGINX_TLS_LISTEN
        $NGINX_H2
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /files/ {
            alias $WORK/files/;
        }
        location = /page {
            gzip on;
            gzip_comp_level 4;
            gzip_min_length 1024;
            gzip_types text/html;
            gzip_vary on;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
"$NGINX" -t -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" >/dev/null 2>&1 \
    || { "$NGINX" -t -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"; die "nginx config rejected"; }
log "starting nginx $NGINX_V on :$NGINX_HTTP and :$NGINX_HTTPS (worker_processes $NGINX_WORKERS)"
"$NGINX" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;' &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
"$PY" "$HERE/measure.py" wait "http://127.0.0.1:$NGINX_HTTP/" 20
"$PY" "$HERE/measure.py" wait "https://127.0.0.1:$NGINX_HTTPS/" 20

# --- Bastion, twice (three times with the HTTP/2 cells) -------------------------------------
# Three apps, each Bastion launching its own copies of bench/app.py: "hello" (any host,
# always running) takes the load; "cold" (Host: cold.bench, on demand, stops after 2 s
# idle) is woken for the start-up latency; "crash" (Host: crash.bench, always) is killed with -9.
# With the slow cell, Bastion workers=1 also runs bench/wsgi_app.py under gunicorn (one sync
# worker) twice: slow-on.bench with buffering (request: 1m, response: 1m), slow-off.bench
# without (buffering: off).
SLOW_POOLS=""
SLOW_APPS=""
if [[ " ${CELLS:-} " == *" slow "* ]]; then
    SLOW_POOLS="pools:
  buffered:
    buffering: {request: 1m, response: 1m}
  streamed:
    buffering: off"
    for mode in on off; do
        pool=buffered; [[ $mode == off ]] && pool=streamed
        SLOW_APPS+="
  slow-$mode:
    hosts: [\"slow-$mode.bench\"]
    pool: $pool
    command: [\"$PY\", \"-m\", \"gunicorn\", \"--chdir\", \"$HERE\", \"wsgi_app:app\", \"--workers\", \"1\", \"--timeout\", \"120\", \"--bind\", \"127.0.0.1:{port}\"]
    start_mode: always
    startup_time_limit: 20s"
    done
fi

# start_bastion NAME WORKERS HTTP_PORT HTTPS_PORT [VAR=VALUE...]  (sets LAST_PID)
start_bastion() {
    local name=$1 workers=$2 http=$3 https=$4
    local env=("${@:5}")
    local pools="" slow_apps=""
    if [[ $name == b1 ]]; then pools=$SLOW_POOLS; slow_apps=$SLOW_APPS; fi
    cat >"$WORK/$name.yaml" <<EOF
listen:
  - address: "127.0.0.1:$http"
  - address: "127.0.0.1:$https"
    tls:
      certificates:
        - {cert: "$WORK/tls/cert.pem", key: "$WORK/tls/key.pem"}
admin_socket: "$WORK/$name-admin.sock"
access_log: null
workers: $workers
static:
  files:
    path: /files
    root: "$WORK/files"
$pools
apps:$slow_apps
  hello:
    command: ["$PY", "$HERE/app.py", "--port", "{port}"]
    start_mode: always
    startup_time_limit: 20s
  cold:
    hosts: ["cold.bench"]
    command: ["$PY", "$HERE/app.py", "--port", "{port}"]
    start_mode: on_demand
    idle_timeout: 2s
    startup_time_limit: 20s
  crash:
    hosts: ["crash.bench"]
    command: ["$PY", "$HERE/app.py", "--port", "{port}"]
    start_mode: always
    startup_time_limit: 20s
    rapid_fails_per_minute: 100
EOF
    "$PY" -m bastion check -c "$WORK/$name.yaml" >/dev/null
    log "starting Bastion $name (workers: $workers${env[*]:+, ${env[*]}}) on :$http and :$https"
    env "${env[@]}" "$PY" -m bastion serve -c "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    "$PY" "$HERE/measure.py" wait "http://127.0.0.1:$http/" 30 \
        || { cat "$WORK/$name.log" >&2; die "Bastion $name did not answer"; }
    "$PY" "$HERE/measure.py" wait "https://127.0.0.1:$https/" 30
}
start_bastion b1 1 "$B1_HTTP" "$B1_HTTPS"
B1_PID=$LAST_PID
start_bastion bauto auto "$BA_HTTP" "$BA_HTTPS"
BA_PID=$LAST_PID
H2_ENGINE="$(grep -o 'HTTP/2 engine: [^;]*' "$WORK/bauto.log" | head -1 | sed 's/^HTTP\/2 engine: //' || true)"
# The fallback HTTP/2 engine, for comparison in the HTTP/2 cells only.
BH2_TARGET=""
if [[ -z "${CELLS:-}" || " $CELLS " == *" h2 "* || " $CELLS " == *" h2stream "* ]]; then
    start_bastion bh2 auto "$BH2_HTTP" "$BH2_HTTPS" BASTION_H2_ENGINE=h2
    BH2_TARGET=",
  \"bh2\": {\"pid\": $LAST_PID, \"http\": \"http://127.0.0.1:$BH2_HTTP/\", \"https\": \"https://127.0.0.1:$BH2_HTTPS/\",
          \"http_port\": $BH2_HTTP, \"admin\": \"$WORK/bh2-admin.sock\"}"
fi

BASTION_VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("bastion"))' 2>/dev/null || echo '?')"
GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
cat >"$WORK/setup.json" <<EOF
{
 "python": "$PY", "pyspy": "$PYSPY", "runs": $RUNS, "duration": $DURATION, "warmup": $WARMUP,
 "stream_size": $STREAM_SIZE, "stream_timeout": 120, "lifecycle_samples": $LIFECYCLE_SAMPLES,
 "profile_seconds": $PROFILE_SECONDS, "nginx_workers": "$NGINX_WORKERS",
 "bastion_version": "$BASTION_VERSION (git $GIT_REV)", "cells": "${CELLS:-}",
 "h2_engine": "${H2_ENGINE:-?}",
 "slow_seconds": $SLOW_SECONDS,
 "targets": {
  "direct": {"pid": $APP_PID, "http": "http://127.0.0.1:$APP_PORT/"},
  "nginx": {"pid": $NGINX_PID, "http": "http://127.0.0.1:$NGINX_HTTP/", "https": "https://127.0.0.1:$NGINX_HTTPS/"},
  "b1": {"pid": $B1_PID, "http": "http://127.0.0.1:$B1_HTTP/", "https": "https://127.0.0.1:$B1_HTTPS/",
         "http_port": $B1_HTTP, "admin": "$WORK/b1-admin.sock"},
  "slow-on": {"pid": $B1_PID, "http_port": $B1_HTTP, "host": "slow-on.bench"},
  "slow-off": {"pid": $B1_PID, "http_port": $B1_HTTP, "host": "slow-off.bench"},
  "bauto": {"pid": $BA_PID, "http": "http://127.0.0.1:$BA_HTTP/", "https": "https://127.0.0.1:$BA_HTTPS/",
            "http_port": $BA_HTTP, "admin": "$WORK/bauto-admin.sock"}$BH2_TARGET
 }
}
EOF

# --- measuring ----------------------------------------------------------------------------
mkdir -p "$HERE/results"
"$PY" "$HERE/matrix.py" run "$WORK/setup.json" "$HERE/results" &
MATRIX_PID=$!
PIDS+=("$MATRIX_PID")
wait "$MATRIX_PID" || die "the measurements failed (see above)"
if [[ -n "${NO_DOC:-}" ]]; then
    "$PY" "$HERE/matrix.py" report "$HERE/results" "$HERE/results/latest.md" "$HERE/results/latest.png"
    log "written: bench/results/latest.md and latest.png"
else
    "$PY" "$HERE/matrix.py" report "$HERE/results" "$ROOT/docs/performance.md" "$ROOT/docs/performance.png"
    cp "$ROOT/docs/performance.md" "$HERE/results/latest.md"
    log "written: docs/performance.md and docs/performance.png (raw figures in bench/results/)"
fi
