#!/usr/bin/env bash
# Reproduce the seed papers' tables: run the algorithms on the paper datasets (or their Minari
# stand-ins) and write results/summary.md. All logic is in tools/benchmark.py; see its --help, or
#   bash benchmark.sh --quick                 # offline, 15-30 minutes on 2 CPU cores
#   bash benchmark.sh --dry-run               # print the commands of the full benchmark
#   bash benchmark.sh --slurm                 # write them as a Slurm array job
set -euo pipefail
exec python "$(dirname "$0")/tools/benchmark.py" "$@"
