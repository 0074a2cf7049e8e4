#!/usr/bin/env bash
# The load bench: Sluice with every feature on vs nginx as a plain reverse proxy vs the upstream
# directly, all on loopback, driven by wrk. One command:
#
#   bash benches/load.sh            # DURATION=10 CONNS="64 256" ROUNDS=2 to change the run
#
# Upstream: nginx returning a fixed ~400-byte chat.completion (it costs almost nothing).
# nginx proxy: proxy_pass with an upstream keepalive pool, as many workers as Sluice threads, in
# an nginx of its own (the upstream is another nginx's workers); its CPU is its workers' only.
# Sluice: a virtual key, the allow-list filter, a deployment with rpm/tpm high enough never to
# refuse, Redis-backed limits (a real redis-server), /metrics, the JSON access log to a file.
# Each (target, connections) pair runs ROUNDS times, alternating targets. Prints a table of
# requests/s, p50 and p99, the ratio Sluice/nginx, CPU per request of Sluice and of nginx (user
# and kernel apart: utime and stime), and Redis commands per request. Then (PHASES, default
# "throughput fixed serial stream"):
#   fixed   oha at a fixed rate (RATE=2000/s, FIXED_SECONDS=10) against the upstream directly,
#           through nginx and through Sluice: added latency is the difference of p50 and p99.
#   serial  SERIAL_REQUESTS=5000 requests one after another on one connection, to the same
#           three: what a proxy adds to one request's round trip, without oha's rate schedule
#           (whose own timing moves the direct run's p50 by tens of µs from run to run).
#   stream  STREAMS=1000 concurrent SSE streams of 100 chunks (20 ms apart) from sluice-mock
#           through Sluice: how many completed, their p50/p99 duration, Sluice's peak RSS.
#   soak    oha at SOAK_RATE/s for SOAK_MINUTES minutes (PHASES=soak), a line per minute:
#           requests, errors, p99, Sluice's RSS.
#   idle    (PHASES=idle) IDLE_CONNS=2000 keep-alive connections, one request each, left open:
#           Sluice's RSS before and after, and per connection.
#   profile (PHASES=profile) a second Sluice, same config, under callgrind with its cache
#           simulator (D1 48 KiB, last level 1 MiB: this machine's L1d and L2 per core):
#           PROFILE_REQUESTS=5000 requests at 8 and at 256 connections after a warm-up, and
#           per request the instructions, the data reads and writes that miss L1, and those
#           that miss the 1 MiB level. Counts, not seconds: the same on a busy machine, so a
#           change can be judged where wall-clock runs are too noisy (needs valgrind).
#           PROFILE_OUT=dir keeps the dumps there (callgrind.8, callgrind.256) for
#           callgrind_annotate.
#   paired  (PHASES=paired) wrk against nginx and against Sluice at the same time, PAIRED_CONNS
#           (default "32 128") connections each, ROUNDS rounds of DURATION: each one's requests/s
#           and CPU per request. A shared VM's speed drifts between the alternating runs above;
#           run at once, both see the same machine, so the CPU ratio is the steadier comparison
#           (the requests/s ratio also says how the kernel shared the cores between them).
#   ab      (PHASES=ab) the same with two Sluices, A (SLUICE_BIN) and B (SLUICE_BIN_B, default the
#           same binary; SLUICE_LOG_B its RUST_LOG; SLUICE_SERVER_B YAML lines added under B's
#           `server:`, e.g. "  access_log: off"): B's CPU per request over A's, per round and
#           the median. Judges a change or prices a feature; A against itself spreads ±3 %.
# CLIENT=sdk sends the headers the OpenAI Python SDK sends (user-agent, accept, accept-encoding
# and eight x-stainless-* fields: 15 header fields in all, against 4 by default) to both proxies
# in the throughput runs.
# BODY_KB=n sends a prompt of n KiB (lines of ~90 bytes, a `\n` escape each) in every phase
# instead of the ~1.5 KB request: what a longer conversation costs each proxy.
# Needs: nginx, wrk, redis-server (apt-get install -y nginx-light wrk redis-server), for
# fixed/stream/soak oha (cargo install oha --locked), and for the PGO build an llvm-profdata
# (apt-get install -y llvm-19; PGO=0 measures the plain release build instead).
# SLUICE_WRAP prefixes Sluice's command (e.g. SLUICE_WRAP="valgrind --tool=massif" to profile
# its heap).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-"64 256"}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
PHASES=${PHASES:-"throughput fixed serial stream"}
SERIAL_REQUESTS=${SERIAL_REQUESTS:-5000}
RATE=${RATE:-2000}
FIXED_SECONDS=${FIXED_SECONDS:-10}
STREAMS=${STREAMS:-1000}
SOAK_RATE=${SOAK_RATE:-10000}
SOAK_MINUTES=${SOAK_MINUTES:-10}
for tool in nginx wrk redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "load bench: $tool is missing" >&2; exit 1; }
done
if [[ "$PHASES" =~ fixed|serial|stream|soak ]] && ! command -v oha >/dev/null; then
  echo "load bench: oha is missing (cargo install oha --locked)" >&2; exit 1
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# The Sluice measured: SLUICE_BIN when given, else the PGO build (scripts/pgo-build.sh, the
# release build; it needs an llvm-profdata) or, with PGO=0, the plain `cargo build --release`.
cargo build --release --locked -p sluice-testkit --bin sluice-mock >&2
if [ -z "${SLUICE_BIN:-}" ]; then
  if [ "${PGO:-1}" = 1 ]; then
    bash scripts/pgo-build.sh
    SLUICE_BIN=target/pgo/sluice
  else
    cargo build --release --locked -p sluice-proxy --bin sluice >&2
    SLUICE_BIN=target/release/sluice
  fi
