"""How much shared code a short run of each algorithm file executes: for every file, a 20-step run
(pretraining phases of 20 steps, one evaluation episode) under coverage.py, measuring only the
repository's modules other than the algorithm file (common.py, and whatever else the tree at --root
shares: its run_folder.py, speed.py, offline_data/ where it has them). Prints a markdown table of the
executed lines and the files they are in.

    python tools/diagnostics/shared_lines.py                      # this tree
    python tools/diagnostics/shared_lines.py --root /tmp/old      # another checkout, e.g. a worktree
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tools.pretraining import shrink_flags  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--root", default=os.path.dirname(os.path.dirname(HERE)))
p.add_argument("--env", default="local/hopper/medium-replay-v0")
p.add_argument("--steps", type=int, default=20)
a = p.parse_args()
root = os.path.abspath(a.root)
shared = [f for f in ["common.py", "run_folder.py", "speed.py", *glob.glob("offline_data/*.py", root_dir=root)]
          if os.path.exists(os.path.join(root, f))]
print(f"| file | shared lines executed | in files |  ({root}: {', '.join(shared)})")
print("|---|---|---|")
for path in sorted(glob.glob(os.path.join(root, "algorithms", "*.py"))):
    name = os.path.basename(path)[:-3]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, ".coverage")
        cmd = [sys.executable, "-m", "coverage", "run", f"--data-file={data}",
               f"--include={','.join(os.path.join(root, f) for f in shared)}", path, "--env", a.env,
               "--total-steps", str(a.steps), "--eval-every", str(a.steps), "--eval-episodes", "1",
               "--log-every", str(a.steps), "--device", "cpu", "--output-dir", tmp, "--run-name", "r",
               "--no-reuse-cache" if name in ("fisher_brc", "itrpo", "brac_plus") else "",
               *shrink_flags(name, a.steps)]
        run = subprocess.run([c for c in cmd if c], cwd=root, capture_output=True, text=True)
        if run.returncode:
            print(f"| {name} | failed: {run.stderr.strip().splitlines()[-1:]} | |", flush=True)
            continue
        subprocess.run([sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o",
                        os.path.join(tmp, "c.json")], cwd=root, capture_output=True, check=True)
        with open(os.path.join(tmp, "c.json")) as f:
            files = json.load(f)["files"]
        lines = sum(len(v["executed_lines"]) for v in files.values())
        print(f"| {name} | {lines} | {len(files)} |", flush=True)
