#!/usr/bin/env bash
# Throughput and latency of `openvla serve` under `openvla loadtest`, for docs/serving.md.
#
#   bash tools/client/bench_serve.sh MODEL UNNORM_KEY "CLIENTS..." "MAX_BATCHES..." REQUESTS_PER_CLIENT [WAIT_MS] [PRECISION]
#   bash tools/client/bench_serve.sh models/openvla-tiny fake_bridge_orig "1 8 32" "1 8 32" 25
#
# One server per --max-batch value on a loopback port; every client count is measured against
# it; prints one Markdown row per run (errors by status). TIMEOUT_MS sets --request-timeout-ms
# (default one hour). PORT sets the first port (default 18600); BIN the binary (default
# target/release/openvla, so two builds can be compared in one session); IMAGE the image sent;
# STATE the robot state (OFT models with a proprio projector, e.g. STATE=0,0.6,0.2,0.5). Needs a
# release build (cargo build --release -p openvla-cli).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=$1 key=$2 clients=$3 batches=$4 per_client=$5 wait_ms=${6:-5} precision=${7:-auto}
bin=${BIN:-./target/release/openvla}
port=${PORT:-18600}
image=${IMAGE:-testdata/openvla-tiny/s0_image.png}
state=()
[ -n "${STATE:-}" ] && state=(--state "$STATE")
echo "| max-batch | clients | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | mean batch | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
for mb in $batches; do
  port=$((port + 1))
  log=$(mktemp)
  "$bin" serve --model "$model" --port "$port" --precision "$precision" --max-batch "$mb" \
    --batch-wait-ms "$wait_ms" --queue-size 256 --request-timeout-ms "${TIMEOUT_MS:-3600000}" 2>"$log" &
  pid=$!
  for _ in $(seq 1 600); do grep -q "listening on" "$log" && break; sleep 0.5; done
  for c in $clients; do
    n=$((c * per_client))
    out=$("$bin" loadtest --url "http://127.0.0.1:$port" --clients "$c" --requests "$n" \
      --image "$image" --unnorm-key "$key" "${state[@]}" --warmup 1 --max-seconds 7200 --json)
    python3 - "$mb" "$c" "$out" <<'PY'
import json, sys
mb, c, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
l = r["latency_ms"]
errs = ", ".join(f"{n} x {k}" for k, n in r["errors"].items()) or "0"
print(f"| {mb} | {c} | {r['requests']} | {r['throughput_rps']:.2f} | {l['p50']:.1f} | {l['p95']:.1f} | {l['p99']:.1f} | {r['mean_batch_size']:.2f} | {errs} |")
PY
  done
  kill -TERM "$pid"; wait "$pid" || true
  rm -f "$log"
done
