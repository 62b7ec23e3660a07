#!/usr/bin/env bash
# One seed-replicated GPU comparison, following ../shared/gpu/README.md: unpack the travelling CIFAR-10 copy,
# run a sweep file with N runs at once on the one GPU, then write the report and every run's curves.
#
#   scripts/gpu_study.sh SWEEP_FILE OUT_DIR [RUNS_PER_GPU] [DEADLINE_S]
#
# Needs .gpudata/{cifar10-jpeg.npz,unpack_cifar10.py} (copied from ../shared/gpu, git-ignored, carried).
# DEADLINE_S (default 520) bounds the sweep: runs still going then are stopped cleanly (status
# "interrupted", last epoch's checkpoint kept) and the report lists them as not completed.
# OUT_DIR gets: report.md, report.json, summary.csv, curves.jsonl.gz, neurons.png, curves.png, env.txt, sweep.log.
# EXTRA_SET="epochs=1 train_subset=256" adds config overrides (a quick rehearsal on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
SWEEP=${1:?sweep file}; OUT=${2:?output folder}; PER_GPU=${3:-8}; DEADLINE=${4:-520}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
W=$(mktemp -d)
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  # The device's copy of the checkout may carry a stale .git: pass COMMIT=$(git rev-parse HEAD) from here.
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
SECONDS=0
python3 .gpudata/unpack_cifar10.py .gpudata/cifar10-jpeg.npz "$W" || exit 1
echo "data unpacked in ${SECONDS}s"
timeout --signal=TERM --kill-after=30 "$DEADLINE" \
  python3 -m sparseopt sweep "$SWEEP" --set data_dir="$W" ${EXTRA_SET:-} --gpus 0 --per-device "$PER_GPU" --out "$W/sweep" \
  2>&1 | tee "$OUT/sweep.log"
echo "sweep ended after ${SECONDS}s"
for f in "$W"/sweep/.sweep/logs/*.log; do echo "== $(basename "$f")"; tail -n 2 "$f"; done >> "$OUT/sweep.log"
python3 -m sparseopt report "$W/sweep" --out "$W/report" --curves "$OUT/curves.jsonl.gz"
for f in report.md report.json summary.csv neurons.png curves.png; do
  [ -f "$W/report/$f" ] && cp "$W/report/$f" "$OUT/$f"
done
# Step-time benchmarks (docs/benchmarks.md) when the sweep left time: BENCH_UNTIL=560 runs them only if
# fewer than BENCH_UNTIL - 60 seconds have passed. Appended to sweep.log.
if [ -n "${BENCH_UNTIL:-}" ] && [ "$SECONDS" -lt $((BENCH_UNTIL - 60)) ]; then
  for model in resnet20 resnet50; do
    timeout 30 python3 benchmarks/bench_step.py --model $model --batch 128 --bf16 --channels-last --repeats 20 \
      --memory-steps 0 >> "$OUT/sweep.log" 2>&1
  done
fi
# Runs-per-GPU and compiled-step throughput (issue 13) when BENCH_RUNS is set, also into sweep.log.
if [ -n "${BENCH_RUNS:-}" ]; then
  timeout 120 python3 benchmarks/bench_runs_per_gpu.py --runs 1 4 8 --bf16 --channels-last >> "$OUT/sweep.log" 2>&1
  timeout 120 python3 benchmarks/bench_runs_per_gpu.py --runs 1 --bf16 --channels-last --compile-mode reduce-overhead \
    >> "$OUT/sweep.log" 2>&1
fi
echo "done after ${SECONDS}s"
