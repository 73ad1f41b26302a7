#!/usr/bin/env bash
# The recipe for a Meta-World policy trained from scratch (issue 15): scripted-expert demos ->
# statistics -> a freshly initialized OpenVLA-family OFT model -> full training with the L1 chunk
# head and proprio -> closed-loop evaluation through the server -> success against training time
# (every saved checkpoint evaluated on fewer episodes). Every step is resumable: run the script
# again after a kill and it continues where it stopped. Results: docs/evaluation.md.
#
#   bash tools/metaworld/train_default.sh            # MT10: models/metaworld-mt10 (about 1 h 50 min)
#   TASKS=mt50 RUN=runs/metaworld/mt50 bash tools/metaworld/train_default.sh
#   # reach alone from random starts with DART noise, no augmentation (docs/evaluation.md, "The
#   # policy copies its own motion", point 8: 19/30, measured as STEPS=400 then rerun with
#   # STEPS=2400, a warm restart; a straight 2,400-step run is not measured)
#   TASKS=reach-v3 PER_TASK=500 START_STEPS=25 ACTION_NOISE=0.3 IMAGE_AUG=false AUX=1.0 \
#     STEPS=2400 SAVE=400 EPISODES=30 RUN=runs/metaworld/reach bash tools/metaworld/train_default.sh
#
# Settings (environment variables, defaults in brackets):
#   RUN [runs/metaworld/default]  run directory (demos/, dataset_statistics.json, init/, train/, eval/)
#   TASKS [mt10]                  Meta-World task set of demos and evaluation
#   PER_TASK [50]                 expert demos per task (the published protocol's 50)
#   START_STEPS [0]               `openvla sim demos --start-steps`: each demo starts from a
#                                 random hand position (an unrecorded move of up to this many
#                                 1 cm steps); 0 keeps the task's fixed start
#   ACTION_NOISE [0]              `openvla sim demos --action-noise`: DART noise on the executed
#                                 xyz actions (the recorded labels stay the expert's)
#   PRESET [metaworld-small]      `openvla init --preset` (docs/init.md)
#   CONFIG []                     `openvla init --config FILE` instead of the preset (e.g.
#                                 tools/metaworld/metaworld-224.toml, the finer-vision shape)
#   STEPS [3500]                  optimizer steps; BATCH [32]; LR [5e-4] (peak)
#   COMPUTE [f32]                 `openvla finetune --compute`: bf16 runs the linears' products in
#                                 bf16 arithmetic (AMX / vdpbf16ps where the CPU has them), about
#                                 1.4x faster a step on AMX and learning as f32 does;
#                                 emulated, so slower than f32, on CPUs without bf16
#                                 (docs/training-speed.md); the shipped model used f32
#   SHUFFLE [50000]               shuffle buffer in frames (decoded 224 px frames: about 150 KB each,
#                                 so 50,000 hold 7.5 GB; the demos interleave the tasks, so a
#                                 buffer smaller than the dataset still mixes every task)
#   SCHEDULE [cosine]             learning-rate schedule (constant|cosine); WARMUP [100] steps
#   IMAGE_AUG [true]              `openvla finetune --image-aug`: the reference's random 90 % crop
#                                 and colour jitter; `false` trains on the frames as rendered (the
#                                 exported model then evaluates without the centre crop)
#   PROPRIO [true]                train with the robot state obs[:4] (`--proprio`); `false` trains
#                                 on image and instruction only: the shape (PRESET or CONFIG) is
#                                 written to $RUN/init.toml without its `proprio_dim` line
#   AUX []                        `openvla finetune --aux-environment-state AUX`: an auxiliary
#                                 head on the demos' object and goal positions with this loss
#                                 weight (e.g. 1.0; training only, the policy's inputs are
#                                 unchanged); empty trains without it
#   SAVE [700]                    checkpoint interval; every checkpoint keeps its model for step 6
#   CURVE_EPISODES [2]            episodes per task for each checkpoint of step 6 (0 skips it)
#   EXPORT_DTYPE [bf16]           dtype of train/model (the evaluated and shipped model)
#   CHUNK [8]                     actions per chunk; EXECUTE [8] actions of a chunk run per call
#   EPISODES [10]                 evaluation episodes per task (seeds 1000..)
#   OPENVLA [target/release/openvla]  the binary (built by `cargo build --release -p openvla-cli`)
#
# Splitting a long run: stop it any time (Ctrl-C or kill); `openvla finetune --resume` restarts
# from the newest checkpoint (saved every SAVE steps) and gives the same result as an
# uninterrupted run. The cosine schedule spans STEPS: to train longer, start a new RUN with a
# larger STEPS (running again with a larger STEPS continues on the longer cosine from where the
# run is, which is not the same as training that long from the start).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
RUN=${RUN:-runs/metaworld/default}
TASKS=${TASKS:-mt10}
PER_TASK=${PER_TASK:-50}
START_STEPS=${START_STEPS:-0}
ACTION_NOISE=${ACTION_NOISE:-0}
PRESET=${PRESET:-metaworld-small}
CONFIG=${CONFIG:-}
STEPS=${STEPS:-3500}
BATCH=${BATCH:-32}
LR=${LR:-5e-4}
COMPUTE=${COMPUTE:-f32}
CHUNK=${CHUNK:-8}
EXECUTE=${EXECUTE:-8}
SCHEDULE=${SCHEDULE:-cosine}
SHUFFLE=${SHUFFLE:-50000}
IMAGE_AUG=${IMAGE_AUG:-true}
PROPRIO=${PROPRIO:-true}
AUX=${AUX:-}
WARMUP=${WARMUP:-100}
SAVE=${SAVE:-700}
CURVE_EPISODES=${CURVE_EPISODES:-2}
EXPORT_DTYPE=${EXPORT_DTYPE:-bf16}
EPISODES=${EPISODES:-10}
OPENVLA=${OPENVLA:-$root/target/release/openvla}
case "$PROPRIO" in
  true | false) ;;
  *) echo "PROPRIO must be true or false, not '$PROPRIO'" >&2; exit 2 ;;
