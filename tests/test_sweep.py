"""``binaryconnect sweep``: runs side by side, the report, skipping and resuming, the deadline, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from binaryconnect import sweep
from binaryconnect.cli import main
from binaryconnect.config import recipe_config
from helpers import assert_one_line_error, make_image_tree

TINY = ["--train-subset", "500", "--hidden", "16", "--depth", "1", "--device", "cpu"]


def _cli(*argv, data_root):
    env = {**os.environ, "BINARYCONNECT_DATA": str(data_root)}
    return [sys.executable, "-m", "binaryconnect.cli", *argv], env


def test_sweep_runs_every_recipe_and_seed_then_reports_and_a_repeat_skips(tmp_path, data_root, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "mnist-float", "mnist-deterministic", "--seeds", "0,1", "-j", "2", "-o", str(out),
            "--markdown", "--", "--data-dir", str(data_root), "--epochs", "2", *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for recipe in ("mnist-float", "mnist-deterministic"):
        for seed in (0, 1):
            summary = json.loads((out / f"{recipe}-s{seed}" / "summary.json").read_text())
            assert (summary["recipe"], summary["seed"], summary["epochs"]) == (recipe, seed, 2)
            assert (out / f"{recipe}-s{seed}.log").read_text().count("epoch ") >= 2
        assert f"| {recipe} | 2 | s0 " in text  # the report's row: both seeds in one group
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    assert main(argv) == 0  # everything finished: nothing runs again
    text = capsys.readouterr().out
    assert text.count("already finished, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps


def test_sigint_stops_the_sweep_with_checkpoints_and_a_repeat_resumes(tmp_path, data_root):
    """Ctrl-C on the sweep reaches each run once: it checkpoints and stops; the same command resumes it."""
    out = tmp_path / "sweep"
    argv, env = _cli("sweep", "mnist-deterministic", "--seeds", "4", "-o", str(out), "--", "--epochs", "400",
                     *TINY, data_root=data_root)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "mnist-deterministic-s4" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, (stdout, stderr)
    assert "mnist-deterministic-s4: stopped" in stdout and "repeat the same sweep command" in stderr
    run = out / "mnist-deterministic-s4"
    assert (run / "checkpoint.safetensors").is_file() and not (run / "summary.json").exists()
    done = len(metrics.read_text().splitlines())
    assert done < 400

    argv, env = _cli("sweep", "mnist-deterministic", "--seeds", "4", "-o", str(out), "--", "--epochs", "400",
                     *TINY, data_root=data_root)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "mnist-deterministic-s4: resumed" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 400 and len(metrics.read_text().splitlines()) == 400


def test_deadline_stops_the_running_and_starts_no_more(tmp_path, monkeypatch):
    """With one slot and two jobs, the deadline interrupts the first (SIGINT) and never starts the second."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    jobs = sweep.plan(["a", "b"], [0], tmp_path)
    t0 = time.monotonic()
    sweep.run_jobs(jobs, [], slots=1, deadline=1.0, log=lambda *a: None, poll=0.05)
    assert time.monotonic() - t0 < 30
    assert [j.state for j in jobs] == ["stopped", "not started"]
    assert jobs[0].returncode in (130, -signal.SIGINT)


