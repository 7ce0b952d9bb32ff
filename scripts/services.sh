#!/usr/bin/env bash
# Makes sure the services the tests use are up: PostgreSQL on
# 127.0.0.1:5432 (trust auth for the `postgres` user) and Redis on
# 127.0.0.1:6379. Starts them when they are installed but stopped (that
# needs root); fails with what is missing otherwise. Override the addresses
# with LLMPROXY_TEST_POSTGRES / LLMPROXY_TEST_REDIS.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
  for _ in $(seq 1 50); do
    up "$1" && return 0
    sleep 0.2
  done
  return 1
}

if ! up 5432; then
  echo "services: PostgreSQL is not answering on 127.0.0.1:5432; starting it"
  if [ "$(id -u)" = 0 ] && command -v service >/dev/null; then
    service postgresql start >/dev/null 2>&1 || true
  fi
  wait_up 5432 || {
    echo "services: PostgreSQL is needed on 127.0.0.1:5432 (trust auth) for tests/keys.rs; install and start it" >&2
    exit 1
  }
fi

if ! up 6379; then
  echo "services: Redis is not answering on 127.0.0.1:6379; starting it"
  if command -v redis-server >/dev/null; then
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes >/dev/null 2>&1 || true
  elif [ "$(id -u)" = 0 ] && command -v service >/dev/null; then
    service redis-server start >/dev/null 2>&1 || true
  fi
  wait_up 6379 || {
    echo "services: Redis is needed on 127.0.0.1:6379 for tests/keys.rs; install and start it" >&2
    exit 1
  }
fi
echo "services: PostgreSQL 127.0.0.1:5432 and Redis 127.0.0.1:6379 are up"