esac
aux=()
if [ -n "$AUX" ]; then
  if ! python3 -c "import sys; w = float(sys.argv[1]); sys.exit(0 if 0 < w < float('inf') else 1)" "$AUX" 2>/dev/null; then
    echo "AUX must be a positive number (the auxiliary loss weight), not '$AUX'" >&2
    exit 2
  fi
  aux=(--aux-environment-state "$AUX")
fi
if [ ! -x "$OPENVLA" ]; then
  echo "building $OPENVLA"
  cargo build --release -p openvla-cli
fi
mkdir -p "$RUN"
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

step "1/6 demos: $PER_TASK scripted-expert episodes per task of $TASKS"
if [ ! -f "$RUN/demos/meta/info.json" ]; then
  resume=()
  [ -d "$RUN/demos/.staging" ] && resume=(--resume)
  "$OPENVLA" sim demos metaworld --tasks "$TASKS" --per-task "$PER_TASK" --out "$RUN/demos" \
    --start-steps "$START_STEPS" --action-noise "$ACTION_NOISE" "${resume[@]}"
fi

step "2/6 statistics (actions and proprio)"
[ -f "$RUN/dataset_statistics.json" ] ||
  "$OPENVLA" stats --data "$RUN/demos" --proprio --out "$RUN/dataset_statistics.json"

shape=(--preset "$PRESET")
[ -n "$CONFIG" ] && shape=(--config "$CONFIG")
proprio=(--proprio)
if [ "$PROPRIO" = false ]; then
  # The same shape without the proprio projector.
  proprio=()
  "$OPENVLA" init "${shape[@]}" --print-config | sed '/^proprio_dim *=/d' > "$RUN/init.toml"
  shape=(--config "$RUN/init.toml")
fi
step "3/6 init: ${shape[*]}"
[ -f "$RUN/init/config.json" ] ||
  "$OPENVLA" init "${shape[@]}" --seed 0 --dtype f32 --stats "$RUN/dataset_statistics.json" --out "$RUN/init"

step "4/6 train: full, L1 head, chunk $CHUNK, proprio $PROPRIO, aux ${AUX:-none}, $STEPS steps of $BATCH"
resume=()
[ -d "$RUN/train/checkpoints" ] && resume=(--resume)
"$OPENVLA" finetune --model "$RUN/init" --data "$RUN/demos" --out "$RUN/train" \
  --mode full --head l1 --chunk "$CHUNK" "${proprio[@]}" "${aux[@]}" \
  --batch-size "$BATCH" --shuffle-buffer "$SHUFFLE" --lr "$LR" --lr-schedule "$SCHEDULE" --warmup-steps "$WARMUP" \
  --max-steps "$STEPS" --save-interval "$SAVE" --keep-last 0 --export-checkpoints \
  --export-dtype "$EXPORT_DTYPE" --compute "$COMPUTE" --image-aug "$IMAGE_AUG" "${resume[@]}"

step "5/6 closed-loop evaluation: $TASKS, $EPISODES episodes per task"
eval_resume=()
[ -f "$RUN/eval/episodes.jsonl" ] && eval_resume=(--resume)
"$OPENVLA" eval metaworld --model "$RUN/train/model" --tasks "$TASKS" --episodes "$EPISODES" \
  --execute "$EXECUTE" --out "$RUN/eval" "${eval_resume[@]}"
echo "results: $RUN/eval/results.md"

step "6/6 success against training time: every checkpoint, $CURVE_EPISODES episodes per task"
if [ "$CURVE_EPISODES" -gt 0 ]; then
  for ck in "$RUN"/train/checkpoints/step-*/; do
    name=$(basename "$ck")
    [ -f "$ck/model/config.json" ] || continue
    [ -f "$RUN/curve/$name/results.json" ] && grep -q '"complete": true' "$RUN/curve/$name/results.json" && continue
    curve_resume=()
    [ -f "$RUN/curve/$name/episodes.jsonl" ] && curve_resume=(--resume)
    "$OPENVLA" eval metaworld --model "$ck/model" --tasks "$TASKS" --episodes "$CURVE_EPISODES" \
      --execute "$EXECUTE" --videos 0 --out "$RUN/curve/$name" "${curve_resume[@]}"
  done
  python3 tools/metaworld/curve.py "$RUN" --batch "$BATCH"
fi