def test_a_run_that_fails_while_the_sweep_stops_is_failed_not_stopped(tmp_path, monkeypatch):
    """A run that exits with an error (3: diverged) after the deadline's SIGINT has no checkpoint of its
    stop: it is "diverged", not "stopped" (which tells the user a repeat resumes it)."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(3))\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    jobs = sweep.plan(["a"], [0], tmp_path)
    sweep.run_jobs(jobs, [], slots=1, deadline=1.0, log=lambda *a: None, poll=0.05)
    assert [(j.state, j.returncode) for j in jobs] == [("diverged", 3)]


def test_a_failing_run_is_reported_with_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", "raise SystemExit(1)"])
    jobs = sweep.run_jobs(sweep.plan(["a"], [0, 1], tmp_path), [], slots=2, log=print, poll=0.05)
    assert [(j.state, j.returncode) for j in jobs] == [("failed", 1), ("failed", 1)]
    assert f"exit code 1, log {tmp_path / 'a-s0.log'}" in capsys.readouterr().out


def test_a_repeated_sweep_does_not_resume_a_run_that_diverged(tmp_path, data_root, capsys):
    """Runs whose loss became NaN/Inf (a learning rate of 1e30) end "diverged", and a repeat does not resume
    them: their last checkpoint, options and seed would bring the same NaN. The repeat starts no process
    (the logs do not grow), says why, and the report names where each run diverged."""
    out = tmp_path / "sweep"
    argv = ["sweep", "mnist-deterministic", "--seeds", "0,1", "-o", str(out), "--", "--data-dir", str(data_root),
            "--epochs", "1", *TINY, "--lr-start", "1e30", "--lr-end", "1e30"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "mnist-deterministic-s0: diverged (exit code 3" in captured.out
    assert "2 of 2 runs did not finish: mnist-deterministic-s0 (diverged), mnist-deterministic-s1 (diverged); " \
           "a repeat does not resume a diverged run" in captured.err
    assert "repeat the same sweep command" not in captured.err  # it would change nothing
    logs = {p: p.read_bytes() for p in out.glob("*.log")}
    assert len(logs) == 2

    assert main(argv) == 1
    captured = capsys.readouterr()
    for seed in (0, 1):
        run = out / f"mnist-deterministic-s{seed}"
        marker = json.loads((run / "diverged.json").read_text())
        assert f"{run.name}: diverged before ({run / 'diverged.json'} says where), not resumed" in captured.out
        assert f"{run}: 0/1 epochs; diverged at epoch 1, step {marker['step']} (loss {marker['loss']})" in captured.out
    assert ": resumed (log" not in captured.out and ": started (log" not in captured.out
    assert {p: p.read_bytes() for p in out.glob("*.log")} == logs  # no process ran


def test_data_several_runs_share_is_prepared_once_before_they_start(tmp_path, monkeypatch, capsys):
    """Two runs on one cached dataset (an ImageFolder tree with GCN + ZCA): the sweep builds its cache once,
    with every core, before starting them, and the runs only read it (no entry is rewritten). A run alone
    on its data, and data without a cache (MNIST), are left to the run."""
    tree = make_image_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    monkeypatch.setenv("BINARYCONNECT_CACHE", str(cache))
    seen, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):  # the cache as each run finds it when it starts
        seen.append({p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")})
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(sweep.subprocess, "Popen", popen)
    threads = torch.get_num_threads()
    out = tmp_path / "s"
    assert main(["sweep", "mnist-float", "mnist-deterministic", "--seeds", "0", "-o", str(out), "--",
                 "--dataset", "imagefolder", "--dataset-option", f"path={tree}", "--val-size", "3",
                 "--batch-size", "3", "--hidden", "8", "--depth", "1", "--epochs", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert f"preparing the imagefolder data once for 2 runs ({cores} threads)" in text
    assert torch.get_num_threads() == threads  # restored
    assert len(seen) == 2 and len(seen[0]) == 2 and seen[0] == seen[1]  # decoded + splits, before either run
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == seen[0]  # read, not rebuilt
    for job in ("mnist-float-s0", "mnist-deterministic-s0"):
        assert json.loads((out / job / "summary.json").read_text())["epochs"] == 1

    calls = []
    monkeypatch.setattr("binaryconnect.data.load_dataset", lambda *a, **k: calls.append(a))
    configs = [recipe_config("mnist-float"), recipe_config("mnist-deterministic"),  # no cache
               recipe_config("cifar10-float"),  # alone on its data
               recipe_config("cifar10-float", dataset_kwargs={"preprocess": "gcn"}),  # other options: other data
               recipe_config("cifar10-float", dataset_kwargs={"cache": False}),
               recipe_config("cifar10-float", dataset_kwargs={"cache": False})]  # no cache asked for
    assert sweep.prepare_data(configs, log=lambda *a: None) == 0 and calls == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "mnist-nope", "--seeds", "0"], "unknown recipe 'mnist-nope'"),
        (["sweep", "mnist-float", "--seeds", "0,0"], "expected distinct comma-separated seeds"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--seed", "3"], "--seed after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "-ox"], "--out after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--se", "1"], "--seed after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--epochs", "0"], "argument --epochs: expected a positive"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--compile-mode", "default", "--amp", "fp8"],
         "argument --amp: invalid choice"),
    ],
)
def test_bad_sweep_input_gives_one_clear_line_and_writes_nothing(argv, message, tmp_path, capsys):
    assert_one_line_error([*argv[:2], "-o", str(tmp_path / "s"), *argv[2:]], message, capsys)
    assert not (tmp_path / "s").exists()



def test_a_repeated_sweep_must_ask_for_the_runs_it_finds_and_more_epochs_resume_them(tmp_path, data_root, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", "mnist-float", "--seeds", "0", "-o", str(out), "--", "--data-dir", str(data_root), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "2"]) == 0  # more epochs: the finished run is resumed, not skipped
    capsys.readouterr()
    summary = json.loads((out / "mnist-float-s0" / "summary.json").read_text())
    assert summary["epochs"] == 2 and len((out / "mnist-float-s0" / "metrics.jsonl").read_text().splitlines()) == 2
    before = (out / "mnist-float-s0" / "model.safetensors").read_bytes()
    changed = [*base[:-len(TINY)], "--train-subset", "500", "--hidden", "32", "--depth", "1", "--device", "cpu",
               "--epochs", "2"]
    assert_one_line_error(changed, "mnist-float-s0 holds a run with other options: model_kwargs (run: {", capsys)
    assert_one_line_error([*base, "--epochs", "1"], "has trained 2 epochs; ask for at least that many", capsys)
    assert (out / "mnist-float-s0" / "model.safetensors").read_bytes() == before  # nothing ran


@pytest.mark.parametrize("argv, message", [
    (["sweep", "mnist-float", "mnist-float", "--seeds", "0"], "a recipe is named twice: mnist-float mnist-float"),
    (["sweep", "mnist-float", "--seeds", "0", "--", "--device", "cuda:7"], "device 'cuda:7' asked for"),
    (["sweep", "mnist-float", "--seeds", "0", "--", "--dataset-option", "foo=1"], "dataset 'mnist' has no option"),
    (["sweep", "cifar10-deterministic", "--seeds", "0", "--", "--depth", "2"],
     "bad options for model 'convnet': no option 'depth'"),  # before the CIFAR-10 data are prepared
])
def test_sweep_checks_what_every_run_would_refuse_before_starting_any(argv, message, tmp_path, capsys):
    cut = argv.index("--seeds") + 2
    assert_one_line_error([*argv[:cut], "-o", str(tmp_path / "s"), *argv[cut:]], message, capsys)
    assert not (tmp_path / "s").exists()


def test_plan_runs_every_recipes_first_seed_before_any_second_seed(tmp_path):
    """With fewer slots than jobs, every recipe gets its first seed before any recipe its second: the
    jobs go seed by seed, recipes in the order given, each in OUT/<recipe>-s<seed> with its log beside it."""
    jobs = sweep.plan(["mnist-float", "mnist-deterministic"], [3, 0], tmp_path)
    assert [(j.recipe, j.seed) for j in jobs] == [("mnist-float", 3), ("mnist-deterministic", 3),
                                                  ("mnist-float", 0), ("mnist-deterministic", 0)]
    assert [j.run_dir for j in jobs] == [tmp_path / n for n in ("mnist-float-s3", "mnist-deterministic-s3",
                                                                "mnist-float-s0", "mnist-deterministic-s0")]
    assert all(j.log == j.run_dir.parent / (j.run_dir.name + ".log") and j.state == "pending" for j in jobs)


def test_train_command_starts_a_new_run_or_resumes_a_checkpoint(tmp_path):
    """A job without a checkpoint starts its recipe with its seed and directory; one with a checkpoint is
    resumed in place; the sweep's train options and --no-progress go to both."""
    [job] = sweep.plan(["mnist-float"], [5], tmp_path)
    assert sweep.train_command(job, ["--epochs", "2"]) == [
        sys.executable, "-m", "binaryconnect", "train", "mnist-float", "--seed", "5", "-o",
        str(tmp_path / "mnist-float-s5"), "--epochs", "2", "--no-progress"]
    assert not job.resumed
    job.run_dir.mkdir()
    (job.run_dir / "checkpoint.safetensors").write_bytes(b"")
    assert sweep.train_command(job, ["--epochs", "2"]) == [
        sys.executable, "-m", "binaryconnect", "train", "--resume", str(job.run_dir), "--epochs", "2", "--no-progress"]
    assert job.resumed


