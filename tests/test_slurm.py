"""benchmark.sh --slurm on a real single-node Slurm: munged, slurmctld and slurmd started here from
Debian's slurm-wlm and munge (.ci/run installs them), a tiny benchmark submitted as a user would,
from a shell without this Python's environment, one task cancelled and the rest resubmitted; the
summary is the one the dependent job wrote. Skips, saying why, where Slurm is missing or does not
start."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
ALGOS, SEEDS, DATASET = ("bc", "td3_bc"), (0, 1), "local/pendulum/medium-400-v0"
STEPS, EVAL_EVERY = 2000, 200  # a run of td3_bc takes ~15 s on a loaded core: time to cancel it midway
# How long a wait for Slurm may take before the test gives up: tasks start within a second on an idle
# node, and a run takes seconds.
PATIENCE = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: str, node: str) -> str:
    """A single-node configuration without cgroups (containers rarely delegate them): processes are
    tracked by parentage, tasks are not bound to cores, and CPUs and memory are allocated per task so
    that tasks share the node as on a cluster."""
    return "\n".join([
        "ClusterName=benchmark-test",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={folder}/munge.socket",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "ReturnToService=2",
        "MinJobAge=600",  # finished jobs stay in squeue/scontrol long enough to be asked about
        "KillWait=10",
        "InactiveLimit=0",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=test Nodes={node.split()[0].split('=')[1]} Default=YES MaxTime=INFINITE State=UP",
        ""])


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return f"({path} not written)"


@pytest.fixture
def slurm():
    """Environment variables under which sbatch and friends talk to a fresh single-node Slurm."""
    missing = [c for c in DAEMONS + CLIENTS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here (no {', '.join(missing)}); .ci/run installs Debian's "
                    f"slurm-wlm and munge where it runs as root with apt-get")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd (which runs each job as its user) needs root")
    folder = tempfile.mkdtemp(prefix="slurm-")  # short: munge's socket path must fit in 108 bytes
    os.chmod(folder, 0o755)  # munged wants its socket's folder searchable by all
    for sub in ("state", "spool"):
        os.mkdir(os.path.join(folder, sub))
    with open(os.path.join(folder, "munge.key"), "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(os.path.join(folder, "munge.key"), 0o600)
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()
    node = next((line for line in node if line.startswith("NodeName=")), None)
    if node is None:
        pytest.skip("slurmd -C does not describe this machine")
    conf = os.path.join(folder, "slurm.conf")
    with open(conf, "w") as f:
        f.write(slurm_conf(folder, node))
    env = {**os.environ, "SLURM_CONF": conf}
    daemons = []
    try:
        daemons.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={folder}/munge.socket",
             f"--key-file={folder}/munge.key", f"--log-file={folder}/munged.log",
             f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 10
        while not os.path.exists(f"{folder}/munge.socket") and time.time() < deadline:
            time.sleep(0.1)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", conf], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline, state = time.time() + 30, ""
        while time.time() < deadline and state != "idle":
            time.sleep(0.5)
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if any(d.poll() is not None for d in daemons):
                break
        if state != "idle":
            logs = "; ".join(f"{name}: {tail(f'{folder}/{name}.log', 3)!r}" for name in DAEMONS)
            pytest.skip(f"Slurm did not start here (node state {state or 'unknown'!r}; {logs})")
        yield env
    finally:
        if daemons:
            subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
            deadline = time.time() + 30
            while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                            text=True).stdout.strip():
                time.sleep(0.5)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)


def benchmark(*argv, minari: str):
    """tools/benchmark.py with this Python, as the user who writes the script runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *argv], cwd=ROOT,
                          env={**os.environ, "MINARI_DATASETS_PATH": minari, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def submit(script: str, slurm: dict, **variables) -> tuple[str, str]:
    """`bash script` from a shell with nothing of this one: no venv, no dataset variables, a
    minimal PATH (and where this test's Slurm is); returns (array job id, summary job id)."""
    bare = {"PATH": "/usr/bin:/bin", "SLURM_CONF": slurm["SLURM_CONF"], **variables}
    done = subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in bare.items()], "bash", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"array job\(s\) (\d+) and the summary as job (\d+)", done.stdout)
    assert found, done.stdout
    return found.group(1), found.group(2)