fi
echo "load bench: Sluice is $SLUICE_BIN" >&2
work=$(mktemp -d /tmp/sluice-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UPSTREAM=$(free_port); PROXY=$(free_port); SLUICE=$(free_port); REDIS=$(free_port); MOCK=$(free_port)

# The upstream's answer: a realistic non-streamed chat completion.
answer='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed answer from the load bench upstream, long enough to be realistic."},"finish_reason":"stop"}],"usage":{"prompt_tokens":350,"completion_tokens":24,"total_tokens":374}}'

# Two nginx instances, so that the proxy's workers do nothing but proxy (as Sluice's threads):
# sharing workers with the upstream would let the proxy hand requests to the upstream without
# waking another process, and would charge the upstream's CPU to the proxy.
nginx_conf() { # name server-blocks
  mkdir -p "$work/$1"
  cat > "$work/$1/nginx.conf" <<EOF
user root;
worker_processes $THREADS;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1/body;
  proxy_temp_path $work/$1/proxy;
  fastcgi_temp_path $work/$1/fastcgi;
  uwsgi_temp_path $work/$1/uwsgi;
  scgi_temp_path $work/$1/scgi;
  keepalive_requests 100000;
  # In memory, as Sluice holds a body (nginx writes a larger one to a temporary file).
  client_body_buffer_size $(( ${BODY_KB:-0} + 4 > 64 ? ${BODY_KB:-0} + 4 : 64 ))k;
  client_max_body_size 16m;
$2
}
EOF
}
nginx_conf upstream "  server {
    listen 127.0.0.1:$UPSTREAM;
    location / { default_type application/json; return 200 '$answer'; }
  }"
