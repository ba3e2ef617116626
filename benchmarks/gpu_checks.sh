#!/usr/bin/env bash
# The checks only a GPU can make, in stages that each fit a few minutes, results and logs into DIR.
#   benchmarks/gpu_checks.sh DIR tests      # install, fastlora env, the GPU tests (pytest -m gpu)
#   benchmarks/gpu_checks.sh DIR kernels [SUITES]  # fastlora bench of the kernel suites (all, or a comma list)
#   benchmarks/gpu_checks.sh DIR training   # fastlora bench --checkpointing, then --max-context
#   benchmarks/gpu_checks.sh DIR static     # every kernel timed beside the static model's estimate (~1 min)
#   benchmarks/gpu_checks.sh DIR tune       # measured dispatch on the GPU: an 8B-shaped QLoRA step at few rows
#                                           # (fused NF4 GEMM vs dequantize + cuBLAS) and at 2048, decisions kept
# Wheels of missing packages (bitsandbytes, liger-kernel) found in .whl/ are installed first, without network.
set -uo pipefail
dir=${1:?usage: benchmarks/gpu_checks.sh DIR tests|kernels|training|static|tune}
stage=${2:?usage: benchmarks/gpu_checks.sh DIR tests|kernels|training|static|tune}
case "$stage" in tests|kernels|training|static|tune) ;; *) echo "gpu_checks.sh: stage must be tests, kernels, training, static or tune, not $stage" >&2; exit 2 ;; esac
mkdir -p "$dir"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastlora-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fastlora-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$dir/install.log" 2>&1 || { cat "$dir/install.log"; exit 1; }

case "$stage" in
  tests)
    fastlora env 2>&1 | tee "$dir/env.txt"
    python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$dir/pytest-gpu.log"
    ;;
  kernels)
    fastlora bench ${3:+--op "$3"} --results-dir "$dir" 2>&1 | tee "$dir/bench-kernels.log"
    ;;
  static)
    env -u TRITON_INTERPRET python3 -m fastlora.benchmarks.static.timed --out "$dir" 2>&1 | tee "$dir/static-timed.log"
    ;;
  tune)
    export FASTLORA_TUNING_CACHE="$dir/tuning.json"
    for rows in 16 2048; do  # each run builds the 8B-shaped model once (random NF4 weights)
      fastlora tune --config 8b --seq-len "$rows" --batch-size 1 2>&1 | tee -a "$dir/tune.log"
    done
    fastlora env 2>&1 | tee "$dir/env-tuned.txt"
    ;;
  training)
    fastlora bench --checkpointing --results-dir "$dir" 2>&1 | tee "$dir/bench-checkpointing.log"
    fastlora bench --max-context --results-dir "$dir" 2>&1 | tee "$dir/bench-max-context.log"
    ;;
esac
