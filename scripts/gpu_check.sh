#!/usr/bin/env bash
# The one command a session with a lent GPU runs (under 9.5 minutes), from the repository root:
#
#   mkdir -p .carry && cp -r ../shared/wheels ../shared/data .carry/    # here, before the call (.carry is ignored)
#   device run (carry: [".carry"]):  bash scripts/gpu_check.sh
#
# Each step writes its result under $OUT as soon as it has it, so a call cut by its limit still
# returns what it had; progress and every figure are printed as well:
#   1. Hydra from the wheels (the GPU machine has torch, torchvision, Lightning and pytest only);
#   2. CIFAR-10 built from the JPEG copy into $DATA_ROOT (about 10 s);
#   3. experiment=speedrun_cifar10: kNN top-1 and wall-clock printed the moment it ends
#      (speedrun.json: its metrics.json; speedrun_log.txt, speedrun_metrics.csv);
#   4. in the time left: pytest -m gpu, bench_throughput.py --compile, bench_losses.py up to 2N = 65,536.
#
# TINY=1 runs every step on the CPU with tiny sizes (tests/test_scripts.py does), in seconds.
# Environment: OUT (default ./gpu_check_out), BUDGET seconds (default 570), DATA_ROOT (default /tmp/gpu_check_data;
# a folder that already holds cifar-10-batches-py is used as it is), WHEELS and SHARED_DATA (default .carry/...,
# else ../shared/...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${BUDGET:-570}
TINY=${TINY:-0}
DATA_ROOT=${DATA_ROOT:-/tmp/gpu_check_data}
WHEELS=${WHEELS:-$( [ -d .carry/wheels ] && echo .carry/wheels || echo ../shared/wheels )}
SHARED_DATA=${SHARED_DATA:-$( [ -d .carry/data ] && echo .carry/data || echo ../shared/data )}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[gpu_check $(($(date +%s) - START)) s] $*" | tee -a "$OUT/summary.txt"; }
# run NAME SECONDS CMD...: CMD's output into $OUT/NAME.txt, cut at SECONDS (or at the budget left, whichever is less)
run() {
  local name=$1 limit=$2
  shift 2
  local avail
  avail=$(($(left) - 5))
  [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped (budget spent)"
    return 0
  fi
  say "$name: start (limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  say "$name: exit $rc$([ $rc -eq 124 ] && echo ' (cut by its time limit)')"
  return 0
}

say "device: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"

# 1. Hydra
if ! $PY -c "import hydra" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site "$WHEELS"/*.whl >"$OUT/setup.txt" 2>&1 ||
    { say "setup: Hydra's wheels did not install (see setup.txt)"; exit 1; }
fi
say "setup: hydra $($PY -c 'import hydra; print(hydra.__version__)')"

# 2. CIFAR-10
if [ ! -d "$DATA_ROOT/cifar-10-batches-py" ]; then
  $PY "$SHARED_DATA/build_cifar10.py" "$DATA_ROOT" >"$OUT/data.txt" 2>&1 || { say "data: build failed (data.txt)"; exit 1; }
fi
say "data: $DATA_ROOT"

# 3. the speedrun
if [ "$TINY" = 1 ]; then
  SPEEDRUN=(model=convnet data.subset=256 data.test_subset=128 data.batch_size=64 trainer.max_epochs=1
    eval.every_n_epochs=1 scheduler.warmup_epochs=0 trainer.accelerator=cpu)
  BENCH=(--device cpu --model convnet --batch-size 16 --steps 1 --warmup 1 --images 32 --workers 1)
  LOSSES=(--device cpu --sizes 64 128 --repeats 1)
  GPU_TESTS=(tests/test_augment.py)  # collecting the whole suite alone takes longer than the rest here
else
  SPEEDRUN=()
  BENCH=(--device cuda --batch-size 512 --compile --cifar-root "$DATA_ROOT")
  LOSSES=(--device cuda --sizes 8192 16384 32768 65536)
  GPU_TESTS=(tests)
fi
RUN_DIR=/tmp/gpu_check_speedrun
rm -rf "$RUN_DIR"
run speedrun_log 500 $PY -m contrastive.cli experiment=speedrun_cifar10 data.root="$DATA_ROOT" \
  hydra.run.dir="$RUN_DIR" trainer.enable_progress_bar=false "${SPEEDRUN[@]}"
cp "$RUN_DIR/metrics.json" "$OUT/speedrun.json" 2>/dev/null
cp "$RUN_DIR/logs/metrics.csv" "$OUT/speedrun_metrics.csv" 2>/dev/null
if [ -f "$OUT/speedrun.json" ]; then
  say "speedrun: $($PY -c "import json; m = json.load(open('$OUT/speedrun.json')); print(f\"kNN top-1 {m['knn_top1']:.2f} (untrained {m['knn_top1_untrained']:.2f}), {m['epochs']:g} epochs, {m['train_seconds']:.0f} s of training\")")"
else
  say "speedrun: no metrics.json (speedrun_log.txt has why)"
fi

# 4. the rest, in the time left
run pytest_gpu 120 $PY -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
run bench_throughput 150 $PY scripts/bench_throughput.py "${BENCH[@]}"
run bench_losses 150 $PY scripts/bench_losses.py "${LOSSES[@]}"
say "done"
