#!/usr/bin/env bash
# The GPU check as one run of at most 9 minutes, 7 on an H200 (docs/speed.md, "GPU"):
# installs the wheels that tools/gpu_prepare.sh put in .gpu_carry/, runs the `cuda` tests
# (tests/test_cuda.py), times every file eager and with --compile (tools/gpu_timing.py) and prints
# the test summary and the table last. Logs and results go to $OUT (default results/gpu_check).
#
#   bash tools/gpu_check.sh                  # on the GPU machine, with .gpu_carry carried
#   bash tools/gpu_check.sh --cpu-dry-run    # anywhere: the same steps on the CPU, tiny, no wheels
#
# GPU_CHECK_SECONDS (default 540) bounds the whole; GPU_CHECK_CARRY names another carry folder.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") dry=0 ;;
    --cpu-dry-run) dry=1 ;;
    *) echo "error: unknown argument '$1'; usage: bash tools/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
start=$(date +%s)
budget=${GPU_CHECK_SECONDS:-540}
carry=${GPU_CHECK_CARRY:-.gpu_carry}
out=${OUT:-results/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out" || { echo "error: cannot create the results folder $out" >&2; exit 1; }
export PYTHONUNBUFFERED=1

timing=()
if [ "$dry" = 0 ]; then
    if [ ! -d "$carry/wheels" ] || [ ! -d "$carry/datasets" ]; then
        echo "error: $carry/wheels and $carry/datasets are missing: run bash tools/gpu_prepare.sh here and carry $carry" >&2
        exit 1
    fi
    # --no-deps: the wheels are exactly what the image lacks (tools/gpu_prepare.sh says which)
    if ! { "$python" -m pip install --no-index --no-deps --find-links "$carry/wheels" "$carry"/wheels/*.whl \
            && "$python" -c "import gymnasium, minari, mujoco, tyro"; } >"$out/install.log" 2>&1; then
        echo "error: the carried wheels did not install: $(tail -n 1 "$out/install.log") ($out/install.log)" >&2
        exit 1
    fi
    export MINARI_DATASETS_PATH="$PWD/$carry/datasets"
else
    MINARI_DATASETS_PATH=$(mktemp -d) || exit 1
    export MINARI_DATASETS_PATH
    trap 'rm -rf "$MINARI_DATASETS_PATH"' EXIT
    # on the CPU one file takes every path of the tests; the timing times all files, tiny
    export GPU_CHECK_DEVICE=cpu GPU_CHECK_FILES=bc GPU_CHECK_COMPILE_BACKEND=eager OMP_NUM_THREADS=1
    timing=(--device cpu --small --compile-backend eager --steps 3 --warmup 4 --profile-steps 2 --transitions 2000)
fi

echo "== cuda tests (log: $out/tests.log)"
# SIGINT at the limit: pytest stops and still writes its summary and the XML report
timeout -s INT $((budget * 55 / 100)) "$python" -m pytest -q -rfE -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_status=$?
summary=$(tail -n 1 "$out/tests.log")

echo "== timing (log: $out/timing.log)"
left=$((start + budget - $(date +%s)))
: >"$out/timing.log"
timeout $((left > 10 ? left : 10)) "$python" tools/gpu_timing.py --out "$out" --deadline $((start + budget - 60)) \
    "${timing[@]}" 2>>"$out/timing.log" | tee -a "$out/timing.log"
timing_status=$?

echo
grep -E "^(FAILED|ERROR) " "$out/tests.log"
echo "tests: $summary"
if [ -f "$out/timing.md" ]; then cat "$out/timing.md"; else echo "timing: no table (see $out/timing.log)"; fi
[ "$tests_status" = 0 ] && [ "$timing_status" = 0 ]