def _echo_threads(job, args):
    return [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]


@pytest.mark.parametrize("slots, jobs, given, expected", [(4, 2, None, "4"), (3, 5, None, "2"), (16, 1, None, "8"),
                                                          (2, 2, "7", "7")])
def test_cpu_threads_are_shared_out_between_the_runs_side_by_side(tmp_path, monkeypatch, slots, jobs, given,
                                                                    expected):
    """8 usable cores: each run gets 8 // (runs at the same time) threads, the runs at the same time being the
    fewer of slots and jobs; an OMP_NUM_THREADS the user set is kept."""
    monkeypatch.setattr(sweep, "usable_cores", lambda: 8)
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    monkeypatch.setattr(sweep, "train_command", _echo_threads)
    done = sweep.run_jobs(sweep.plan(["a"], list(range(jobs)), tmp_path), [], slots=slots, log=lambda *a: None,
                          poll=0.02)
    assert [j.state for j in done] == ["finished"] * jobs
    assert all(j.log.read_text() == f"threads {expected}\n" for j in done)



@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_threads_are_shared_out_from_the_cores_this_process_may_use_not_the_machines(tmp_path, monkeypatch):
    """A sweep started under ``taskset -c 0,1`` (or in a 2-core cpuset) on a 16-core machine: two runs side by
    side get one thread each, not 16 // 2 = 8, which would put 16 threads on 2 cores."""
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(sweep, "cpu_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep, "train_command", _echo_threads)
    done = sweep.run_jobs(sweep.plan(["a", "b"], [0], tmp_path), [], slots=2, log=lambda *a: None, poll=0.02)
    assert [j.state for j in done] == ["finished"] * 2
    assert all(j.log.read_text() == "threads 1\n" for j in done)


def test_usable_cores_without_cpu_affinity_are_the_machines(monkeypatch):
    """Where the OS keeps no CPU affinity (macOS, Windows), every core ``os.cpu_count`` sees; at least one."""
    monkeypatch.delattr(sweep.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(sweep, "cpu_quota", lambda: None)  # whatever quota the machine running the tests has
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 6)
    assert sweep.usable_cores() == 6
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: None)  # "undetermined"
    assert sweep.usable_cores() == 1



