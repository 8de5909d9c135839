"""Several training runs side by side: ``binaryconnect sweep RECIPE... --seeds 0,1,2 [-- TRAIN OPTIONS]``.

One ``binaryconnect train`` process per (recipe, seed), at most ``jobs`` at a time, each in its own run
directory ``OUT/<recipe>-s<seed>`` with its log beside it (``OUT/<recipe>-s<seed>.log``); then the
``report`` table over all of them. Why processes side by side: a small network (the paper's MNIST MLP)
leaves a GPU idle between its kernel launches, so several runs share one GPU at little cost to each
(RESULTS.md: on one H200, nine compiled MNIST runs side by side each trained the 250 epochs in 367-374 s,
about 1.5 s per epoch).

A sweep can be repeated: a finished run (``summary.json``) is skipped (resumed if asked for more epochs:
``Job.more_epochs``, set by the command line, which refuses a run directory holding other options), a
stopped or failed one (a checkpoint, no summary) is resumed with ``train --resume``, a missing one is
started. A run that diverged (its loss became NaN/Inf: exit code 3, ``diverged.json`` in its directory) is
not resumed: its last checkpoint, the same options and the same seed would lead it to the same NaN. It is
listed as diverged; ``train --resume`` tries it again by hand. ``deadline`` seconds after the
start, runs still going are stopped as Ctrl-C stops them (after a step, with a checkpoint), and no new
one starts, so a time-limited machine loses at most one step per run.

Data that several runs would each decode and preprocess at once (a cached dataset: CIFAR-10, SVHN, an
ImageFolder tree) is prepared once first, in the sweep's process with every core (``prepare_data``): the
runs then read the cache. Side by side, each run would build it with its share of the cores.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME
from .errors import DIVERGED_NAME, TrainingDiverged


@dataclass(eq=False)
class Job:
    recipe: str
    seed: int
    run_dir: Path
    log: Path
    state: str = "pending"  # pending | finished | failed | diverged | stopped | not started | skipped
    error: str | None = None  # a failed run: its log's error line, or the signal that killed it
    log_start: int = 0  # the byte of its log where the last attempt's output begins
    returncode: int | None = None
    resumed: bool = False
    more_epochs: bool = False  # finished, but asked for more epochs: resumed, not skipped


def plan(recipes: list[str], seeds: list[int], out: Path) -> list[Job]:
    """The (recipe, seed) jobs in order, seeds outer: with fewer slots than jobs, every recipe's first
    seed runs before any second seed."""
    return [Job(r, s, out / f"{r}-s{s}", out / f"{r}-s{s}.log") for s in seeds for r in recipes]


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity where the OS keeps one (Linux: ``taskset``, a
    container's or a batch scheduler's cpuset), else every core ``os.cpu_count`` sees; fewer where a cgroup
    CPU quota allows less time than that (``docker --cpus``, a Kubernetes CPU limit: ``cpu_quota``).
    ``os.cpu_count`` alone counts the machine's cores, more than a restricted process has: threads sized by
    it oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU time per second this process's cgroups allow (``1.5``: one and a half cores), the least along
    its cgroup and the cgroups above it; ``None`` without a limit, or where there are no cgroups (not Linux).
    cgroup v2: ``cpu.max`` (``"150000 100000"``, or ``"max 100000"`` for none); v1: ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` (quota -1 for none), under the ``cpu`` controller's mount."""
    try:
        lines = os.fsdecode(proc_cgroup.read_bytes()).splitlines()  # a cgroup's name may be any bytes
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            mounts, read = [root, root / "unified"], _cpu_max
        elif "cpu" in controllers.split(","):
            mounts, read = [root / name for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")], _cfs_quota
        else:
            continue
        for mount in dict.fromkeys(mounts):
            folder = mount / path.strip("/")
            while True:  # the cgroup, then those above it up to the mount (a namespaced path may not exist there)
                limit = read(folder)
                if limit is not None:
                    limits.append(limit)
                if folder == mount:
                    break
                folder = folder.parent
    return min(limits) if limits else None


def _read_numbers(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None


def _quota(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max": no limit
    return q / p if q > 0 and p > 0 else None


def _cpu_max(folder: Path) -> float | None:
    fields = _read_numbers(folder / "cpu.max")
    return _quota(*fields) if fields and len(fields) == 2 else None


def _cfs_quota(folder: Path) -> float | None:
    quota, period = _read_numbers(folder / "cpu.cfs_quota_us"), _read_numbers(folder / "cpu.cfs_period_us")
    return _quota(quota[0], period[0]) if quota and period and len(quota) == len(period) == 1 else None


def prepare_data(configs: list, log=print) -> int:
    """Load, and so cache, each dataset that two or more of ``configs`` (``TrainConfig``s of the runs about to
    start) load with the same options from a loader that caches (its ``cache`` option not False), once, with
    as many threads as this process may use cores (the runs' ``OMP_NUM_THREADS`` share is for running side by
    side); return how many were prepared. A bad dataset fails here, before any run starts."""
    import json

    import torch

    from .data import caches, load_dataset

    wanted: dict[str, list] = {}
    for c in configs:
        if not caches(c.dataset, c.dataset_kwargs):
            continue
        key = json.dumps([c.dataset, str(c.data_dir), c.val_size, c.download, c.dataset_kwargs], sort_keys=True,
                         default=str)
        wanted.setdefault(key, []).append(c)
    shared = [group for group in wanted.values() if len(group) > 1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(usable_cores())
        for group in shared:
            c, t0 = group[0], time.perf_counter()
            log(f"preparing the {c.dataset} data once for {len(group)} runs ({torch.get_num_threads()} threads)")
            load_dataset(c.dataset, c.data_dir, val_size=c.val_size, download=c.download, **c.dataset_kwargs)
            log(f"  ready in {time.perf_counter() - t0:.1f} s: the runs read it from the cache")
    finally:
        torch.set_num_threads(threads)
    return len(shared)


def train_command(job: Job, train_args: list[str]) -> list[str]:
    """The ``train`` command of ``job``: resume its run directory if it holds a checkpoint, else start it."""
    base = [sys.executable, "-m", "binaryconnect", "train"]
    if (job.run_dir / CHECKPOINT_NAME).is_file():
        job.resumed = True
        return [*base, "--resume", str(job.run_dir), *train_args, "--no-progress"]
    return [*base, job.recipe, "--seed", str(job.seed), "-o", str(job.run_dir), *train_args, "--no-progress"]


def last_error(log: Path, start: int = 0, limit: int = 300) -> str | None:
    """The last ``binaryconnect: error:`` line of a run's log after byte ``start`` (where this attempt's
    output begins: logs are appended to), else its last line, without the prefix, cut to ``limit``
    characters; None if there is none or the log cannot be read."""
    try:
        with open(log, "rb") as f:
            f.seek(max(start, f.seek(0, 2) - 16384))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return None
    if not lines:
        return None
    errors = [line for line in lines if line.startswith("binaryconnect: error:")]
    line = (errors[-1].removeprefix("binaryconnect: error:").strip() if errors else lines[-1])
    return line if len(line) <= limit else line[:limit - 3] + "..."


def run_jobs(jobs: list[Job], train_args: list[str], slots: int, deadline: float | None = None,
             log=print, poll: float = 0.5, prepare=None) -> list[Job]:
    """Run ``jobs`` (``slots`` at a time) to completion, or until ``deadline`` seconds have passed or the
    sweep gets SIGINT/SIGTERM: then the running ones get SIGINT (they checkpoint and stop) and are
    waited for. Each job ends ``finished``, ``failed``, ``diverged`` (exit code 3 now, or ``diverged.json``
    from before: not started again), ``stopped`` (checkpointed: a repeat resumes it), ``not started`` or
    ``skipped`` (finished before). ``prepare(jobs)``, if given, is called with the jobs that will run before
    any starts (``prepare_data``: its time counts toward the deadline)."""
    start = time.monotonic()
    pending = []
    for job in jobs:
        if (job.run_dir / "summary.json").is_file() and not job.more_epochs:
            job.state = "skipped"
            log(f"{job.run_dir.name}: already finished, skipped")
        elif (job.run_dir / DIVERGED_NAME).is_file():
            job.state = "diverged"
            log(f"{job.run_dir.name}: diverged before ({job.run_dir / DIVERGED_NAME} says where), not resumed: it "
                f"would diverge again from its last checkpoint; delete {job.run_dir} to train it anew (with other "
                f"options), or try it again by hand with `binaryconnect train --resume {job.run_dir}`")
        else:
            pending.append(job)
    if prepare is not None and pending:
        prepare(pending)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # CPU threads shared out between the processes side by side (skipped ones
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // min(slots, max(1, len(pending)))))  # not)
    running: dict[Job, subprocess.Popen] = {}
    stop = {"why": None, "signalled": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["why"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            if stop["why"] is None and deadline is not None and time.monotonic() - start >= deadline:
                stop["why"] = f"the deadline ({deadline:g} s)"
            if stop["why"] is not None and not stop["signalled"]:
                stop["signalled"] = True
                log(f"stopping on {stop['why']}: {len(running)} running get SIGINT (they checkpoint and stop), "
                    f"{len(pending)} not started")
                for job in pending:
                    job.state = "not started"
                pending = []
                for process in running.values():
                    process.send_signal(signal.SIGINT)
            while pending and len(running) < slots and stop["why"] is None:
                job = pending.pop(0)
                job.run_dir.parent.mkdir(parents=True, exist_ok=True)
                command = train_command(job, train_args)
                with open(job.log, "ab") as out:
                    job.log_start = out.tell()  # this attempt's output starts here (a repeat appends)
                    running[job] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
                log(f"{job.run_dir.name}: {'resumed' if job.resumed else 'started'} (log {job.log})")
            time.sleep(poll)
            for job, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[job]
                job.returncode = code
                # failed, not stopped, whatever stopped the sweep: a repeat resumes it from its last checkpoint
                # like any unfinished run (and it may fail again: its log says why); diverged: not resumed
                stopped = code in (130, 143, -signal.SIGINT, -signal.SIGTERM)
                job.state = ("finished" if code == 0 else "stopped" if stopped
                             else "diverged" if code == TrainingDiverged.exit_code else "failed")
                why = None
                if job.state == "failed":
                    why = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                           else last_error(job.log, job.log_start))
                log(f"{job.run_dir.name}: {job.state}" + ("" if code == 0 else f" (exit code {code}, log {job.log})")
                    + (f": {why}" if why else ""))
                job.error = why
    finally:
        for process in running.values():  # only after an error in this loop: no run is left behind
            process.send_signal(signal.SIGINT)
            process.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return jobs
