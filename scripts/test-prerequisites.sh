#!/usr/bin/env bash
# Run by `npm test` before the suite: makes sure the real parts the tests meet are there.
# - Redis at REDIS_URL (default 127.0.0.1:6379): started here if it does not answer and a
#   redis-server binary exists (it keeps nothing on disk).
# - Chromium at /usr/bin/chromium (or CHROMIUM_PATH) for the dashboard's browser test:
#   installed from Debian's packages when missing and this user can.
# Anything it cannot provide, the tests that need it report loudly, with how to fix it.
set -u

url="${REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${url#redis://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG; then
  if command -v redis-server >/dev/null 2>&1 && { [ "$host" = "127.0.0.1" ] || [ "$host" = "localhost" ]; }; then
    echo "test-prerequisites: starting redis-server on $host:$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no >/dev/null
    for _ in $(seq 1 50); do redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
  fi
fi

chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$chromium" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "test-prerequisites: installing chromium for the dashboard's browser test"
  apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || echo "test-prerequisites: could not install chromium; the browser test will say so"
fi
exit 0