def _cgroups(tmp_path, proc: str, files: dict) -> tuple:
    (tmp_path / "proc").write_text(proc)
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text)
    return tmp_path / "proc", tmp_path / "cg"


@pytest.mark.parametrize("proc, files, expected", [
    # cgroup v2: the least along the cgroup and those above it; "max" is no limit
    ("0::/a/b\n", {"a/b/cpu.max": "max 100000\n", "a/cpu.max": "150000 100000\n", "cpu.max": "max 100000"}, 1.5),
    ("0::/a/b\n", {"a/b/cpu.max": "50000 100000\n", "a/cpu.max": "150000 100000\n"}, 0.5),
    # a container's namespaced view: its own path is not under the mount, the mount's root holds its limit
    ("0::/kubepods/pod1/c1\n", {"cpu.max": "200000 100000\n"}, 2.0),
    # cgroup v1: the cpu controller's mount (named after the controllers it holds), quota -1 is no limit
    ("12:memory:/x\n4:cpu,cpuacct:/docker/1\n3:cpuset:/\n",
     {"cpu,cpuacct/docker/1/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/docker/1/cpu.cfs_period_us": "100000\n",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.5),
    ("2:cpuacct:/\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {}, None),  # no cpu controller files
    ("0::/\n", {"cpu.max": "garbage\n"}, None),
    ("0::/\n", {"cpu.max": "0 100000\n"}, None),
])
def test_cpu_quota_of_the_process_cgroups(tmp_path, proc, files, expected):
    assert sweep.cpu_quota(*_cgroups(tmp_path, proc, files)) == expected


def test_cpu_quota_without_cgroups_is_none(tmp_path):
    assert sweep.cpu_quota(tmp_path / "no-such-file", tmp_path) is None


def test_cpu_quota_of_a_cgroup_whose_name_is_not_utf8(tmp_path):
    """cgroup names are bytes: one that is not UTF-8 is still found (and read) where the OS names it."""
    (tmp_path / "proc").write_bytes(b"0::/caf\xe9\n")
    folder = tmp_path / "cg" / os.fsdecode(b"caf\xe9")
    folder.mkdir(parents=True)
    (folder / "cpu.max").write_text("300000 100000\n")
    assert sweep.cpu_quota(tmp_path / "proc", tmp_path / "cg") == 3.0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_a_cpu_quota_lowers_the_usable_cores(monkeypatch):
    """``docker run --cpus 2.5`` on an 8-core machine: 3 cores' worth of threads, not 8; a quota above the
    cores the process may run on changes nothing."""
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(sweep, "cpu_quota", lambda: 2.5)
    assert sweep.usable_cores() == 3
    monkeypatch.setattr(sweep, "cpu_quota", lambda: 0.2)
    assert sweep.usable_cores() == 1
    monkeypatch.setattr(sweep, "cpu_quota", lambda: 12.0)
    assert sweep.usable_cores() == 8
    monkeypatch.setattr(sweep, "cpu_quota", lambda: None)
    assert sweep.usable_cores() == 8

def test_threads_are_shared_among_the_runs_that_start_not_the_skipped_ones(tmp_path, monkeypatch):
    """A repeated sweep with one run left of two (the other finished): that run gets all 8 cores, not 8 // 2."""
    monkeypatch.setattr(sweep, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep, "train_command", _echo_threads)
    jobs = sweep.plan(["a", "b"], [0], tmp_path)
    jobs[0].run_dir.mkdir(parents=True)
    (jobs[0].run_dir / "summary.json").write_text("{}")
    done = sweep.run_jobs(jobs, [], slots=2, log=lambda *a: None, poll=0.02)
    assert [j.state for j in done] == ["skipped", "finished"]
    assert done[1].log.read_text() == "threads 8\n"

@pytest.mark.parametrize("child, state", [
    ("raise SystemExit(0)", "finished"),
    ("raise SystemExit(130)", "stopped"),  # train stopped by Ctrl-C, with a checkpoint
    ("raise SystemExit(143)", "stopped"),  # train stopped by SIGTERM, with a checkpoint
    ("import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)",
     "stopped"),  # killed by the signal itself
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "stopped"),
    ("raise SystemExit(1)", "failed"),
    ("raise SystemExit(2)", "failed"),
    ("raise SystemExit(3)", "diverged"),  # train's TrainingDiverged: a repeat does not resume it
])
def test_exit_codes_of_a_stop_are_stopped_others_failed(tmp_path, monkeypatch, child, state):
    """130 and 143 (train's exit codes after SIGINT and SIGTERM) and death by either signal mean the run
    stopped and a repeat resumes it; any other non-zero code is a failure."""
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    [job] = sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=lambda *a: None, poll=0.02)
    assert job.state == state


