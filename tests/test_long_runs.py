"""tools/long_runs.py: the long runs' command lines, what `collect` keeps of a run folder, and the
report's final (mean of the last 10 evaluations) and best scores."""

import json
import os
import socket

import pytest

from tools import long_runs


def test_every_run_resumes_under_a_fixed_name_with_ten_episodes_every_10k_steps():
    names = [long_runs.run_name(a, d, s) for a, d, s, _, _ in long_runs.RUNS]
    assert len(set(names)) == len(names)
    cmd = long_runs.command("td3_bc", long_runs.HOPPER, 1, 1_000_000, [], "/tmp/x")
    assert cmd[cmd.index("--run-name") + 1] == "hopper-medium-replay-v0__td3_bc__1"
    assert cmd[cmd.index("--eval-every") + 1] == "10000" and cmd[cmd.index("--eval-episodes") + 1] == "10"
    assert os.path.exists(cmd[1])


def test_every_dataset_of_the_long_runs_has_a_bc_run_for_its_figures_bc_curve():
    datasets = {d for _, d, _, _, _ in long_runs.RUNS}
    assert datasets == {d for a, d, _, _, _ in long_runs.RUNS if a == "bc"}


def test_collect_keeps_evaluations_and_logged_q_and_report_scores_the_last_ten(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    monkeypatch.setattr(long_runs, "DOCS", str(docs))
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    monkeypatch.setattr(long_runs, "RUNS", [("td3_bc", long_runs.HOPPER, s, 120_000, []) for s in (0, 1)])
    for seed in (0, 1):
        folder = runs_dir / long_runs.run_name("td3_bc", long_runs.HOPPER, seed)
        folder.mkdir(parents=True)
        scores = [float(i + 10 * seed) for i in range(12)]  # 0..11 and 10..21
        json.dump({"finished": True, "train_seconds": 3600.0,
                   "dataset": {"ref_min_score": 0.0, "ref_max_score": 200.0, "episode_return_mean": 20.0,
                               "transitions": 90_000},
                   "evaluations": [{"step": 10_000 * (i + 1), "normalized_score_mean": v, "normalized_score_std": 1.0,
                                    "wall_time": 1.0} for i, v in enumerate(scores)]},
                  open(folder / "results.json", "w"))
        writer = SummaryWriter(str(folder))
        for step, q in ((1000, 5.0), (2000, 50.0 + seed), (3000, 7.0)):
            writer.add_scalar("losses/q1", q, step)
        writer.close()
    long_runs.collect(str(runs_dir))
    kept = json.load(open(docs / "long_runs" / "hopper-medium-replay-v0__td3_bc__1.json"))
    assert kept["behaviour_score"] == pytest.approx(10.0)
    assert kept["q1"] == [[1000, 5.0], [2000, 51.0], [3000, 7.0]]
    assert kept["evaluations"][-1] == [120_000, 21.0, 1.0]
    long_runs.report()
    out = capsys.readouterr().out
    # final: mean over seeds of the last 10 evaluations (2..11 -> 6.5, 12..21 -> 16.5); best: 16 at 120k
    assert "| td3_bc | 2 | 120,000 | 11.5 ± 5.0 | 16.0 (120,000) | 51 | 1.0 |" in out
    assert (docs / "long-hopper-medium-replay-v0.png").stat().st_size > 0


def test_hours_are_the_runs_training_time_not_its_process_wall_time(tmp_path, monkeypatch, capsys):
    """An unfinished run's hours are its training time so far (results.json's train_seconds); a run
    folder without that field gets "—", not the wall time of its last process (pretraining included)."""
    docs = tmp_path / "docs"
    monkeypatch.setattr(long_runs, "DOCS", str(docs))
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    monkeypatch.setattr(long_runs, "RUNS", [("arq", long_runs.HOPPER, 0, 100_000, [])])
    folder = tmp_path / "runs" / long_runs.run_name("arq", long_runs.HOPPER, 0)
    folder.mkdir(parents=True)

    def hours(**train_seconds):
        json.dump({"finished": False, **train_seconds,
                   "dataset": {"ref_min_score": 0.0, "ref_max_score": 200.0, "episode_return_mean": 20.0,
                               "transitions": 90_000},
                   "evaluations": [{"step": 10_000, "normalized_score_mean": 2.0, "normalized_score_std": 0.0,
                                    "wall_time": 9 * 3600.0}]},
                  open(folder / "results.json", "w"))
        long_runs.collect(str(tmp_path / "runs"))
        long_runs.report()
        return capsys.readouterr().out.split("| arq | 1 | 10,000 (unfinished) | 2.0 | 2.0 (10,000) | — | ")[1][:4]

    assert hours() == "— |\n"
    assert hours(train_seconds=1800.0) == "0.5 "


def test_a_run_of_earlier_defaults_is_run_again_replaced_by_todays_and_named_until_then(tmp_path, monkeypatch, capsys):
    """A record whose file's defaults have changed since is not the run RUNS asks for: `run` would start
    it again, `collect` replaces it with today's run from its first evaluation, and the report names its flags
    until then; a run folder whose args differ from today's command is recorded with those flags."""
    from conftest import load_algorithm

    docs, runs_dir = tmp_path / "docs", tmp_path / "runs"
    monkeypatch.setattr(long_runs, "DOCS", str(docs))
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    spec = ("iql", long_runs.HOPPER, 0, 30_000, [])
    monkeypatch.setattr(long_runs, "RUNS", [spec])
    name = long_runs.run_name(*spec[:3])
    (docs / "long_runs").mkdir(parents=True)
    record = {"algorithm": "iql", "env": long_runs.HOPPER, "seed": 0, "total_steps": 30_000, "flags": [],
              "finished": True, "earlier_defaults": ["--normalize-states"], "train_seconds": 60.0,
              "behaviour_score": 10.0, "transitions": 90_000, "q1": [],
              "evaluations": [[10_000 * (i + 1), 20.0, 1.0] for i in range(3)]}
    json.dump(record, open(docs / "long_runs" / f"{name}.json", "w"))
    assert not long_runs.collected_finished(spec)
    long_runs.report()
    assert "| iql (earlier defaults: --normalize-states) | 1 | 30,000 |" in capsys.readouterr().out

    def run_folder(evaluations=1, **changed):
        args = vars(load_algorithm("iql").Args(env=long_runs.HOPPER, total_steps=30_000, eval_every=10_000,
                                               save_model=True, output_dir=str(runs_dir), run_name=name, **changed))
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        json.dump({"finished": False, "train_seconds": 60.0, "args": args,
                   "dataset": {"ref_min_score": 0.0, "ref_max_score": 200.0, "episode_return_mean": 20.0,
                               "transitions": 90_000},
                   "evaluations": [{"step": 10_000, "normalized_score_mean": 5.0, "normalized_score_std": 0.0,
                                    "wall_time": 1.0}][:evaluations]},
                  open(runs_dir / name / "results.json", "w"))
        long_runs.collect(str(runs_dir))
        return json.load(open(docs / "long_runs" / f"{name}.json"))

    # started over, before its first evaluation: nothing to show yet, so the row stays the earlier run's
    assert run_folder(evaluations=0) == record
    assert "kept the collected record (3 evaluations, finished) over the run folder's 0" in capsys.readouterr().out
    today = run_folder()
    assert "earlier_defaults" not in today and len(today["evaluations"]) == 1
    long_runs.report()
    assert "| iql | 1 | 10,000 (unfinished) |" in capsys.readouterr().out
    assert run_folder(normalize_states=True, gamma=0.98)["earlier_defaults"] == ["--gamma 0.98", "--normalize-states"]


def test_a_rerun_still_pretraining_replaces_a_record_of_earlier_defaults_with_its_phase_and_step(
        tmp_path, monkeypatch, capsys):
    """Before its first evaluation, a run of today's defaults in a pretraining phase becomes the row,
    saying where its checkpoint stands; a folder of earlier defaults replaces nothing, and neither
    replaces a record of today's defaults."""
    from conftest import load_algorithm

    import common

    docs, runs_dir = tmp_path / "docs", tmp_path / "runs"
    monkeypatch.setattr(long_runs, "DOCS", str(docs))
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    spec = ("arq", long_runs.HOPPER, 0, 100_000, ["--sampler", "ode"])
    monkeypatch.setattr(long_runs, "RUNS", [spec, ("bc", long_runs.HOPPER, 0, 100_000, [])])
    name = long_runs.run_name(*spec[:3])
    _collected(docs / "long_runs", "bc", 0, 100_000, 10, finished=True)
    record = {"algorithm": "arq", "env": long_runs.HOPPER, "seed": 0, "total_steps": 100_000,
              "flags": spec[4], "finished": True, "earlier_defaults": ["--normalize-states"],
              "train_seconds": 60.0, "behaviour_score": 10.0, "transitions": 90_000, "q1": [],
              "evaluations": [[10_000 * (i + 1), 20.0, 1.0] for i in range(10)]}
    json.dump(record, open(docs / "long_runs" / f"{name}.json", "w"))

    def pretraining(step, **changed):
        args = vars(load_algorithm("arq").Args(env=long_runs.HOPPER, total_steps=100_000, eval_every=10_000,
                                               save_model=True, output_dir=str(runs_dir), run_name=name,
                                               sampler="ode", **changed))
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        common.save_file(str(runs_dir / name / "checkpoint.pt"), {
            "step": step, "phase": "score model", "args": {**args, "bc_steps": 1_000_000}, "agent": {},
            "rng": {}})
        long_runs.collect(str(runs_dir))
        return json.load(open(docs / "long_runs" / f"{name}.json"))

    assert pretraining(20_000, normalize_states=True) == record  # not today's run: the record stays
    now = pretraining(44_000)
    assert "earlier_defaults" not in now and not now["finished"] and now["evaluations"] == []
    assert now["pretraining"] == {"phase": "score model", "step": 44_000, "of": 1_000_000}
    capsys.readouterr()
    long_runs.report()
    out = capsys.readouterr().out
    assert "| arq | 1 | unfinished, no evaluation yet: score model step 44,000 of 1,000,000 | — | — | — | — |" in out
    assert "| bc | 1 | 100,000 |" in out and "earlier defaults" not in out
    assert out.index("| bc |") < out.index("| arq |")
    assert pretraining(60_000)["pretraining"]["step"] == 60_000  # it moves on with the run
    # a seed still pretraining beside a file's evaluated seeds is named in their row
    json.dump({"algorithm": "bc", "env": long_runs.HOPPER, "seed": 1, "total_steps": 100_000, "flags": [],
               "finished": False, "pretraining": {"phase": "behaviour model", "step": 5_000, "of": None},
               "train_seconds": None, "evaluations": [], "q1": []},
              open(docs / "long_runs" / f"{long_runs.run_name('bc', long_runs.HOPPER, 1)}.json", "w"))
    long_runs.report()
    assert "| bc | 1 | 100,000 (seed 1 at behaviour model step 5,000, unfinished) |" in capsys.readouterr().out

    today = {**record, "finished": False}
    del today["earlier_defaults"]
    json.dump(today, open(docs / "long_runs" / f"{name}.json", "w"))
    assert pretraining(50_000) == today  # a restarted folder does not replace today's evaluations


def test_report_without_collected_runs_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path))
    with pytest.raises(long_runs.UserError, match="run `collect` first"):
        long_runs.report()