nginx_conf proxy "  upstream llm { server 127.0.0.1:$UPSTREAM; keepalive 256; }
  server {
    listen 127.0.0.1:$PROXY;
    location / {
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
nginx -c "$work/upstream/nginx.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/proxy/nginx.conf" -g 'daemon off;' & nginx_pid=$!; pids+=($nginx_pid)
target/release/sluice-mock --port "$MOCK" --stream-chunks 100 --stream-interval-ms 20 > /dev/null & pids+=($!)

redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no --logfile "$work/redis.log" & pids+=($!)

cat > "$work/sluice.yaml" <<EOF
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:$UPSTREAM/v1
      api_key: sk-upstream
      tpm: 10000000000
      rpm: 1000000000
  - model_name: stream-model
    litellm_params:
      model: openai/stream-model
      api_base: http://127.0.0.1:$MOCK/v1
      tpm: 10000000000
      rpm: 1000000000
general_settings:
  master_key: sk-bench-admin
keys:
  - {key: sk-bench, key_alias: bench, tpm_limit: 10000000000, rpm_limit: 1000000000}
router_settings:
  redis_url: redis://127.0.0.1:$REDIS
server:
  host: 127.0.0.1
  threads: $THREADS
EOF
RUST_LOG=${SLUICE_LOG:-warn,sluice::access=info} ${SLUICE_WRAP:-} "$SLUICE_BIN" --config "$work/sluice.yaml" --port "$SLUICE" \
  --upgrade-sock "$work/upgrade.sock" 2> "$work/access.log" & sluice_pid=$!; pids+=($sluice_pid)
if [[ " $PHASES " == *" ab "* ]]; then
  SLUICE_BIN_B=${SLUICE_BIN_B:-$SLUICE_BIN}
  SLUICE_B=$(free_port)
  # `server:` is the config's last block: B's lines are appended to it.
  { cat "$work/sluice.yaml"; [ -z "${SLUICE_SERVER_B:-}" ] || printf '%s\n' "$SLUICE_SERVER_B"; } \
    > "$work/sluice-b.yaml"
  RUST_LOG=${SLUICE_LOG_B:-${SLUICE_LOG:-warn,sluice::access=info}} "$SLUICE_BIN_B" --config "$work/sluice-b.yaml" \
    --port "$SLUICE_B" --upgrade-sock "$work/upgrade-b.sock" 2> "$work/access-b.log" & sluice_b_pid=$!
  pids+=($sluice_b_pid)
  echo "load bench: Sluice B is $SLUICE_BIN_B${SLUICE_SERVER_B:+, server: + $SLUICE_SERVER_B}" >&2
fi

# A ~1.5 KB chat request, with one field the allow-list drops; with BODY_KB, a prompt of that
# many KiB instead, in lines of ~90 bytes (a `\n` escape each, as a conversation has).
if [ -n "${BODY_KB:-}" ]; then
  content=$(python3 -c "import sys; line = 'The quick brown fox jumps over the lazy dog. ' * 2
print('\\\\n'.join([line] * max(1, int(sys.argv[1]) * 1024 // (len(line) + 2))))" "$BODY_KB")
else
  content=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 30)[:1300])')
fi
body="{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"$content\"}],\"temperature\":0.2,\"max_tokens\":64,\"_client_trace\":\"x\"}"
printf '%s' "$body" > "$work/body.json"
cat > "$work/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
local f = io.open("$work/body.json", "r"); wrk.body = f:read("*a"); f:close()
EOF
if [ "${CLIENT:-}" = sdk ]; then
  cat >> "$work/post.lua" <<'EOF'
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.0"
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.0"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.11.7"
wrk.headers["X-Stainless-Retry-Count"] = "0"
wrk.headers["X-Stainless-Read-Timeout"] = "600"
EOF
fi

for port in "$UPSTREAM" "$PROXY" "$SLUICE" ${SLUICE_B:-}; do
  for _ in $(seq 600); do curl -fsS -o /dev/null "http://127.0.0.1:$port/health/readiness" -X GET 2>/dev/null && break
    curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && [ "$port" != "$SLUICE" ] && [ "$port" != "${SLUICE_B:-}" ] && break
    sleep 0.1; done
done
for port in "$SLUICE" ${SLUICE_B:-}; do
  check=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
    -H 'authorization: Bearer sk-bench' -H 'content-type: application/json' --data-binary @"$work/body.json")
  [ "$check" = 200 ] || { echo "load bench: Sluice on $port answered $check" >&2; cat "$work"/access*.log >&2; exit 1; }
done

# CPU ticks of a process: "user kernel" (utime and stime of /proc/PID/stat).
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
nginx_ticks() {
  local u=0 k=0 p a b
  for p in $(pgrep -P "$nginx_pid"); do read -r a b < <(cpu_ticks "$p"); u=$((u + a)); k=$((k + b)); done
  echo "$u $k"
}
redis_commands() { redis-cli -p "$REDIS" info stats | tr -d '\r' | awk -F: '/^total_commands_processed/ {print $2}'; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$sluice_pid/status"; }
declare -A rps p50 p99
sluice_requests=0; nginx_requests=0; redis_sum=0
sluice_user=0; sluice_kernel=0; nginx_user=0; nginx_kernel=0
hz=$(getconf CLK_TCK)
avg() { awk '{s=0; for(i=1;i<=NF;i++) s+=$i; printf "%.0f", s/NF}' <<<"$1"; }
if [[ " $PHASES " == *" throughput "* ]]; then
run() { # name port conns
  local out; out=$(wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$work/post.lua" "http://127.0.0.1:$2/v1/chat/completions")
  local r; r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  local a; a=$(awk '$1=="50%" {print $2}' <<<"$out")
  local b; b=$(awk '$1=="99%" {print $2}' <<<"$out")
  local n; n=$(awk '/requests in/ {print $1}' <<<"$out")
  local errors; errors=$(awk '/Non-2xx|Socket errors/' <<<"$out")
  [ -z "$errors" ] || echo "  $1 c=$3: $errors" >&2
  echo "$r $a $b $n"
}
for conns in $CONNS; do
  for round in $(seq "$ROUNDS"); do
    for target in direct nginx sluice; do
      case $target in direct) port=$UPSTREAM;; nginx) port=$PROXY;; sluice) port=$SLUICE;; esac
      [ "$target" = sluice ] && { read -r u0 k0 < <(cpu_ticks "$sluice_pid"); c0=$(redis_commands); }
      [ "$target" = nginx ] && read -r u0 k0 < <(nginx_ticks)
      read -r r a b n < <(run "$target" "$port" "$conns")
      if [ "$target" = sluice ]; then
        read -r u1 k1 < <(cpu_ticks "$sluice_pid")
        sluice_user=$((sluice_user + u1 - u0)); sluice_kernel=$((sluice_kernel + k1 - k0))
        sluice_requests=$((sluice_requests + n))
        redis_sum=$((redis_sum + $(redis_commands) - c0))
      fi
      if [ "$target" = nginx ]; then
        read -r u1 k1 < <(nginx_ticks)
        nginx_user=$((nginx_user + u1 - u0)); nginx_kernel=$((nginx_kernel + k1 - k0))
        nginx_requests=$((nginx_requests + n))
      fi
      echo "  round $round c=$conns $target: $r req/s, p50 $a, p99 $b" >&2
      rps[$target,$conns]="${rps[$target,$conns]:-} $r"; p50[$target,$conns]=$a; p99[$target,$conns]=$b
    done
  done
done

printf '\n%-8s %6s %12s %10s %10s\n' target conns "req/s (avg)" "p50 (last)" "p99 (last)"
for conns in $CONNS; do
  for target in direct nginx sluice; do
    printf '%-8s %6s %12s %10s %10s\n' "$target" "$conns" "$(avg "${rps[$target,$conns]}")" "${p50[$target,$conns]}" "${p99[$target,$conns]}"
  done
  ratio=$(awk -v s="$(avg "${rps[sluice,$conns]}")" -v n="$(avg "${rps[nginx,$conns]}")" 'BEGIN{printf "%.2f", s/n}')
  # Each round's Sluice run against the nginx run just before it: a machine whose speed drifts
  # (a shared VM) moves both alike, so these pairs are steadier than the averages.
  paired=$(awk -v s="${rps[sluice,$conns]}" -v n="${rps[nginx,$conns]}" 'BEGIN{
    k = split(s, a, " "); split(n, b, " ")
    for (i = 1; i <= k; i++) r[i] = a[i] / b[i]
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
    for (i = 1; i <= k; i++) out = out sprintf("%s%.2f", i > 1 ? " " : "", r[i])
    m = (k % 2) ? r[(k + 1) / 2] : (r[k / 2] + r[k / 2 + 1]) / 2
    printf "%s; median %.2f", out, m }')
  echo "sluice/nginx at c=$conns: ${ratio}x (per round, sorted: $paired)"
done
rss=$(awk '/VmHWM/ {print $2" "$3}' "/proc/$sluice_pid/status")
per_request() { awk -v t="$1" -v hz="$hz" -v n="$2" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}'; }
cpu_us=$(per_request $((sluice_user + sluice_kernel)) "$sluice_requests")
nginx_us=$(per_request $((nginx_user + nginx_kernel)) "$nginx_requests")
echo "sluice: peak RSS $rss; CPU $cpu_us µs per request (user $(per_request "$sluice_user" "$sluice_requests"), kernel $(per_request "$sluice_kernel" "$sluice_requests"); $(awk -v c="$cpu_us" 'BEGIN{printf "%.2f", c*10000/1e6}') s per 10k requests) over $sluice_requests requests"
echo "nginx: CPU $nginx_us µs per request (user $(per_request "$nginx_user" "$nginx_requests"), kernel $(per_request "$nginx_kernel" "$nginx_requests"); workers) over $nginx_requests requests"
echo "redis: $(awk -v c="$redis_sum" -v n="$sluice_requests" 'BEGIN{printf "%.5f", c/n}') commands per Sluice request ($redis_sum commands)"
echo "sluice: $(wc -l < "$work/access.log") access-log lines written"
fi

# oha's JSON summary as "requests errors p50_us p99_us".
oha_summary() {
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
# oha cancels what is in flight when a -z run ends: its own cut, not a server error.
cut = "aborted due to deadline"
failed = {k: v for k, v in d.get("errorDistribution", {}).items() if k != cut}
errors = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(failed.values())
if errors:
    print("  errors:", {k: v for k, v in codes.items() if not k.startswith("2")}, failed, file=sys.stderr)
p = d["latencyPercentiles"]
print(ok + errors, errors, round((p["p50"] or 0) * 1e6), round((p["p99"] or 0) * 1e6))
' "$1"
}
oha_post() { # url body_file out_file [oha args...]
  local url=$1 body=$2 out=$3; shift 3
  oha --no-tui -m POST -T application/json -H "Authorization: Bearer sk-bench" -D "$body" \
    --output-format json -o "$out" "$@" "$url" >/dev/null
}

# Two targets under load at once, DURATION seconds, `conns` connections each: per target
# "requests cpu_us_per_request". Each gets its own wrk; both wrk start together.
at_once() { # conns port_a ticks_fn_a port_b ticks_fn_b
  local conns=$1 a0 b0 a1 b1 na nb
  a0=$($3); b0=$($5)
  wrk -t1 -c"$conns" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:$2/v1/chat/completions" > "$work/at-a.txt" &
  local wa=$!
  wrk -t1 -c"$conns" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:$4/v1/chat/completions" > "$work/at-b.txt" &
  local wb=$!
  wait "$wa" "$wb"
  a1=$($3); b1=$($5)
  for f in at-a at-b; do
    awk '/Non-2xx|Socket errors/ {print "  errors: " $0}' "$work/$f.txt" >&2
  done
  na=$(awk '/requests in/ {print $1}' "$work/at-a.txt"); nb=$(awk '/requests in/ {print $1}' "$work/at-b.txt")
  awk -v a=$((a1 - a0)) -v b=$((b1 - b0)) -v na="$na" -v nb="$nb" -v hz="$hz" -v d="$DURATION" \
    'BEGIN { printf "%.0f %.2f %.0f %.2f\n", na / d, a / hz * 1e6 / na, nb / d, b / hz * 1e6 / nb }'
}
ticks_sum() { local u k; read -r u k < <(cpu_ticks "$1"); echo $((u + k)); }
sluice_sum() { ticks_sum "$sluice_pid"; }
sluice_b_sum() { ticks_sum "$sluice_b_pid"; }
nginx_sum() { local u k; read -r u k < <(nginx_ticks); echo $((u + k)); }
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

if [[ " $PHASES " == *" paired "* ]]; then
  echo
  echo "paired: nginx and Sluice under load at once, ${DURATION}s rounds"
  for conns in ${PAIRED_CONNS:-32 128}; do
    cpu_ratios=""; rps_ratios=""
    for round in $(seq "$ROUNDS"); do
      read -r rs cs rn cn < <(at_once "$conns" "$SLUICE" sluice_sum "$PROXY" nginx_sum)
      cr=$(awk -v a="$cs" -v b="$cn" 'BEGIN{printf "%.3f", a / b}'); rr=$(awk -v a="$rs" -v b="$rn" 'BEGIN{printf "%.3f", a / b}')
      echo "  round $round, c=$conns each: sluice $rs req/s at $cs µs CPU/request, nginx $rn req/s at $cn µs; CPU sluice/nginx $cr, req/s $rr"
      cpu_ratios="$cpu_ratios $cr"; rps_ratios="$rps_ratios $rr"
    done
    echo "paired c=$conns: CPU per request sluice/nginx median $(median "$cpu_ratios") (${cpu_ratios# }), requests/s median $(median "$rps_ratios")"
  done
fi

if [[ " $PHASES " == *" ab "* ]]; then
  echo
  echo "ab: Sluice A ($SLUICE_BIN) and B ($SLUICE_BIN_B${SLUICE_SERVER_B:+; server: +$SLUICE_SERVER_B}${SLUICE_LOG_B:+; RUST_LOG=$SLUICE_LOG_B}) under load at once"
  for conns in ${PAIRED_CONNS:-32 128}; do
    cpu_ratios=""
    for round in $(seq "$ROUNDS"); do
      read -r ra ca rb cb < <(at_once "$conns" "$SLUICE" sluice_sum "$SLUICE_B" sluice_b_sum)
      cr=$(awk -v a="$cb" -v b="$ca" 'BEGIN{printf "%.3f", a / b}')
      echo "  round $round, c=$conns each: A $ra req/s at $ca µs CPU/request, B $rb req/s at $cb µs; CPU B/A $cr"
      cpu_ratios="$cpu_ratios $cr"
    done
    echo "ab c=$conns: CPU per request B/A median $(median "$cpu_ratios") (${cpu_ratios# })"
  done
fi

# Six oha runs with `args`: direct, nginx and Sluice, twice over; after each round, what each
# proxy adds to the direct run's p50 and p99.
added_latency() { # args...
  local target port n e a b proxy
  local -A lat_p50 lat_p99
  for target in direct nginx sluice direct nginx sluice; do
    case $target in direct) port=$UPSTREAM;; nginx) port=$PROXY;; sluice) port=$SLUICE;; esac
    oha_post "http://127.0.0.1:$port/v1/chat/completions" "$work/body.json" "$work/latency.json" "$@"
    read -r n e a b < <(oha_summary "$work/latency.json")
    echo "  $target: $n requests, $e errors, p50 ${a} µs, p99 ${b} µs"
    lat_p50[$target]=$a; lat_p99[$target]=$b
    if [ "$target" = sluice ]; then # a round done: what each proxy adds to its direct run
      for proxy in nginx sluice; do
        echo "  $proxy adds: p50 $(( ${lat_p50[$proxy]} - ${lat_p50[direct]} )) µs, p99 $(( ${lat_p99[$proxy]} - ${lat_p99[direct]} )) µs"
      done
    fi
  done 2>&1
}