def test_a_failed_run_is_reported_with_its_logs_error_line(tmp_path, monkeypatch):
    """The sweep's line for a failed run, and the job, carry the error its log ends with (the last
    "binaryconnect: error:" line, without the prefix), so the cause shows without opening the log."""
    child = ("import sys; print('loading'); print('binaryconnect: error: checksum mismatch for MNIST/raw/x.gz',"
             " file=sys.stderr); print('binaryconnect: warning: later noise'); sys.exit(2)")
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    lines = []
    [job] = sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=lines.append, poll=0.02)
    assert job.state == "failed" and job.error == "checksum mismatch for MNIST/raw/x.gz"
    assert lines[-1].endswith(f"failed (exit code 2, log {job.log}): checksum mismatch for MNIST/raw/x.gz")
    # a repeat appends to the log: its error is its own, not the attempt's before
    child2 = "import sys; print('Traceback ...'); print('RuntimeError: boom'); sys.exit(1)"
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child2])
    [job] = sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=lines.append, poll=0.02)
    assert job.error == "RuntimeError: boom" and "checksum mismatch" in job.log.read_text()
    child3 = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child3])
    [job] = sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=lines.append, poll=0.02)
    assert job.state == "failed" and job.error == "killed by SIGKILL"
    (tmp_path / "quiet.log").write_text("Traceback ...\nRuntimeError: boom\n\n")
    assert sweep.last_error(tmp_path / "quiet.log") == "RuntimeError: boom"  # no error line: the last line
    assert sweep.last_error(tmp_path / "missing.log") is None