def test_report_names_an_unfinished_seed_that_is_ahead_of_the_others(tmp_path, monkeypatch, capsys):
    """Two unfinished seeds at 30k and 50k: the table's curve stops at 30k, and says where the other is."""
    monkeypatch.setattr(long_runs, "DOCS", str(tmp_path))
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path / "long_runs"))
    os.makedirs(tmp_path / "long_runs")
    for seed, n in ((0, 5), (1, 3)):
        json.dump({"env": long_runs.HOPPER, "algorithm": "td3_bc", "seed": seed, "finished": False,
                   "train_seconds": 60.0, "behaviour_score": 10.0, "transitions": 90_000, "q1": [],
                   "evaluations": [[10_000 * (i + 1), 20.0 + i, 1.0] for i in range(n)]},
                  open(tmp_path / "long_runs" / f"{seed}.json", "w"))
    long_runs.report()
    out = capsys.readouterr().out
    assert "| td3_bc | 2 | 30,000 (unfinished; seed 0 at 50,000) |" in out


def test_report_writes_a_table_and_a_figure_for_each_dataset_from_its_own_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(long_runs, "DOCS", str(tmp_path))
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path / "long_runs"))
    os.makedirs(tmp_path / "long_runs")
    for dataset, algo, score in ((long_runs.HOPPER, "td3_bc", 40.0), (long_runs.HALFCHEETAH, "bc", 18.0),
                                 (long_runs.HALFCHEETAH, "iql", 33.0)):
        json.dump({"env": dataset, "algorithm": algo, "seed": 0, "finished": True, "train_seconds": 60.0,
                   "behaviour_score": 10.0, "transitions": 90_000, "q1": [],
                   "evaluations": [[10_000 * (i + 1), score, 1.0] for i in range(3)]},
                  open(tmp_path / "long_runs" / f"{algo}-{dataset.replace('/', '-')}.json", "w"))
    long_runs.report()
    out = capsys.readouterr().out
    sections = {part.split("`")[1]: part for part in out.split("### ")[1:]}
    hopper, halfcheetah = sections[long_runs.HOPPER], sections[long_runs.HALFCHEETAH]
    assert "| td3_bc | 1 | 30,000 | 40.0 |" in hopper and "| bc |" not in hopper and "| iql |" not in hopper
    assert "| bc | 1 | 30,000 | 18.0 |" in halfcheetah and "| iql | 1 | 30,000 | 33.0 |" in halfcheetah
    assert "| td3_bc |" not in halfcheetah
    assert os.path.exists(tmp_path / "long-hopper-medium-replay-v0.png")
    assert os.path.exists(tmp_path / "long-halfcheetah-medium-replay-v0.png")