if [[ " $PHASES " == *" fixed "* ]]; then
  echo
  echo "fixed rate: $RATE req/s for ${FIXED_SECONDS}s, 32 connections, latency-corrected"
  added_latency -z "${FIXED_SECONDS}s" -q "$RATE" --latency-correction -c 32
fi

if [[ " $PHASES " == *" serial "* ]]; then
  echo
  echo "serial: $SERIAL_REQUESTS requests one at a time on one connection"
  added_latency -n "$SERIAL_REQUESTS" -c 1
fi

if [[ " $PHASES " == *" stream "* ]]; then
  echo
  printf '{"model":"stream-model","stream":true,"messages":[{"role":"user","content":"stream please"}]}' > "$work/stream.json"
  base=$(rss_kb); peak=$base
  oha_post "http://127.0.0.1:$SLUICE/v1/chat/completions" "$work/stream.json" "$work/stream-out.json" \
    -n "$STREAMS" -c "$STREAMS" -t 60s & oha_pid=$!
  while kill -0 "$oha_pid" 2>/dev/null; do r=$(rss_kb); (( r > peak )) && peak=$r; sleep 0.1; done
  wait "$oha_pid" || true
  read -r n e a b < <(oha_summary "$work/stream-out.json")
  echo "streams: $STREAMS concurrent SSE streams of 100 chunks (20 ms apart): $n done, $e errors, duration p50 $((a / 1000)) ms, p99 $((b / 1000)) ms"
  echo "sluice RSS during the streams: $((base / 1024)) MB before, $((peak / 1024)) MB peak"
  (( e == 0 )) || { echo "  sluice's last warnings:"; grep -v 'sluice::access' "$work/access.log" | tail -3; } >&2