def test_sigterm_on_the_sweep_stops_its_runs_like_ctrl_c(tmp_path):
    """A sweep process sent SIGTERM (a batch system's time limit) passes SIGINT to its runs, starts no
    more and returns; run in its own process, so that a SIGTERM not handled ends only that process."""
    code = f"""
import os, pathlib, signal, sys, threading
from binaryconnect import sweep
child = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); time.sleep(60)"
sweep.train_command = lambda job, args: [sys.executable, "-c", child]
jobs = sweep.plan(["a", "b"], [0], pathlib.Path({str(tmp_path)!r}))
threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
sweep.run_jobs(jobs, [], slots=1, poll=0.05)
print("states", *[j.state for j in jobs])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stopping on SIGTERM: 1 running get SIGINT" in result.stdout
    assert result.stdout.splitlines()[-1] == "states stopped not started"


def test_run_jobs_restores_the_signal_handlers_it_replaced(tmp_path, monkeypatch):
    """After the sweep, SIGINT and SIGTERM are handled as before it (a program calling run_jobs keeps
    its Ctrl-C)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", "pass"])
    sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=lambda *a: None, poll=0.02)
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_error_in_the_sweep_leaves_no_run_behind(tmp_path, monkeypatch):
    """If the loop itself fails (here the log callback), the runs it started are stopped and waited for
    before the error propagates."""
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def log(line):
        if "started" in line:
            raise RuntimeError("log failed")

    monkeypatch.setattr(sweep.subprocess, "Popen", popen)
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match="log failed"):
            sweep.run_jobs(sweep.plan(["a"], [0], tmp_path), [], slots=1, log=log, poll=0.02)
        assert len(started) == 1 and started[0].poll() is not None
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_stopped_sweep_reports_its_unfinished_runs_and_exits_1(tmp_path, monkeypatch, capsys):
    """The sweep's table lists a run that stopped (config.json, no summary) as unfinished with its
    progress, and says on stderr which runs did not finish; exit code 1."""
    def stopped_run(jobs, train_args, slots, deadline=None, log=print, poll=0.5, prepare=None):
        [job] = jobs
        job.run_dir.mkdir(parents=True)
        config = json.loads(json.dumps({**recipe_config("mnist-float", epochs=3).to_dict(), "seed": job.seed}))
        (job.run_dir / "config.json").write_text(json.dumps({"config": config, "environment": {}}))
        (job.run_dir / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "val_error": 0.2, "test_error": 0.25, "train_loss": 0.5}) + "\n")
        job.state, job.returncode = "stopped", 130
        return jobs

    monkeypatch.setattr(sweep, "run_jobs", stopped_run)
    out = tmp_path / "s"
    assert main(["sweep", "mnist-float", "--seeds", "4", "-o", str(out), "--", "--epochs", "3"]) == 1
    captured = capsys.readouterr()
    assert "no finished runs" in captured.out
    assert f"{out / 'mnist-float-s4'}: 1/3 epochs, best so far 25.00% at epoch 1" in captured.out
    assert "1 of 1 runs did not finish: mnist-float-s4 (stopped)" in captured.err
