"""tools/gpu_check.sh before any GPU is seen: its --cpu-dry-run takes the steps of the GPU check on the
CPU (the `cuda` tests, the timing of every file in every mode, the table last, the files under $OUT);
tools/gpu_prepare.sh's limit on the carry."""

import json
import os
import subprocess
import xml.etree.ElementTree as ET

from conftest import ROOT
from test_layout import ALGORITHMS
from tools.gpu_timing import MODES


def script(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)


def test_the_cpu_dry_run_tests_and_times_every_file_and_prints_the_table_last(tmp_path):
    result = script(["tools/gpu_check.sh", "--cpu-dry-run"], OUT=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = [line.split(" | ") for line in lines[-len(ALGORITHMS) * len(MODES):]]
    assert lines[-len(rows) - 2].startswith("| file | mode | steps/s | GPU minutes per 1M steps | kernels per step |")
    assert sorted((r[0].strip("| "), r[1]) for r in rows) == sorted((a, m) for a in ALGORITHMS for m in MODES)
    for row in rows:
        steps_per_s, minutes = float(row[2]), float(row[3])
        assert steps_per_s > 0 and abs(minutes - 1e6 / steps_per_s / 60) <= 0.01 * minutes, row
        assert row[4] == row[5] == "-" and row[7] == "- |", row  # no kernels nor GPU memory on a CPU
        assert float(row[6]) > 0, row  # the host's time to issue one step
    assert "torch " in lines[-len(rows) - 4] and "no GPU (CPU dry run), commit " in lines[-len(rows) - 4]
    tests = next(line for line in lines if line.startswith("tests: "))
    assert " passed" in tests and "failed" not in tests and "error" not in tests, tests
    assert set(os.listdir(tmp_path)) == {"tests.log", "tests.xml", "timing.log", "timing.json", "timing.md"}
    suite = ET.parse(tmp_path / "tests.xml").getroot().find("testsuite")
    assert suite.get("failures") == suite.get("errors") == "0"
    ran = {case.get("name").split("[")[0] for case in suite.iter("testcase") if case.find("skipped") is None}
    assert ran == {"test_a_few_hundred_eager_steps_train_and_the_model_evaluates_on_the_cpu",
                   "test_a_checkpoint_resumes_on_the_other_device_to_the_same_evaluations",
                   "test_compile_trains_as_eager_and_compiles_nothing_after_warm_up",
                   "test_precision_trains_as_fp32_to_within_its_rounding",
                   "test_the_sync_count_sees_a_host_read_and_a_device_wait",
                   "test_a_main_loop_step_does_not_wait_for_the_device"}, ran  # every test of the file
    with open(tmp_path / "timing.json") as f:
        assert len(json.load(f)["rows"]) == len(rows)


def test_the_gpu_check_without_its_carry_or_with_another_argument_says_so_in_one_line(tmp_path):
    missing = script(["tools/gpu_check.sh"], OUT=str(tmp_path), GPU_CHECK_CARRY=str(tmp_path / "none"))
    assert missing.returncode == 1 and missing.stderr == (
        f"error: {tmp_path}/none/wheels and {tmp_path}/none/datasets are missing: run bash tools/gpu_prepare.sh "
        f"here and carry {tmp_path}/none\n")
    other = script(["tools/gpu_check.sh", "--cpu"], OUT=str(tmp_path))
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "unknown argument '--cpu'" in other.stderr


def test_the_prepare_script_refuses_a_carry_over_the_limit_in_one_line(tmp_path):
    """--check-only measures a carry as prepared (here: a wheel of 3 MiB) against the limit."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "datasets").mkdir()
    (tmp_path / "wheels" / "big.whl").write_bytes(b"\0" * 3 * 2**20)
    fits = script(["tools/gpu_prepare.sh", "--check-only"], GPU_CHECK_CARRY=str(tmp_path), GPU_CARRY_LIMIT_MIB="1000")
    assert fits.returncode == 0 and "wheels 3, dataset 0" in fits.stdout, fits.stderr
    tree = int(fits.stdout.split("working tree ")[1].split(",")[0])
    over = script(["tools/gpu_prepare.sh", "--check-only"], GPU_CHECK_CARRY=str(tmp_path),
                  GPU_CARRY_LIMIT_MIB=str(tree + 2))
    assert over.returncode == 1 and over.stderr.count("\n") == 1
    assert over.stderr.startswith(f"error: the carry is {tree + 3} MiB (working tree {tree}, wheels 3, dataset 0)")
