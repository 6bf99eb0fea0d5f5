#!/usr/bin/env bash
# Bastion vs nginx as a reverse proxy in front of the same trivial Python app.
#
#   bench/run.sh                      # PYTHON=... to choose the interpreter (needs Bastion installed)
#   DURATION=30s bench/run.sh         # longer runs
#
# Measures, one after the other on this machine, with `wrk -t2 -c32 -d10s` on 127.0.0.1:
#   (c) the app directly (baseline, HTTP)
#   (a) nginx (worker_processes 1, access_log off, keepalive upstream) -> that app, HTTP and HTTPS
#   (b) Bastion (workers 1; it launches its own copy of the app)          -> app, HTTP and HTTPS
# and writes bench/results/latest.md (requests/s, p50/p99, peak RSS and CPU of the proxy,
# ratios Bastion/nginx). Everything it starts is stopped on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
MAX_SECONDS="${MAX_SECONDS:-600}"     # the whole run, including installs

APP_PORT=18080                 # the standalone upstream (baseline and nginx)
NGINX_HTTP=18081
NGINX_HTTPS=18443
BASTION_HTTP=18082
BASTION_HTTPS=18444

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

if ! "$PY" -c 'import proxy.main, aiohttp, psutil' 2>/dev/null; then
    log "installing Bastion into $PY"
    timeout 300 "$PY" -m pip install -q -e "$ROOT"
fi
if ! "$PY" -c 'import trustme' 2>/dev/null; then
    log "installing trustme into $PY"
    timeout 120 "$PY" -m pip install -q trustme
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

for port in $APP_PORT $NGINX_HTTP $NGINX_HTTPS $BASTION_HTTP $BASTION_HTTPS; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is already in use"
    fi
done

"$PY" "$HERE/measure.py" cert "$WORK/tls"
mkdir -p "$WORK/results"

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
cat >"$WORK/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
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
    keepalive_requests 100000;
    upstream app {
        server 127.0.0.1:$APP_PORT;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen 127.0.0.1:$NGINX_HTTP;
        listen 127.0.0.1:$NGINX_HTTPS ssl;
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
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
log "starting nginx on :$NGINX_HTTP and :$NGINX_HTTPS"
"$NGINX" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;' &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
"$PY" "$HERE/measure.py" wait "http://127.0.0.1:$NGINX_HTTP/" 20
"$PY" "$HERE/measure.py" wait "https://127.0.0.1:$NGINX_HTTPS/" 20

# --- Bastion ------------------------------------------------------------------------------
cat >"$WORK/bastion.yaml" <<EOF
listen:
  - address: "127.0.0.1:$BASTION_HTTP"
  - address: "127.0.0.1:$BASTION_HTTPS"
    tls:
      certificates:
        - {cert: "$WORK/tls/cert.pem", key: "$WORK/tls/key.pem"}
admin_socket: "$WORK/bastion-admin.sock"
access_log: null
workers: 1
apps:
  hello:
    command: ["$PY", "$HERE/app.py", "--port", "{port}"]
    start_mode: always
    startup_time_limit: 20s
EOF
"$PY" -m proxy check -c "$WORK/bastion.yaml" >/dev/null
log "starting Bastion on :$BASTION_HTTP and :$BASTION_HTTPS"
"$PY" -m proxy serve -c "$WORK/bastion.yaml" >"$WORK/bastion.log" 2>&1 &
BASTION_PID=$!
PIDS+=("$BASTION_PID")
"$PY" "$HERE/measure.py" wait "http://127.0.0.1:$BASTION_HTTP/" 30 \
    || { cat "$WORK/bastion.log" >&2; die "Bastion did not answer"; }
"$PY" "$HERE/measure.py" wait "https://127.0.0.1:$BASTION_HTTPS/" 30

BASTION_VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("bastion"))' 2>/dev/null || echo '?')"
GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
cat >"$WORK/results/meta.json" <<EOF
{"wrk": "wrk -t$THREADS -c$CONNECTIONS -d$DURATION", "warmup": "$WARMUP",
 "bastion": "$BASTION_VERSION (git $GIT_REV)"}
EOF

# --- measuring ----------------------------------------------------------------------------
# run NAME URL KIND PID [APP_PID]
run() {
    local name=$1 url=$2 kind=$3 pid=$4 app_pid=${5:-}
    "$PY" "$HERE/measure.py" sample "$kind" "$pid" "$WORK/results/$name.rss.json" $app_pid &
    local sampler=$!
    PIDS+=("$sampler")
    log "$name: warm-up $WARMUP"
    timeout 60 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "$url" >/dev/null
    log "$name: wrk -t$THREADS -c$CONNECTIONS -d$DURATION $url"
    timeout 600 wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        -s "$HERE/report.lua" "$url" >"$WORK/results/$name.wrk"
    kill -TERM "$sampler"
    wait "$sampler" || true
    grep -E 'Requests/sec|Non-2xx|Socket errors' "$WORK/results/$name.wrk" | sed "s/^/[bench]   /" >&2 || true
}

run direct-http "http://127.0.0.1:$APP_PORT/" app "$APP_PID"
run nginx-http "http://127.0.0.1:$NGINX_HTTP/" nginx "$NGINX_PID" "$APP_PID"
run bastion-http "http://127.0.0.1:$BASTION_HTTP/" bastion "$BASTION_PID"
run nginx-https "https://127.0.0.1:$NGINX_HTTPS/" nginx "$NGINX_PID" "$APP_PID"
run bastion-https "https://127.0.0.1:$BASTION_HTTPS/" bastion "$BASTION_PID"

mkdir -p "$HERE/results"
cp "$WORK"/results/*.wrk "$HERE/results/" 2>/dev/null || true
"$PY" "$HERE/measure.py" report "$WORK/results" "$HERE/results/latest.md"
log "written: $HERE/results/latest.md"
