#!/usr/bin/env bash
# Builds Sluice with profile-guided optimisation (PGO): an instrumented build serves a short
# training load on loopback, and the release build is then compiled with the profile it wrote.
# The result is the same code, laid out and inlined for the request path it actually runs
# (callgrind: ~11% fewer instructions per request than the plain release build; the README's
# "Performance" section has the figures). One command:
#
#   bash scripts/pgo-build.sh            # -> target/pgo/sluice
#
# Training: sluice-mock as the upstream (no latency), a redis-server of its own when one is
# installed (else local limits), and Sluice with a virtual key, the allow-list filter, rpm/tpm
# limits and the access log, driven by wrk: chat completions at 64 connections for
# TRAIN_SECONDS (default 10), then a few seconds each of streams, embeddings and the common
# rejections (bad key, unknown model, malformed JSON), so that their code is not treated as
# never run. Everything listens on free loopback ports and is stopped at the end.
#
# Needs: wrk (apt-get install -y wrk), curl, python3, and an llvm-profdata that reads the raw
# profiles of this rustc's LLVM: `rustup component add llvm-tools` or Debian's llvm-19
# (apt-get install -y llvm-19; llvm-14's is too old). LLVM_PROFDATA=path picks one.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAIN_SECONDS=${TRAIN_SECONDS:-10}
OUT=${OUT:-target/pgo/sluice}
host=$(rustc -vV | sed -n 's/^host: //p')

find_profdata() {
  if [ -n "${LLVM_PROFDATA:-}" ]; then echo "$LLVM_PROFDATA"; return; fi
  local sysroot; sysroot=$(rustc --print sysroot)
  local c
  for c in "$sysroot/lib/rustlib/$host/bin/llvm-profdata" \
    $(compgen -c llvm-profdata- 2>/dev/null | sort -t- -k3 -n -r) llvm-profdata; do
    if command -v "$c" >/dev/null 2>&1 || [ -x "$c" ]; then echo "$c"; return; fi
  done
}
profdata=$(find_profdata)
[ -n "$profdata" ] || {
  echo "pgo-build: no llvm-profdata (apt-get install -y llvm-19, or rustup component add llvm-tools)" >&2
  exit 1
}
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "pgo-build: $tool is missing" >&2; exit 1; }
done

work=$(mktemp -d /tmp/sluice-pgo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. The instrumented build. `--target` keeps RUSTFLAGS off build scripts and proc macros, so
# only Sluice's own binary writes a profile. Its paths stay the same from run to run, so that
# cargo rebuilds only what changed.
echo "pgo-build: instrumented build" >&2
raw=$PWD/target/pgo/raw
rm -rf "$raw"
RUSTFLAGS="-Cprofile-generate=$raw" cargo build --release --locked --target "$host" \
  --target-dir target/pgo/generate -p sluice-proxy --bin sluice >&2
cargo build --release --locked -p sluice-testkit --bin sluice-mock >&2

# 2. Training.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(free_port); SLUICE=$(free_port)
target/release/sluice-mock --port "$MOCK" --stream-chunks 20 > /dev/null & pids+=($!)
limits=""
if command -v redis-server >/dev/null; then
  REDIS=$(free_port)
  redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$work/redis.log" & pids+=($!)
  limits="router_settings:
  redis_url: redis://127.0.0.1:$REDIS"
fi
cat > "$work/sluice.yaml" <<EOF
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:$MOCK/v1
      api_key: sk-upstream
      tpm: 10000000000
      rpm: 1000000000
  - model_name: text-embedding-3-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: http://127.0.0.1:$MOCK/v1
      tpm: 10000000000
      rpm: 1000000000
general_settings:
  master_key: sk-train-admin
keys:
  - {key: sk-train, key_alias: train, tpm_limit: 10000000000, rpm_limit: 1000000000}
$limits
server:
  host: 127.0.0.1
  threads: 2
EOF
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$MOCK/" && break; sleep 0.1; done
RUST_LOG=warn,sluice::access=info "target/pgo/generate/$host/release/sluice" \
  --config "$work/sluice.yaml" --port "$SLUICE" --upgrade-sock "$work/upgrade.sock" \
  2> "$work/access.log" & sluice_pid=$!; pids+=($sluice_pid)
for _ in $(seq 300); do curl -fs -o /dev/null "http://127.0.0.1:$SLUICE/health/readiness" && break; sleep 0.1; done

content=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 30)[:1300])')
lua() { # file body key
  printf '%s' "$2" > "$work/$1.json"
  cat > "$work/$1.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $3"
local f = io.open("$work/$1.json", "r"); wrk.body = f:read("*a"); f:close()
EOF
}
lua chat "{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"$content\"}],\"temperature\":0.2,\"max_tokens\":64,\"_client_trace\":\"x\"}" sk-train
lua stream '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream please"}]}' sk-train
lua embed '{"model":"text-embedding-3-small","input":"the quick brown fox"}' sk-train
lua badkey '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' sk-wrong
lua nomodel '{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}' sk-train
lua broken '{"model":"gpt-4o-mini","messages":[' sk-train
train() { # name path conns seconds
  echo "pgo-build: training: $1 ($4 s)" >&2
  wrk -t1 -c"$3" -d"$4s" -s "$work/$1.lua" "http://127.0.0.1:$SLUICE$2" | awk '/requests in/' >&2
}
train chat /v1/chat/completions 64 "$TRAIN_SECONDS"
train stream /v1/chat/completions 16 3
train embed /v1/embeddings 16 2
train badkey /v1/chat/completions 8 1
train nomodel /v1/chat/completions 8 1
train broken /v1/chat/completions 8 1

# Graceful stop: the profile is written when the process exits.
kill -TERM "$sluice_pid"
wait "$sluice_pid" || true
ls "$raw"/*.profraw > /dev/null 2>&1 || { echo "pgo-build: no profile was written" >&2; exit 1; }
"$profdata" merge -o "$work/sluice.profdata" "$raw"/*.profraw || {
  echo "pgo-build: $profdata cannot read this rustc's profiles; use a newer one (llvm-19 or later, or rustup's llvm-tools) through LLVM_PROFDATA" >&2
  exit 1
}

# 3. The optimised build. The profile is kept under its digest: a new profile is a new
# RUSTFLAGS, which makes cargo rebuild every crate with it (cargo does not look into the file,
# and would otherwise keep crates built with the last one).
profile=$PWD/target/pgo/profile-$(sha256sum "$work/sluice.profdata" | cut -c1-16).profdata
rm -f "$PWD"/target/pgo/profile-*.profdata
cp "$work/sluice.profdata" "$profile"
echo "pgo-build: optimised build ($profdata)" >&2
RUSTFLAGS="-Cprofile-use=$profile" cargo build --release --locked --target "$host" \
  --target-dir target/pgo/use -p sluice-proxy --bin sluice >&2
mkdir -p "$(dirname "$OUT")"
cp "target/pgo/use/$host/release/sluice" "$OUT"
echo "pgo-build: $OUT" >&2
