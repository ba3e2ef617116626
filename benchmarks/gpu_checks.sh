#!/usr/bin/env bash
# The checks only a GPU can make, in stages that each fit a few minutes, results and logs into DIR.
#   benchmarks/gpu_checks.sh DIR tests      # install, fastlora env, the GPU tests (pytest -m gpu)
#   benchmarks/gpu_checks.sh DIR kernels [SUITES]  # fastlora bench of the kernel suites (all, or a comma list)
#   benchmarks/gpu_checks.sh DIR training   # fastlora bench --checkpointing, then --max-context
# Wheels of missing packages (bitsandbytes, liger-kernel) found in .whl/ are installed first, without network.
set -uo pipefail
dir=${1:?usage: benchmarks/gpu_checks.sh DIR tests|kernels|training}
stage=${2:?usage: benchmarks/gpu_checks.sh DIR tests|kernels|training}
case "$stage" in tests|kernels|training) ;; *) echo "gpu_checks.sh: stage must be tests, kernels or training, not $stage" >&2; exit 2 ;; esac
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
  training)
    fastlora bench --checkpointing --results-dir "$dir" 2>&1 | tee "$dir/bench-checkpointing.log"
    fastlora bench --max-context --results-dir "$dir" 2>&1 | tee "$dir/bench-max-context.log"
    ;;
esac
