#!/usr/bin/env bash
# Makes sure a Redis answers at 127.0.0.1:6379 (the tests' shared cache server): starts one when
# none is running, installing Debian's redis-server first when it is missing.
set -euo pipefail
port=6379
up() { (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; }
up && exit 0
if ! command -v redis-server >/dev/null; then
  echo "redis-server not found: installing it with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --bind 127.0.0.1 --port $port --save "" --appendonly no >/dev/null
for _ in $(seq 50); do up && exit 0; sleep 0.1; done
echo "Redis did not start on 127.0.0.1:$port" >&2
exit 1