def wait_until_gone(job_ids: list[str], slurm: dict, runs: str) -> None:
    deadline = time.time() + PATIENCE
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], env=slurm,
                                capture_output=True, text=True).stdout
        if not queued.strip():
            return
        time.sleep(1)
    logs = "".join(f"\n--- {name}\n{tail(os.path.join(runs, 'slurm-logs', name))}"
                   for name in sorted(os.listdir(os.path.join(runs, "slurm-logs"))))
    pytest.fail(f"jobs still queued after {PATIENCE} s:\n{queued}{logs}")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_a_benchmark_on_slurm_cancelled_and_resubmitted_ends_with_the_full_summary(slurm, tmp_path):
    minari, runs, results = str(tmp_path / "minari"), str(tmp_path / "runs"), str(tmp_path / "results")
    script = str(tmp_path / "benchmark.sbatch")
    argv = ["--algos", *ALGOS, "--datasets", DATASET, "--seeds", *map(str, SEEDS), "--steps", str(STEPS),
            "--eval-every", str(EVAL_EVERY), "--eval-episodes", "1", "--output-dir", runs,
            "--results-dir", results, "--mem", "1G", "--time", "10", "--slurm", script]
    # The tasks neither download nor build: the data must be there first.
    refused = benchmark(*argv, minari=minari)
    assert refused.returncode == 1 and "--fetch-only" in refused.stderr and not os.path.exists(script)
    assert benchmark("--fetch-only", "--datasets", DATASET, minari=minari).returncode == 0
    written = benchmark(*argv, minari=minari)
    assert written.returncode == 0, written.stderr
    assert "4 array tasks" in written.stdout

    array, summary = submit(script, slurm)
    names = [f"{algo}__{DATASET.replace('/', '-')}__s{seed}" for seed in SEEDS for algo in ALGOS]
    cancelled = os.path.join(runs, names[3])  # td3_bc, seed 1: the slowest run, and the last
    deadline = time.time() + PATIENCE
    while not os.path.exists(os.path.join(cancelled, "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    assert os.path.exists(os.path.join(cancelled, "checkpoint.pt")), tail(os.path.join(cancelled, "stdout.log"))
    subprocess.run(["scancel", f"{array}_3"], env=slurm, check=True)
    wait_until_gone([array, summary], slurm, runs)

    # The summary job ran after the array, cancelled task included.
    first = open(os.path.join(results, "summary.md")).read()
    assert "4 runs from" in first and "(1 unfinished, left out of the tables)" in first
    assert not read_json(os.path.join(cancelled, "results.json"))["finished"], \
        "the run finished before it could be cancelled: raise STEPS"
    assert "[summarize] 4 runs" in open(os.path.join(runs, "slurm-logs", f"summary-{summary}.log")).read()

    # Resubmitting writes the one run still to do; it continues from its checkpoint.
    again = benchmark(*argv, minari=minari)
    assert again.returncode == 0 and "1 array tasks (3 runs already finished)" in again.stdout, again.stderr
    array2, summary2 = submit(script, slurm, SBATCH_EXPORT="NONE")  # as clusters that pass no environment
    wait_until_gone([array2, summary2], slurm, runs)

    for name in names:
        results_json = read_json(os.path.join(runs, name, "results.json"))
        assert results_json["finished"] and results_json["evaluations"][-1]["step"] == STEPS, name
        assert results_json["args"]["eval_episodes"] == 1  # the command the script was written with
    log = open(os.path.join(cancelled, "stdout.log")).read()  # both attempts, in the run's folder
    assert log.count("[slurm] job ") == 2 and "stopped by SIGTERM" in log
    assert "resuming from step" in log.split("stopped by SIGTERM")[1]
    final = open(os.path.join(results, "summary.md")).read()
    assert "4 runs from" in final and "(0 unfinished, left out of the tables)" in final
    assert "## Aggregate over tasks" in final and "| td3_bc | 1 | 2 |" in final
    assert f"| `{DATASET}` | td3_bc | 2 |" in final
    assert os.path.exists(os.path.join(runs, "slurm-logs", f"summary-{summary2}.log"))