fi

if [[ " $PHASES " == *" soak "* ]]; then
  echo
  echo "soak: $SOAK_RATE req/s for $SOAK_MINUTES min through Sluice (Redis-backed limits), a line per minute"
  for minute in $(seq "$SOAK_MINUTES"); do
    oha_post "http://127.0.0.1:$SLUICE/v1/chat/completions" "$work/body.json" "$work/soak.json" \
      -z 60s -q "$SOAK_RATE" --latency-correction -c 64
    read -r n e a b < <(oha_summary "$work/soak.json")
    echo "  minute $minute: $n requests, $e errors ($(awk -v e="$e" -v n="$n" 'BEGIN{printf "%.4f", 100*e/n}') %), p50 ${a} µs, p99 ${b} µs, RSS $(( $(rss_kb) / 1024 )) MB"
  done
  echo "soak: RSS peak $(awk '/VmHWM/ {print $2" "$3}' "/proc/$sluice_pid/status")"
  sleep 15
  echo "soak: RSS after 15 s idle: $(( $(rss_kb) / 1024 )) MB"
fi

if [[ " $PHASES " == *" idle "* ]]; then
  # Each connection sends one request, reads its answer and stays open: what a keep-alive
  # connection costs Sluice while it waits for its next request.
  IDLE_CONNS=${IDLE_CONNS:-2000}
  echo
  sleep 1
  before=$(rss_kb)
  python3 - "$SLUICE" "$IDLE_CONNS" "$work/body.json" > "$work/idle.out" <<'PY' &
