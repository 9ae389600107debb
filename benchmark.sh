#!/usr/bin/env bash
# Placeholder. The real benchmark (issue "benchmark.sh reproduces the paper tables") will run every
# algorithm on the paper datasets (or their Minari stand-ins), several seeds, and write
# results/summary.md with the papers' numbers side by side. Until then, one run looks like:
#   python algorithms/iql.py --env mujoco/hopper/medium-v0 --seed 0
echo "benchmark.sh is not implemented yet: see README.md, section 'Benchmark', for what is coming." >&2
exit 2