def test_a_second_scheduler_on_the_same_runs_dir_is_refused_before_it_starts_anything(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(long_runs.subprocess, "run",
                        lambda cmd, **kwargs: started.append(cmd) or long_runs.subprocess.CompletedProcess(cmd, 0))
    with long_runs.lock_folder(str(tmp_path), ""):  # as a scheduler still running holds it
        with pytest.raises(long_runs.UserError, match=rf"{tmp_path} is in use by another process \(pid {os.getpid()} "
                                                      rf"on {socket.gethostname()}\); it runs these runs already"):
            long_runs.run_all(str(tmp_path), 2)
    assert started == []
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path / "collected"))
    monkeypatch.setattr(long_runs, "RUNS", long_runs.RUNS[:1])
    long_runs.run_all(str(tmp_path), 2)  # the lock is released with its holder
    assert len(started) == 1


def _collected(folder, algo, seed, steps, evaluations, finished):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"algorithm": algo, "env": long_runs.HOPPER, "seed": seed, "total_steps": steps, "flags": [],
              "finished": finished, "evaluations": [[10_000 * (i + 1), 1.0, 0.0] for i in range(evaluations)],
              "q1": [], "train_seconds": 60.0, "behaviour_score": 10.0, "transitions": 90_000}
    json.dump(record, open(folder / f"{long_runs.run_name(algo, long_runs.HOPPER, seed)}.json", "w"))


def test_a_run_finished_and_collected_is_skipped_though_its_folder_is_gone(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(long_runs.subprocess, "run",
                        lambda cmd, **kwargs: started.append(cmd) or long_runs.subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path / "collected"))
    monkeypatch.setattr(long_runs, "RUNS", [("bc", long_runs.HOPPER, s, 100_000, []) for s in (0, 1, 2)])
    _collected(tmp_path / "collected", "bc", 0, 100_000, 10, finished=True)
    _collected(tmp_path / "collected", "bc", 1, 100_000, 5, finished=False)  # stopped part way: it runs again
    _collected(tmp_path / "collected", "bc", 2, 50_000, 5, finished=True)  # another budget: it runs again
    long_runs.run_all(str(tmp_path / "runs"), 1)
    assert [cmd[cmd.index("--seed") + 1] for cmd in started] == ["1", "2"]