import socket, sys, time
port, n, body = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "rb").read()
head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n" % len(body)).encode()
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
for s in socks:
    s.sendall(head + body)
answered = 0
for s in socks:
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or b'"usage"' not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    answered += data.startswith(b"HTTP/1.1 200")
print(answered, flush=True)
time.sleep(5)  # held open while the shell reads Sluice's RSS
PY
  idle_pid=$!
  for _ in $(seq 600); do [ -s "$work/idle.out" ] && break; sleep 0.1; done
  sleep 2 # answers written, buffers released
  after=$(rss_kb)
  wait "$idle_pid" || true
  echo "idle: $IDLE_CONNS keep-alive connections, $(cat "$work/idle.out") answered 200, RSS $((before / 1024)) -> $((after / 1024)) MB, $(awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN{printf "%.1f", (a - b) / n}') kB per connection"
fi

if [[ " $PHASES " == *" profile "* ]]; then
  command -v callgrind_control >/dev/null || { echo "load bench: valgrind is missing" >&2; exit 1; }
  PROFILE_REQUESTS=${PROFILE_REQUESTS:-5000}
  echo
  echo "profile: $PROFILE_REQUESTS requests per line under callgrind (counts per request)"
  printf '%6s %14s %14s %14s\n' conns instructions "L1 misses" "1 MiB misses"
  for conns in 8 256; do
    port=$(free_port); rm -f "$work"/callgrind.out*
    RUST_LOG=${SLUICE_LOG:-warn,sluice::access=info} valgrind --tool=callgrind --cache-sim=yes \
      --D1=49152,12,64 --LL=1048576,16,64 --callgrind-out-file="$work/callgrind.out" \
      "$SLUICE_BIN" --config "$work/sluice.yaml" --port "$port" \
      --upgrade-sock "$work/profile.sock" 2> "$work/profile.log" & vg_pid=$!
    for _ in $(seq 600); do curl -fsS -o /dev/null "http://127.0.0.1:$port/health/readiness" 2>/dev/null && break; sleep 0.1; done
    url="http://127.0.0.1:$port/v1/chat/completions"
    oha_post "$url" "$work/body.json" "$work/profile.json" -n 1000 -c "$conns"
    callgrind_control -z "$vg_pid" >/dev/null 2>&1
    oha_post "$url" "$work/body.json" "$work/profile.json" -n "$PROFILE_REQUESTS" -c "$conns"
    read -r n e _ _ < <(oha_summary "$work/profile.json")
    callgrind_control -d "$vg_pid" >/dev/null 2>&1
    kill "$vg_pid"; wait "$vg_pid" 2>/dev/null || true
    (( e == 0 )) || echo "  $e errors at c=$conns" >&2
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw; the dump is the measured part alone.
    awk -v n="$n" -v c="$conns" '/^events:/ {for (i = 2; i <= NF; i++) col[$i] = i - 1}
      /^summary:/ {printf "%6d %14.0f %14.0f %14.0f\n", c, $(col["Ir"] + 1) / n,
        ($(col["D1mr"] + 1) + $(col["D1mw"] + 1)) / n, ($(col["DLmr"] + 1) + $(col["DLmw"] + 1)) / n}' \
      "$(ls -t "$work"/callgrind.out* | grep -v '\.out$' | head -1)"
    if [ -n "${PROFILE_OUT:-}" ]; then
      mkdir -p "$PROFILE_OUT"
      cp "$(ls -t "$work"/callgrind.out* | grep -v '\.out$' | head -1)" "$PROFILE_OUT/callgrind.$conns"
    fi
  done
fi
