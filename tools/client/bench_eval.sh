#!/usr/bin/env bash
# Speed of the Meta-World harness: env steps/s of the scripted experts served over HTTP
# (`--policy expert`, the image rendered and sent every step) against the same workers calling
# the expert in-process (`--policy local-expert`), for 1, 2 and N workers, interleaved, REPEATS
# times; prints the medians. Not run in CI (a benchmark, not a test).
#
#   tools/client/bench_eval.sh [OPENVLA_BIN] [TASKS] [EPISODES] [REPEATS]
set -euo pipefail
bin="${1:-target/release/openvla}"
tasks="${2:-mt10}"
episodes="${3:-2}"
repeats="${4:-3}"
n="$(nproc)"
out="$(mktemp -d)"
workers="1 2"
[ "$n" -gt 2 ] && workers="$workers $n"
for r in $(seq 1 "$repeats"); do
  for w in $workers; do
    for p in local-expert expert; do
      "$bin" eval metaworld --policy "$p" --tasks "$tasks" --episodes "$episodes" --envs "$w" \
        --videos 0 --out "$out/$p-$w-$r" >/dev/null 2>&1
    done
  done
done
python3 - "$out" "$repeats" $workers <<'PY'
import json, statistics, sys
out, repeats, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| workers | in-process expert steps/s | expert over HTTP steps/s | HTTP / in-process | HTTP latency p50 / p95 ms |")
print("|---|---|---|---|---|")
for w in workers:
    row = {}
    for p in ("local-expert", "expert"):
        rs = [json.load(open(f"{out}/{p}-{w}-{r}/results.json")) for r in range(1, repeats + 1)]
        row[p] = (statistics.median(x["run"]["env_steps_per_s"] for x in rs),
                  statistics.median(x["policy_latency_ms"]["p50"] for x in rs),
                  statistics.median(x["policy_latency_ms"]["p95"] for x in rs))
    a, b = row["local-expert"][0], row["expert"][0]
    print(f"| {w} | {a:.0f} | {b:.0f} | {100 * b / a:.0f}% | {row['expert'][1]:.2f} / {row['expert'][2]:.2f} |")
PY
echo "runs in $out"