def test_run_starts_over_a_folder_of_earlier_defaults_and_resumes_one_of_todays(tmp_path, monkeypatch, capsys):
    """Resuming a folder whose flags are not today's would be refused (another flag set): `run` starts
    it over; a folder of today's flags (here one still in its behaviour phase: a checkpoint alone)
    resumes."""
    from conftest import load_algorithm

    import common

    started = []
    monkeypatch.setattr(long_runs.subprocess, "run",
                        lambda cmd, **kwargs: started.append(cmd) or long_runs.subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(long_runs, "COLLECTED", str(tmp_path / "collected"))
    specs = [("fisher_brc", long_runs.HOPPER, s, 100_000, []) for s in (0, 1)]
    monkeypatch.setattr(long_runs, "RUNS", specs)
    for seed, normalize in ((0, True), (1, False)):
        name = long_runs.run_name(*specs[seed][:3])
        args = vars(load_algorithm("fisher_brc").Args(env=long_runs.HOPPER, seed=seed, total_steps=100_000,
                                                      eval_every=10_000, normalize_states=normalize))
        (tmp_path / "runs" / name).mkdir(parents=True)
        common.save_file(str(tmp_path / "runs" / name / "checkpoint.pt"),
                         {"step": 10, "phase": "behaviour model", "args": args, "agent": {}, "rng": {}})
    long_runs.run_all(str(tmp_path / "runs"), 1)
    assert [cmd[-2:] == ["--resume", "never"] for cmd in started] == [True, False]
    assert "hopper-medium-replay-v0__fisher_brc__0: its folder ran with earlier defaults (--normalize-states); " \
           "starting it over" in capsys.readouterr().out


def test_a_restarted_run_does_not_replace_a_longer_collected_record(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    monkeypatch.setattr(long_runs, "RUNS", [("bc", long_runs.HOPPER, 0, 100_000, [])])
    _collected(docs / "long_runs", "bc", 0, 100_000, 9, finished=False)
    folder = tmp_path / "runs" / long_runs.run_name("bc", long_runs.HOPPER, 0)
    folder.mkdir(parents=True)

    def restarted(evaluations):
        json.dump({"finished": False, "train_seconds": 1.0,
                   "dataset": {"ref_min_score": 0.0, "ref_max_score": 200.0, "episode_return_mean": 20.0,
                               "transitions": 90_000},
                   "evaluations": [{"step": 10_000 * (i + 1), "normalized_score_mean": 2.0,
                                    "normalized_score_std": 0.0, "wall_time": 1.0} for i in range(evaluations)]},
                  open(folder / "results.json", "w"))
        long_runs.collect(str(tmp_path / "runs"))
        return json.load(open(docs / "long_runs" / "hopper-medium-replay-v0__bc__0.json"))["evaluations"]

    assert len(restarted(3)) == 9  # kept
    out = capsys.readouterr().out
    assert "kept the collected record (9 evaluations) over the run folder's 3; delete " in out
    assert "long_runs/hopper-medium-replay-v0__bc__0.json to replace it" in out
    assert restarted(10) == [[10_000 * (i + 1), 2.0, 0.0] for i in range(10)]  # caught up: replaced
    assert "kept" not in capsys.readouterr().out
    restarted(10)  # collected again from the same folder: rewritten, nothing to say
    assert "kept" not in capsys.readouterr().out


def test_the_support_check_refuses_other_files_in_one_line(tmp_path):
    from tools.diagnostics import support_check

    with pytest.raises(long_runs.UserError, match="is not a file; give a fisher_brc or itrpo run's checkpoint.pt"):
        support_check.main([str(tmp_path / "missing.pt")])
    import torch

    save_file = support_check.common.save_file  # with the checksum that the library's files carry
    save_file(str(tmp_path / "model.pt"), {"algorithm": "td3_bc", "args": {}, "actor": {}})
    with pytest.raises(long_runs.UserError, match="is not a fisher_brc or itrpo checkpoint or model.pt"):
        support_check.main([str(tmp_path / "model.pt")])
    save_file(str(tmp_path / "checkpoint.pt"), {"step": 5, "args": {"env": "x", "alpha": 2.5}, "agent": {"actor": {}}})
    with pytest.raises(long_runs.UserError, match="is not a fisher_brc or itrpo checkpoint or model.pt"):
        support_check.main([str(tmp_path / "checkpoint.pt")])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(long_runs.UserError, match="is not a fisher_brc or itrpo checkpoint or model.pt"):
        support_check.main([str(tmp_path / "notes.txt")])

    class RunsCode:  # a pickle that would make a folder when loaded
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    torch.save({"algorithm": "fisher_brc", "args": {}, "actor": RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(long_runs.UserError, match="is not a fisher_brc or itrpo checkpoint or model.pt: it cannot be "
                                                  "read as weights only") as refused:
        support_check.main([str(tmp_path / "code.pt")])
    assert "\n" not in str(refused.value) and not (tmp_path / "ran").exists()


def first_state_report(capsys_or_output) -> tuple[str, dict]:
    import re

    out = capsys_or_output if isinstance(capsys_or_output, str) else capsys_or_output.readouterr().out
    lines = [x for x in out.splitlines() if "first states" in x]
    assert len(lines) == 1, "the check reports no line on the episodes' first states"
    pattern = r"(Q\(s, a\)|return after them mean|max|log mu at a|KL\(pi \|\| mu\)) (-?[\d.]+)"
    return lines[0], {k: float(v) for k, v in re.findall(pattern, lines[0])}


def first_state_returns(data, bonus: float, gamma: float) -> list[float]:
    starts = data.episode_starts
    rewards = data.rewards.numpy() + bonus
    ends = list(starts[1:]) + [len(rewards)]
    return [sum(gamma ** i * r for i, r in enumerate(rewards[s:e])) for s, e in zip(starts, ends)]


def test_the_support_check_reports_fisher_brc_q_and_return_at_the_episodes_first_states(tmp_path, datasets_path,
                                                                                          capsys):
    """Evaluations start where the data's episodes start; the check reports the critic there."""
    import numpy as np
    import torch

    from tools.diagnostics import support_check

    common, fisher_brc = support_check.common, support_check.fisher_brc
    args = fisher_brc.Args(env="test/hopper/random-v0")
    data = common.load_dataset(args.env, "cpu")
    torch.manual_seed(3)
    agent = fisher_brc.FisherBRC(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    common.save_file(str(tmp_path / "model.pt"), {"algorithm": "fisher_brc", "args": dict(vars(args)),
                                                  **agent.state_dict()})
    support_check.main([str(tmp_path / "model.pt")])
    line, reported = first_state_report(capsys)

    starts = data.episode_starts
    assert args.reward_transform == "plus-five"
    returns = first_state_returns(data, 5.0, args.gamma)
    if args.normalize_states:  # as the run's states
        common.normalize_obs(data)
    with torch.no_grad():
        obs, actions = data.observations[starts], data.actions[starts]
        log_mu = agent.behavior.log_prob(obs, actions)
        q = torch.min(*agent.offsets(obs, actions)) + log_mu
    assert f"the episodes' {len(starts)} first states" in line
    assert reported["Q(s, a)"] == pytest.approx(q.mean().item(), abs=0.06)
    assert reported["return after them mean"] == pytest.approx(np.mean(returns), abs=0.06)
    assert reported["max"] == pytest.approx(np.max(returns), abs=0.06)
    assert reported["log mu at a"] == pytest.approx(log_mu.mean().item(), abs=0.006)
    mean_a = line.split(", a [")[1].split("]")[0].split()
    assert [float(x) for x in mean_a] == pytest.approx(actions.mean(0).tolist(), abs=0.006)


def test_the_support_check_splits_the_first_states_by_where_their_episodes_came_from(tmp_path, datasets_path, capsys,
                                                                                      monkeypatch):
    """A medium-replay dataset holds the uniform warm-up's episodes first, then the snapshots': the
    check reports the first states of each apart (here the first three episodes stand for the warm-up)."""
    import re

    import torch

    from tools.diagnostics import support_check

    common, fisher_brc = support_check.common, support_check.fisher_brc
    args = fisher_brc.Args(env="test/hopper/random-v0")
    data = common.load_dataset(args.env, "cpu")
    starts, cut = data.episode_starts, int(data.episode_starts[3])
    monkeypatch.setattr(support_check, "replay_sources",
                        lambda dataset_id: [("warm-up", cut), ("step 10000", len(data) - cut)])
    torch.manual_seed(3)
    agent = fisher_brc.FisherBRC(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    common.save_file(str(tmp_path / "model.pt"), {"algorithm": "fisher_brc", "args": dict(vars(args)),
                                                  **agent.state_dict()})
    support_check.main([str(tmp_path / "model.pt")])
    lines = [x for x in capsys.readouterr().out.splitlines() if "first states of" in x]
    assert len(lines) == 2
    assert lines[0].startswith(f"  first states of warm-up episodes (3 of {len(starts)})")
    assert lines[1].startswith(f"  first states of snapshot episodes ({len(starts) - 3} of {len(starts)})")
    if args.normalize_states:
        common.normalize_obs(data)
    for line, rows in zip(lines, (starts[:3], starts[3:])):
        with torch.no_grad():
            log_mu = agent.behavior.log_prob(data.observations[rows], data.actions[rows])
        assert float(re.search(r"log mu at a (-?[\d.]+)", line)[1]) == pytest.approx(log_mu.mean().item(), abs=0.006)
        assert float(re.search(r"mean \|a\| ([\d.]+)", line)[1]) == pytest.approx(
            data.actions[rows].abs().mean().item(), abs=0.006)


def test_the_support_check_reads_an_itrpo_checkpoint_with_its_critic_and_reward_bonus(tmp_path, datasets_path, capsys):
    """A checkpoint does not name its algorithm: the check knows iTRPO's by its networks (its flags may
    lack one added since, or hold one dropped since), reads Q from its critic (no log mu added) and the returns of r +
    --reward-bonus."""
    import numpy as np
    import torch

    from tools.diagnostics import support_check

    common, itrpo = support_check.common, support_check.itrpo
    args = itrpo.Args(env="test/hopper/random-v0", reward_bonus=3.0)
    data = common.load_dataset(args.env, "cpu")
    torch.manual_seed(4)
    agent = itrpo.ITRPO(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    with torch.no_grad():  # rlkit's small output layers start every state at Q = 0 and pi = mu: spread them
        for net in (agent.actor, agent.behavior, agent.critic):
            for p in net.parameters():
                p.normal_(0.0, 0.1)
    stored = {k: v for k, v in vars(args).items() if k != "final_episodes"}  # as from before a flag was added
    stored["cuda_graphs"] = False  # and with one the file has dropped since
    common.save_file(str(tmp_path / "checkpoint.pt"), {"step": 7, "phase": None, "args": stored,
                                                       "agent": agent.state_dict()})
    support_check.main([str(tmp_path / "checkpoint.pt")])
    line, reported = first_state_report(capsys)

    starts = data.episode_starts
    returns = first_state_returns(data, 3.0, args.gamma)
    if args.normalize_states:  # as the run's states
        common.normalize_obs(data)
    with torch.no_grad():
        obs, actions = data.observations[starts], data.actions[starts]
        q = torch.min(*agent.critic(obs, actions))
        log_mu = agent.behavior.log_prob(obs, actions)
        torch.manual_seed(0)  # the check's one sample per state, drawn for all states at once
        sample, log_pi = agent.actor.sample(data.observations)
        kl = (log_pi - agent.behavior.log_prob(data.observations, sample))[starts]
    assert reported["Q(s, a)"] == pytest.approx(q.mean().item(), abs=0.06)
    assert reported["KL(pi || mu)"] == pytest.approx(kl.mean().item(), abs=0.006)
    assert reported["return after them mean"] == pytest.approx(np.mean(returns), abs=0.06)
    assert reported["log mu at a"] == pytest.approx(log_mu.mean().item(), abs=0.006)


@pytest.mark.parametrize("name", ["fisher_brc", "itrpo"])
def test_the_support_check_rolls_out_the_policy_beside_its_q_and_the_return_that_followed(name, tmp_path, datasets_path,
                                                                                         capsys, monkeypatch):
    """--rollouts: the policy's own episodes in the eval env, Q(s_t, pi(s_t)) next to the discounted return of the
    training rewards that followed (Fisher-BRC: r + 5; iTRPO here: the return-range scale and a bonus of 3), with the
    states standardised as the run's; of an episode the time limit cut, the last steps are left out."""
    import math
    import re

    import numpy as np
    import torch

    from tools.diagnostics import support_check

    common, module = support_check.common, getattr(support_check, name)
    if name == "fisher_brc":
        args = module.Args(env="test/hopper/random-v0", normalize_states=True)
    else:
        args = module.Args(env="test/hopper/random-v0", reward_transform="return-range", reward_bonus=3.0,
                           normalize_states=True, gamma=0.5)  # the test env's time limit cuts its episodes at 40
    data = common.load_dataset(args.env, "cpu")
    returns = data.episode_returns
    scale, bonus = (1.0, 5.0) if name == "fisher_brc" else (1000.0 / (returns.max() - returns.min()), 3.0)
    torch.manual_seed(5)
    agent = (module.FisherBRC if name == "fisher_brc" else module.ITRPO)(args, data.obs_dim, data.act_dim,
                                                                        torch.device("cpu"))
    with torch.no_grad():
        for net in module_networks(agent):
            for p in net.parameters():
                p.normal_(0.0, 0.1)
    common.save_file(str(tmp_path / "checkpoint.pt"), {"step": 3, "phase": None, "args": dict(vars(args)),
                                                       "agent": agent.state_dict()})
    with pytest.raises(long_runs.UserError, match="--rollouts must be 0 or more, got -1"):
        support_check.main([str(tmp_path / "checkpoint.pt"), "--rollouts", "-1"])
    support_check.main([str(tmp_path / "checkpoint.pt"), "--rollouts", "2"])
    out = capsys.readouterr().out

    def q(o, a):
        if name == "fisher_brc":
            return torch.min(*agent.offsets(o, a)) + agent.behavior.log_prob(o, a)
        return torch.min(*agent.critic(o, a))

    mean, std = data.observations.mean(0), data.observations.std(0) + 1e-3
    env, lengths, by_step, later = data.make_env(), [], {}, 0
    tail = math.ceil(math.log(0.01) / math.log(args.gamma))  # a cut episode's last steps miss >= 1% of the return
    for seed in (1000, 1001):
        obs, _ = env.reset(seed=seed)
        qs, rewards, done = [], [], False
        while not done:
            o = (torch.as_tensor(obs, dtype=torch.float32)[None] - mean) / std
            with torch.no_grad():
                a = agent.act(o)
                qs.append(q(o, a).item())
            obs, r, terminated, truncated, _ = env.step(a[0].numpy())  # hopper's box is [-1, 1]
            rewards.append(scale * r + bonus)
            done = terminated or truncated
        lengths.append(len(rewards))
        later += len(range(10, min(50, len(rewards) if terminated else len(rewards) - tail)))
        for t in range(min(len(rewards), 10)):
            g = sum(args.gamma ** k * r for k, r in enumerate(rewards[t:]))
            by_step.setdefault(t == 0, []).append((qs[t], g))
    assert f"lengths {min(lengths)}-{max(lengths)}" in out
    for first, label in ((True, "0-0"), (False, "1-9")):
        found = re.search(rf"steps {label} \((\d+) states\): Q\(s, pi\(s\)\) (-?[\d.]+), discounted return that "
                          rf"followed (-?[\d.]+)", out)
        assert found, out
        q_mean, g_mean = np.mean(by_step[first], axis=0)
        assert int(found[1]) == len(by_step[first])
        assert float(found[2]) == pytest.approx(q_mean, abs=0.06)
        assert float(found[3]) == pytest.approx(g_mean, abs=0.06)
    assert (f"steps 10-49 ({later} states)" in out) == (later > 0), out

    constant = common.load_dataset  # a dataset whose rewards are all the same says nothing of the transform

    def load_constant(*a, **k):
        loaded = constant(*a, **k)
        loaded.rewards = torch.zeros_like(loaded.rewards)
        return loaded

    monkeypatch.setattr(common, "load_dataset", load_constant)
    with pytest.raises(long_runs.UserError, match="--rollouts: every reward of test/hopper/random-v0 is the same"):
        support_check.main([str(tmp_path / "checkpoint.pt"), "--rollouts", "2"])


def test_the_support_check_reads_q_from_another_checkpoint_of_the_same_run(tmp_path, datasets_path, capsys):
    """--critic: one checkpoint's critic on another's policy; a checkpoint of another run is refused in one line."""
    import torch

    from tools.diagnostics import support_check

    common, itrpo = support_check.common, support_check.itrpo
    args = itrpo.Args(env="test/hopper/random-v0")
    data = common.load_dataset(args.env, "cpu")
    agents = []
    for seed, name in ((6, "policy.pt"), (7, "critic.pt")):
        torch.manual_seed(seed)
        agent = itrpo.ITRPO(args, data.obs_dim, data.act_dim, torch.device("cpu"))
        with torch.no_grad():
            for net in module_networks(agent):
                for p in net.parameters():
                    p.normal_(0.0, 0.1)
        common.save_file(str(tmp_path / name), {"step": seed, "phase": None, "args": dict(vars(args)),
                                                "agent": agent.state_dict()})
        agents.append(agent)
    support_check.main([str(tmp_path / "policy.pt"), "--critic", str(tmp_path / "critic.pt")])
    out = capsys.readouterr().out
    line, reported = first_state_report(out)
    starts = data.episode_starts
    with torch.no_grad():
        q = torch.min(*agents[1].critic(data.observations[starts], data.actions[starts]))
        own = torch.min(*agents[0].critic(data.observations[starts], data.actions[starts]))
    assert reported["Q(s, a)"] == pytest.approx(q.mean().item(), abs=0.06)
    assert abs(q.mean().item() - own.mean().item()) > 0.2  # the two critics differ: the test can tell them apart
    # the actor loss of the policy's samples (seed 0) under the other critic, over every state
    critic_agent, policy_agent = agents[1], agents[0]
    torch.manual_seed(0)
    with torch.no_grad():
        critic_agent.actor, kept = policy_agent.actor, critic_agent.actor
        expected = critic_agent.actor_loss(data.observations)[0].item()
        critic_agent.actor = kept
        torch.manual_seed(0)
        own_policy = critic_agent.actor_loss(data.observations)[0].item()
    assert abs(expected - own_policy) > 0.02  # the policies differ: the test can tell which one was scored
    reported_loss = float(out.split("actor loss of this policy (its samples from seed 0): ")[1].split(" over")[0])
    assert reported_loss == pytest.approx(expected, abs=0.006)

    for change, differ in (({"reward_bonus": 2.0}, "reward_bonus"), ({"seed": 3, "bc_seed": 3}, "bc_seed, seed")):
        common.save_file(str(tmp_path / "other.pt"), {"step": 1, "phase": None, "args": dict(vars(args), **change),
                                                      "agent": agents[1].state_dict()})
        with pytest.raises(long_runs.UserError, match=f"is not of the same run as .* \\(they differ in {differ}\\)"):
            support_check.main([str(tmp_path / "policy.pt"), "--critic", str(tmp_path / "other.pt")])
    common.save_file(str(tmp_path / "later.pt"), {"step": 9, "phase": None, "agent": agents[1].state_dict(),
                                                  "args": dict(vars(args), total_steps=50, resume="never",
                                                               cuda_graphs=False)})
    # resumed with other steps, and written by a file with a flag dropped since: the same run
    support_check.main([str(tmp_path / "policy.pt"), "--critic", str(tmp_path / "later.pt")])


def module_networks(agent):
    return [net for net in (getattr(agent, n, None) for n in ("actor", "behavior", "critic", "offsets")) if net]


def test_the_iql_actor_refit_refuses_other_files_and_flags_in_one_line(tmp_path):
    import torch

    from tools.diagnostics import iql_actor_refit

    with pytest.raises(long_runs.UserError, match="is not a file; give an iql run's checkpoint.pt"):
        iql_actor_refit.main([str(tmp_path / "missing.pt")])
    iql_actor_refit.common.save_file(str(tmp_path / "model.pt"),
                                     {"algorithm": "td3_bc", "args": {}, "actor": {}, "critic": {}})
    with pytest.raises(long_runs.UserError, match="is not an iql checkpoint or model.pt"):
        iql_actor_refit.main([str(tmp_path / "model.pt")])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(long_runs.UserError, match="is not an iql checkpoint or model.pt"):
        iql_actor_refit.main([str(tmp_path / "notes.txt")])

    class RunsCode:  # a pickle that would make a folder when loaded
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    torch.save({"algorithm": "iql", "args": {}, "critic": RunsCode(), "value": {}}, tmp_path / "code.pt")
    with pytest.raises(long_runs.UserError, match="is not an iql checkpoint or model.pt: it cannot be read as "
                                                  "weights only") as refused:
        iql_actor_refit.main([str(tmp_path / "code.pt")])
    assert "\n" not in str(refused.value) and not (tmp_path / "ran").exists()
    with pytest.raises(long_runs.UserError, match="--steps and --eval-every must be positive"):
        iql_actor_refit.main([str(tmp_path / "notes.txt"), "--steps", "0"])


def test_an_iql_actor_refit_step_is_the_runs_actor_step_and_leaves_q_and_v_alone(tmp_path, datasets_path):
    """With V held still, IQL.train moves its actor exactly as a refit step does: with the target Q."""
    import copy

    import torch

    from tools.diagnostics import iql_actor_refit

    common, iql = iql_actor_refit.common, iql_actor_refit.iql
    args = iql.Args(env="test/hopper/random-v0", expectile=0.7, beta=3.0, dropout=0.0, reward_transform="none")
    data = common.load_dataset(args.env, "cpu")
    torch.manual_seed(0)
    run = iql.IQL(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    with torch.no_grad():  # a target critic unlike the online one, as in any run after its first step
        for p in run.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    refit = copy.deepcopy(run)
    frozen = {k: copy.deepcopy(getattr(refit, k).state_dict()) for k in ("critic", "critic_target", "value")}
    run.value_optimizer.param_groups[0]["lr"] = 0.0  # V does not move
    run.args.tau = 0.0  # nor does the target Q (IQL.train's critic step comes after its actor step)
    buffer = common.ReplayBuffer(data)
    for _ in range(3):
        batch = buffer.sample(64)
        run.train(batch)
        iql_actor_refit.refit_step(refit, batch)
    for a, b in zip(run.actor.parameters(), refit.actor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert refit.actor_scheduler.last_epoch == 3  # the cosine schedule's step count
    for name, state in frozen.items():
        for key, value in getattr(refit, name).state_dict().items():
            assert torch.equal(value, state[key]), f"the refit changed {name}.{key}"


def test_the_iql_actor_refit_reports_the_weights_of_the_frozen_critic_over_the_data(tmp_path, datasets_path, capsys):
    import re

    import torch

    from tools.diagnostics import iql_actor_refit

    common, iql = iql_actor_refit.common, iql_actor_refit.iql
    args = iql.Args(env="test/hopper/random-v0", expectile=0.7, beta=3.0, dropout=0.0, reward_transform="none")
    data = common.load_dataset(args.env, "cpu")
    torch.manual_seed(5)
    agent = iql.IQL(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    with torch.no_grad():  # the target unlike the online critic: the report must read the target
        for p in agent.critic_target.parameters():
            p.add_(0.5 * torch.randn_like(p))
    common.save_file(str(tmp_path / "checkpoint.pt"), {
        "algorithm": "iql", "args": dict(vars(args)), "step": 7,
        "agent": {k: getattr(agent, k).state_dict() for k in ("actor", "critic", "critic_target", "value")}})
    iql_actor_refit.main([str(tmp_path / "checkpoint.pt"), "--steps", "2", "--eval-every", "2",
                          "--output", str(tmp_path / "refit.json")])
    out = capsys.readouterr().out
    if args.normalize_states:  # as the run's states
        common.normalize_obs(data)
    with torch.no_grad():
        advantage = torch.min(*agent.critic_target(data.observations, data.actions)) \
            - agent.value(data.observations)[:, 0]
        w = torch.exp(3.0 * advantage).clamp(max=100.0)
    mean, clipped, ess = re.search(r"mean ([\d.]+), at the clip \(100\) ([\d.]+)%, effective sample size ([\d.]+)%",
                                   out).groups()
    assert float(mean) == pytest.approx(w.mean().item(), abs=0.006)
    assert float(clipped) == pytest.approx(100 * (w == 100.0).float().mean().item(), abs=0.06)
    assert float(ess) == pytest.approx(100 * (w.sum() ** 2 / (w**2).sum() / len(w)).item(), abs=0.06)
    assert "(step 7)" in out and "frozen target Q" in out
    assert [e["step"] for e in json.load(open(tmp_path / "refit.json"))["evaluations"]] == [2]


def test_the_awr_check_refuses_other_files_and_flags_in_one_line(tmp_path):
    import torch

    from tools.diagnostics import awr_check

    with pytest.raises(long_runs.UserError, match="is not a file; give an awr run's checkpoint.pt"):
        awr_check.main([str(tmp_path / "missing.pt")])
    awr_check.common.save_file(str(tmp_path / "model.pt"),
                               {"algorithm": "td3_bc", "args": {}, "actor": {}, "critic": {}})
    with pytest.raises(long_runs.UserError, match="is not an awr checkpoint or model.pt"):
        awr_check.main([str(tmp_path / "model.pt")])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(long_runs.UserError, match="is not an awr checkpoint or model.pt"):
        awr_check.main([str(tmp_path / "notes.txt")])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(long_runs.UserError, match="is not an awr checkpoint or model.pt"):
        awr_check.main([str(tmp_path / "tensor.pt")])
    with pytest.raises(long_runs.UserError, match="--episodes must be 0"):
        awr_check.main([str(tmp_path / "notes.txt"), "--episodes", "-1"])

    class RunsCode:  # a pickle that would make a folder when loaded
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    torch.save({"algorithm": "awr", "args": {}, "actor": RunsCode(), "critic": {}}, tmp_path / "code.pt")
    with pytest.raises(long_runs.UserError, match="is not an awr checkpoint or model.pt: it cannot be read as "
                                                  "weights only") as refused:
        awr_check.main([str(tmp_path / "code.pt")])
    assert "\n" not in str(refused.value) and not (tmp_path / "ran").exists()


def test_the_awr_checks_effective_sample_size_counts_the_transitions_a_batch_learns_from():
    import torch

    from tools.diagnostics.awr_check import effective_sample_size

    assert effective_sample_size(torch.ones(512)) == pytest.approx(256.0)
    one_of_each = torch.full((512,), 1e-6)
    one_of_each[::256] = 100.0
    assert effective_sample_size(one_of_each) == pytest.approx(1.0, abs=1e-3)
    half = torch.cat([torch.ones(128), torch.zeros(128)])
    assert effective_sample_size(half, batch=256) == pytest.approx(128.0)
    assert effective_sample_size(torch.ones(100)) == pytest.approx(100.0)  # fewer than a batch: one batch


def test_the_awr_check_reads_a_checkpoint_and_follows_the_episodes_it_evaluates(tmp_path, datasets_path, capsys,
                                                                                  monkeypatch):
    """Q, the weights and the policy's distance to the data are those of the checkpoint's networks;
    the evaluated episodes are the run's (same score) and their states are the ones they visited."""
    import re

    import numpy as np
    import torch

    from tools.diagnostics import awr_check

    common, awr = awr_check.common, awr_check.awr
    args = awr.Args(env="test/hopper/random-v0")
    data = common.load_dataset(args.env, "cpu")
    stats = common.normalize_obs(data)
    torch.manual_seed(3)
    agent = awr.AWR(args, data.obs_dim, data.act_dim, torch.device("cpu"))
    common.save_file(str(tmp_path / "checkpoint.pt"), {"step": 5, "phase": None, "args": dict(vars(args)),
                                                       "agent": agent.state_dict()})
    awr_check.main([str(tmp_path / "checkpoint.pt"), "--episodes", "3", "--seed", "7"])
    out = capsys.readouterr().out
    assert "(awr, step 5)" in out
    assert len(data) < 256 and f"per batch of {len(data)}" in out  # a smaller dataset is one batch
    assert "of them the env's 40 steps" in out
    with torch.no_grad():
        q = torch.min(*agent.critic(data.observations, data.actions))
        distance = ((agent.act(data.observations) - data.actions) ** 2).mean()
    assert float(re.search(r"mean Q\(s, a\) (-?[\d.]+)", out).group(1)) == pytest.approx(q.mean().item(), abs=0.06)
    assert float(re.search(r"\(pi\(s\) - a\)\^2 ([\d.]+)", out).group(1)) == pytest.approx(distance.item(), abs=6e-4)
    expected = common.evaluate(data, agent.act, 3, 7, *stats)
    score = float(re.search(r"3 episodes from seed 7: score (-?[\d.]+)", out).group(1))
    assert score == pytest.approx(expected["normalized_score_mean"], abs=0.06)
    length = float(re.search(r"score [-\d.]+ ± [\d.]+, length ([\d.]+)", out).group(1))
    assert length == pytest.approx(np.mean(expected["episode_lengths"]), abs=0.5)

    monkeypatch.setattr(awr_check, "episode_limit", lambda data: None)  # an eval env without a time limit
    awr_check.main([str(tmp_path / "checkpoint.pt"), "--episodes", "3", "--seed", "7"])
    out = capsys.readouterr().out
    assert "3 episodes from seed 7" in out and "of them the env's" not in out

    result, states = awr_check.visited_states(data, agent, 3, 7, stats)
    assert [len(s) for s in states] == result["episode_lengths"]
    env = data.make_env()
    first = torch.as_tensor(env.reset(seed=7)[0], dtype=torch.float32)
    assert torch.allclose(states[0][0], (first - stats[0]) / stats[1], atol=1e-5)
    # more visited states than one chunk of 512, of another count than the data's: each one's nearest
    g = torch.Generator().manual_seed(3)
    visited = data.observations[torch.randint(0, len(data), (700,), generator=g)]
    visited = visited + 0.1 * torch.randn(700, data.obs_dim, generator=g)
    want = torch.stack([(data.observations - v).norm(dim=1).min() for v in visited])
    torch.testing.assert_close(awr_check.nearest_distance(visited, data.observations), want)


def test_the_collapse_curves_keep_a_run_folders_evaluations_and_draw_them(tmp_path, monkeypatch):
    from tools.diagnostics import collapse_curves

    monkeypatch.setattr(collapse_curves, "RECORDS", str(tmp_path / "records"))
    monkeypatch.setattr(collapse_curves, "FIGURE", str(tmp_path / "collapse.png"))
    with pytest.raises(long_runs.UserError, match="holds no results.json of a run"):
        collapse_curves.main(["collect", str(tmp_path / "missing"), "--label", "x"])
    with pytest.raises(long_runs.UserError, match="no records in .*: collect a run folder first"):
        collapse_curves.main(["plot"])
    folder = tmp_path / "hopper__itrpo__0__critic-first"
    folder.mkdir()
    evaluations = [{"step": 10_000 * i, "normalized_score_mean": 10.0 * i, "normalized_score_std": 0.5} for i in (1, 2)]
    results = {"algorithm": "itrpo", "env": "local/hopper/medium-replay-v0", "seed": 0, "finished": False,
               "args": {"total_steps": 100_000}, "evaluations": evaluations}
    (folder / "results.json").write_text(json.dumps(results))
    collapse_curves.main(["collect", str(folder), "--label", "critic first"])
    record = json.loads((tmp_path / "records" / "hopper__itrpo__0__critic-first.json").read_text())
    assert record["label"] == "critic first" and record["evaluations"] == [[10_000, 10.0, 0.5], [20_000, 20.0, 0.5]]
    assert not record["finished"] and record["total_steps"] == 100_000
    results["evaluations"].append({"step": 30_000, "normalized_score_mean": 1.0, "normalized_score_std": 0.1})
    (folder / "results.json").write_text(json.dumps(results))
    collapse_curves.main(["collect", str(folder), "--label", "critic first"])  # again later: replaced
    record = json.loads((tmp_path / "records" / "hopper__itrpo__0__critic-first.json").read_text())
    assert [e[0] for e in record["evaluations"]] == [10_000, 20_000, 30_000]
    collapse_curves.main(["plot"])
    assert (tmp_path / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", ["", "[1, 2]", '{"evaluations": null}', "dir"])
def test_collect_leaves_out_a_results_json_that_is_not_a_runs_in_one_line(content, tmp_path, monkeypatch, capsys):
    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    monkeypatch.setattr(long_runs, "DOCS", str(docs))
    monkeypatch.setattr(long_runs, "COLLECTED", str(docs / "long_runs"))
    monkeypatch.setattr(long_runs, "RUNS", [("bc", long_runs.HOPPER, 0, 100_000, [])])
    results = runs_dir / long_runs.run_name("bc", long_runs.HOPPER, 0) / "results.json"
    if content == "dir":
        results.mkdir(parents=True)
    else:
        results.parent.mkdir(parents=True)
        results.write_text(content)
    long_runs.collect(str(runs_dir))
    said = [line for line in capsys.readouterr().out.splitlines() if "not the results.json of a run" in line]
    assert len(said) == 1 and str(results) in said[0]
    assert not (docs / "long_runs" / f"{long_runs.run_name('bc', long_runs.HOPPER, 0)}.json").exists()
