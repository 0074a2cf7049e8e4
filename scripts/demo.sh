#!/usr/bin/env bash
# Starts the mock upstream and Sluice (config/example.yaml) on loopback, sends one chat
# completion through Sluice with curl, prints the answer, and stops both. No API key, no Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cmake >/dev/null || {
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq cmake >/dev/null
}
cargo build --release --locked -p sluice-proxy -p sluice-testkit --bins

target/release/sluice-mock --port 8001 & mock=$!
target/release/sluice --config config/example.yaml & sluice=$!
trap 'kill $sluice $mock 2>/dev/null; wait 2>/dev/null' EXIT

# Wait (bounded) until Sluice answers its readiness probe.
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:4000/health/readiness >/dev/null 2>&1 && break
  sleep 0.1
done

curl -sS -i http://127.0.0.1:4000/v1/chat/completions \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello, Sluice!"}]}'
echo
