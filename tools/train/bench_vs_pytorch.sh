#!/usr/bin/env bash
# Training samples/s of `openvla finetune` (f32 and --compute bf16) against the PyTorch baseline
# (tools/train/pytorch_train_baseline.py, fp32 and bf16 autocast) on the same network and batch,
# back to back in one run (issue 16). Needs a release build and the torch venv:
#   python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.2.0 numpy==1.26.4 safetensors==0.8.0
#   bash tools/train/bench_vs_pytorch.sh [REPEATS]
# Shapes: the Meta-World small policy of tools/metaworld/train_default.sh (full fine-tuning, OFT
# L1 head, chunk 8 x 4, proprio; needs its runs/metaworld/default/{init,demos}) and the tiny
# fixture (LoRA r=4, batch 2, the 256-bin objective, on the LeRobot test dataset).
# With MINIVLA=DIR (a model from `openvla synth --shape minivla --out DIR`) it also times the
# MiniVLA-sized LoRA step (r=32, batch 1, f32 frozen weights, the RLDS test data) and reports
# each run's peak RSS (GNU time).
# Prints one line per run: s/step (median of steps 3..N) and samples/s.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
REPEATS=${1:-2}
OPENVLA=${OPENVLA:-target/release/openvla}
PY=${PY:-.venv-torch/bin/python}
RUN=${RUN:-runs/metaworld/default}
STEPS=${STEPS:-14}
export RAYON_NUM_THREADS=2 OMP_WAIT_POLICY=passive
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
median_step() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
e = [x["elapsed_s"] for x in r]
# Step s takes e[s] - e[s-1] (e[0] is step 1's end): steps 3..N are the deltas from the second.
d = [b - a for a, b in zip(e, e[1:])]
d = sorted(d[1:] if len(d) > 2 else d)
m = d[len(d) // 2]
print(f"{m:.3f} s/step  {int(sys.argv[2]) / m:6.2f} samples/s")
PY
}
torch_step() {
  python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(f\"{r['step_s_mean']:.3f} s/step  {r['samples_per_s']:6.2f} samples/s\")"
}
MINIVLA=${MINIVLA:-}
MINI_STEPS=${MINI_STEPS:-6}
peak_rss() { awk -F': ' '/Maximum resident/ {printf "%.2f GiB peak RSS", $2 / 1048576}' "$1"; }
for rep in $(seq "$REPEATS"); do
  if [ -n "$MINIVLA" ]; then
    for c in f32 bf16; do
      rm -rf "$tmp/mini"
      /usr/bin/time -v "$OPENVLA" finetune --model "$MINIVLA" --data testdata/data/rlds \
        --dataset bridge_orig --out "$tmp/mini" --mode lora --lora-rank 32 --batch-size 1 \
        --shuffle-buffer 16 --max-steps "$MINI_STEPS" --save-interval 100000 --no-memory-check \
        --compute "$c" \
        >/dev/null 2>"$tmp/time"
      echo "minivla LoRA r=32 rust --compute $c        $(median_step "$tmp/mini" 1)  $(peak_rss "$tmp/time")"
    done
    for a in "" --autocast-bf16; do
      /usr/bin/time -v "$PY" tools/train/pytorch_train_baseline.py train --model "$MINIVLA" \
        --batch 1 --seq-len 29 --mode lora --lora-rank 32 --steps $((MINI_STEPS - 1)) $a \
        >"$tmp/torch" 2>"$tmp/time"
      echo "minivla LoRA r=32 pytorch ${a:-fp32}  $(torch_step <"$tmp/torch")  $(peak_rss "$tmp/time")"
    done
  fi
  if [ -d "$RUN/init" ] && [ -d "$RUN/demos" ]; then
    for c in f32 bf16; do
      rm -rf "$tmp/mw"
      "$OPENVLA" finetune --model "$RUN/init" --data "$RUN/demos" --out "$tmp/mw" --mode full \
        --head l1 --chunk 8 --proprio --batch-size 32 --shuffle-buffer 500 --max-steps "$STEPS" \
        --save-interval 100000 --compute "$c" >/dev/null 2>&1
      echo "metaworld-small  rust --compute $c        $(median_step "$tmp/mw" 32)"
    done
    for a in "" --autocast-bf16; do
      echo "metaworld-small  pytorch ${a:-fp32}  $("$PY" tools/train/pytorch_train_baseline.py train \
        --model "$RUN/init" --batch 32 --seq-len 57 --head l1 --chunk 8 --action-dim 4 \
        --proprio-dim 4 --steps 12 $a | torch_step)"
    done
  fi
  for c in f32 bf16; do
    rm -rf "$tmp/tiny"
    "$OPENVLA" finetune --model testdata/openvla-tiny/model --data testdata/data/lerobot/tiny_libero \
      --dataset-config testdata/data/lerobot_libero.toml --out "$tmp/tiny" --mode lora --lora-rank 4 \
      --batch-size 2 --image-aug false --shuffle-buffer 64 --max-steps 30 --save-interval 100000 \
      --no-memory-check --compute "$c" >/dev/null 2>&1
    echo "tiny LoRA r=4    rust --compute $c        $(median_step "$tmp/tiny" 2)"
  done
  for a in "" --autocast-bf16; do
    echo "tiny LoRA r=4    pytorch ${a:-fp32}  $("$PY" tools/train/pytorch_train_baseline.py train \
      --model testdata/openvla-tiny/model --batch 2 --seq-len 29 --mode lora --lora-rank 4 \
      --steps 30 $a | torch_step)"
  done
done
