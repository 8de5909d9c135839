#!/usr/bin/env bash
# The CIFAR-10 GPU measurements of issue 3 in one command of at most BUDGET seconds, for a machine lent for
# minutes (the device README: 10 minutes per command): the paper's recipes (float, deterministic, stochastic)
# x SEEDS side by side on one GPU to a shared time budget, the GPU tests beside the data preparation, then the
# training-step benchmark (the goals' ratios) and, with EXPORT=1, the packed export of the first seed's binary
# runs. What it measures goes to OUT, as logs and results.tgz (the run directories without their model and
# checkpoint files).
#
#   PYTHONPATH=src BUDGET=540 OUT=/tmp/out bash bench/gpu_cifar10.sh      # on the GPU machine
#
# Data: DATA (default .data) holds cifar10-jpeg.tar.gz, or any CIFAR-10 source the `cifar10` loader takes, and
# MNIST/ for the GPU tests (`pytest -m gpu`: the tests that need CUDA).
# Settings (environment): BUDGET seconds for the whole command (default 540); RECIPES (default the three
# paper recipes); SEEDS (default 0,1); JOBS runs at a time (default: all); SPEED the train speed options
# (default --amp bf16 --channels-last --cuda-graph); TRAIN more train options (e.g. --train-subset 500 for a
# trial on a CPU with DEVICE=cpu SPEED=); BENCH=0 / TESTS=0 skip those parts; EXPORT=1 adds the exports (up
# to 90 s each, taken from the training time); MPS=0 does not start the CUDA MPS daemon (the processes then
# share the GPU by time slices instead of running side by side).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET=${BUDGET:-540}
OUT=${OUT:-runs/gpu-cifar10-out}
DATA=${DATA:-.data}
DEVICE=${DEVICE:-cuda}
RECIPES=${RECIPES:-cifar10-float cifar10-deterministic cifar10-stochastic}
SEEDS=${SEEDS:-0,1}
read -r -a recipes <<< "$RECIPES"
n_seeds=$(tr ',' '\n' <<< "$SEEDS" | grep -c .)
JOBS=${JOBS:-$(( ${#recipes[@]} * n_seeds ))}
SPEED=${SPEED---amp bf16 --channels-last --cuda-graph}
TRAIN=${TRAIN:-}
RUNS=${RUNS:-runs/gpu-cifar10}
# after training: the step benchmark (up to 75 s), the exports (up to 90 s each), the archive
n_binary=$(printf '%s\n' "${recipes[@]}" | grep -vc float)
TAIL=$(( ${BENCH:-1} * 75 + ${EXPORT:-0} * 90 * n_binary + 15 ))
mkdir -p "$OUT" "$RUNS"
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
if command -v binaryconnect > /dev/null; then bc=(binaryconnect); else bc=(python -m binaryconnect.cli); fi

{
  date -u; uname -a; echo "cpus: $(nproc --all)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "recipes: $RECIPES; seeds $SEEDS; jobs $JOBS; speed: $SPEED; train: $TRAIN; budget $BUDGET s"
} > "$OUT/environment.txt" 2>&1

mps=0
if [ "$DEVICE" != cpu ] && [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/bc-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/bc-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && mps=1
  # a daemon that clients cannot reach would fail every run: check that a process gets the GPU through it
  if [ "$mps" = 1 ] && ! timeout 60 python -c "import torch; torch.ones(1, device='cuda').sum().item()" \
      >> "$OUT/environment.txt" 2>&1; then
    echo quit | nvidia-cuda-mps-control; mps=0
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "mps: a CUDA process failed through the daemon; stopped it" >> "$OUT/environment.txt"
  fi
fi
echo "mps: $mps" >> "$OUT/environment.txt"

if [ "${TESTS:-1}" = 1 ] && [ "$DEVICE" != cpu ]; then  # beside the data preparation, which uses the CPU
  ( BINARYCONNECT_DATA="$DATA" timeout 150 python -m pytest -q -rs -m gpu -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1;
    echo "exit $?" >> "$OUT/gpu-tests.log" ) &
fi

# The runs plan their epochs to TRAIN_BUDGET after their first epoch; the sweep's deadline stops what is
# still going (with a checkpoint) so that the rest of the command keeps its time. The data preparation
# (decoding and ZCA, once, into the cache) comes out of the budget: 60 s are set aside for it.
deadline=$(( $(left) - TAIL ))
train_budget=$(( deadline - 60 ))
echo "sweep: deadline ${deadline} s, runs' time budget ${train_budget} s" | tee -a "$OUT/environment.txt"
# shellcheck disable=SC2086  # SPEED and TRAIN are lists of options
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=1 \
  "${bc[@]}" sweep "${recipes[@]}" --seeds "$SEEDS" -j "$JOBS" -o "$RUNS" --deadline "$deadline" --markdown -- \
  --data-dir "$DATA" --device "$DEVICE" --time-budget "$train_budget" --no-progress $SPEED $TRAIN \
  > "$OUT/sweep.log" 2>&1
echo "sweep exit $? at $(( $(date +%s) - start )) s" >> "$OUT/environment.txt"
wait  # the tests

if [ "$mps" = 1 ]; then echo quit | nvidia-cuda-mps-control; fi

if [ "${BENCH:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 75 python bench/bench_train_step.py --device "$DEVICE" --network cifar10 --rounds 3 --json \
    --fp32-baseline $SPEED > "$OUT/bench-train-step.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench-train-step.log"
fi

if [ "${EXPORT:-0}" = 1 ]; then
  first_seed=${SEEDS%%,*}
  for r in "${recipes[@]}"; do
    case "$r" in *float*) continue ;; esac
    run="$RUNS/$r-s$first_seed"
    [ -f "$run/model.safetensors" ] || continue
    timeout 90 "${bc[@]}" export "$run" --evaluate --data-dir "$DATA" > "$OUT/export-$r-s$first_seed.log" 2>&1
    echo "export exit $?" >> "$OUT/export-$r-s$first_seed.log"
  done
fi

tar -czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoint*' "$RUNS" 2> /dev/null
echo "done at $(( $(date +%s) - start )) s of $BUDGET" >> "$OUT/environment.txt"
