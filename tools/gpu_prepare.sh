#!/usr/bin/env bash
# What tools/gpu_check.sh needs on the GPU machine, which reaches no network, into .gpu_carry/
# (ignored; the device call carries it): wheels for Python 3.12 on x86-64 Linux of the packages its
# image lacks, and the synthetic dataset that the timing reads. Fails in one line if the carry (the
# working tree and .gpu_carry/) is over the device's 64 MiB.
#
#   bash tools/gpu_prepare.sh
#
# GPU_CHECK_CARRY names another folder; GPU_CARRY_LIMIT_MIB another limit.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${GPU_CHECK_CARRY:-.gpu_carry}
limit=${GPU_CARRY_LIMIT_MIB:-64}
python=${PYTHON:-python3}

# The image has torch, numpy, h5py, typer, packaging, cloudpickle, typing-extensions, tensorboard,
# imageio, pillow and pytest. mujoco requires mujoco-studio (13 MB, its viewer), which `import mujoco`
# does not load: it stays behind, and gpu_check.sh installs with --no-deps.
wheels=(gymnasium==1.4.0 farama-notifications==0.0.6 minari==0.5.4 tyro==1.0.17 docstring-parser==0.18.0
        typeguard==4.6.1 mujoco==4.0.0 mujoco-core==4.0.0 glfw==2.11.0 pyopengl==3.1.10)

mib() { echo $((($1 + 1048575) / 1048576)); }
bytes() { find "$1" -type f -printf '%s\n' | awk '{ n += $1 } END { print n + 0 }'; }

if [ "${1:-}" != "--check-only" ]; then
    [ -z "${1:-}" ] || { echo "error: unknown argument '$1'; usage: bash tools/gpu_prepare.sh [--check-only]" >&2; exit 2; }
    rm -rf "$carry" && mkdir -p "$carry/wheels" || exit 1
    if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$carry/wheels" "${wheels[@]}" >"$carry/download.log" 2>&1; then
        echo "error: pip could not download the wheels: $(grep -m 1 ERROR "$carry/download.log" || tail -n 1 "$carry/download.log")" >&2
        exit 1
    fi
    rm "$carry/download.log"
    if ! MINARI_DATASETS_PATH="$PWD/$carry/datasets" "$python" tools/gpu_timing.py --build-only --transitions 20000 \
            >"$carry/build.log" 2>&1; then
        echo "error: the dataset was not built: $(tail -n 1 "$carry/build.log")" >&2
        exit 1
    fi
    rm "$carry/build.log"
fi

# What a device call sends: tracked files and untracked ones git does not ignore, and the carry
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
wheel_bytes=$(bytes "$carry/wheels")
data_bytes=$(bytes "$carry/datasets")
total=$((tree + wheel_bytes + data_bytes))
sizes="working tree $(mib "$tree"), wheels $(mib "$wheel_bytes"), dataset $(mib "$data_bytes")"
if [ "$total" -gt $((limit * 1048576)) ]; then
    echo "error: the carry is $(mib "$total") MiB ($sizes), over the device's $limit MiB" >&2
    exit 1
fi
echo "carry: $(mib "$total") MiB of $limit ($sizes) in $carry/; on the GPU machine: bash tools/gpu_check.sh"
