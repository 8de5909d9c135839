"""Tables of results over seeds: ``binaryconnect report RUN_DIR ...``.

Reads the run directories ``train`` writes (``config.json``, ``summary.json``, ``metrics.jsonl``), groups
the runs that differ only in their seed (and in options that do not change the experiment: device, data
directory, checkpointing, evaluation batch size, torch.compile and its mode, channels-last), and gives for each group
the test error at best validation of every seed, their mean and sample standard deviation, the best
epochs and the wall times: the numbers a results table needs, computed from the files, not copied by hand.
Runs without ``summary.json`` (still training, or stopped) are listed apart with their progress and never
enter a mean.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ._values import is_finite_number, is_int
from .errors import DIVERGED_NAME, ConfigError

#: Options that do not define the experiment: runs differing only in these (and the seed) are grouped.
NOT_THE_EXPERIMENT = ("seed", "device", "data_dir", "download", "checkpoint_every", "checkpoint_seconds",
                      "eval_batch_size", "deterministic", "compile", "compile_mode", "channels_last", "cuda_graph")
#: Dataset options that do not change the data (``--dataset-option cache=false``, ``verify=false``).
NOT_THE_DATA = ("cache", "verify")


@dataclass
class Run:
    path: Path
    config: dict
    environment: dict
    summary: dict | None  # None: not finished
    epochs_done: int = 0
    best_so_far: dict | None = None  # unfinished runs: the best-validation record so far
    plan: dict | None = None  # a time budget's plan (config.json), once made after the first epoch
    diverged: dict | None = None  # unfinished runs whose loss became NaN/Inf: diverged.json (epoch, step, loss)

    @property
    def epochs_at_most(self) -> bool:
        """Whether ``config["epochs"]`` is only a cap: a run with a time budget still in its first epoch."""
        return self.config.get("time_budget") is not None and self.plan is None

    def progress(self) -> str:
        """An unfinished run's ``N/TOTAL epochs`` (``at most TOTAL`` before a time budget's plan)."""
        total = self.config.get("epochs", "?")
        return f"{self.epochs_done}/{'at most ' if self.epochs_at_most else ''}{total} epochs"


@dataclass
class Group:
    label: str
    config: dict
    runs: list[Run] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        """Test errors (%) at best validation of the finished runs, in seed order."""
        return [100 * r.summary["test_error"] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (n - 1); None for a single run."""
        return statistics.stdev(self.errors) if len(self.errors) > 1 else None

    @property
    def repeated_seeds(self) -> list[int]:
        """Seeds that more than one run of the group has (say one on the CPU, one on a GPU)."""
        seeds = [r.config["seed"] for r in self.runs]
        return sorted({s for s in seeds if seeds.count(s) > 1})

    def to_dict(self) -> dict:
        return {"label": self.label, "config": self.config, "n": len(self.runs), "mean_test_error": self.mean,
                "sd_test_error": self.sd, "repeated_seeds": self.repeated_seeds,
                "runs": [{"run": str(r.path), "seed": r.config["seed"], "test_error": 100 * r.summary["test_error"],
                          "best_epoch": r.summary["best_epoch"], "best_val_error": 100 * r.summary["best_val_error"],
                          "wall_seconds": r.summary.get("wall_seconds"), "device": r.environment.get("device"),
                          "threads": r.environment.get("threads"), "torch": r.environment.get("torch")}
                         for r in self.runs]}


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): is this {what}?") from None


def read_run(path: str | Path) -> Run:
    """One run directory; a clear ConfigError if it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a binaryconnect run directory (no config.json): give the folders "
                          "`binaryconnect train -o` wrote")
    info = _read_json(path / "config.json", "a run's config.json")
    if (not isinstance(info, dict) or not isinstance(info.get("config"), dict)
            or not is_int(info["config"].get("seed"))):
        raise ConfigError(f"{path / 'config.json'} holds no training configuration (with an integer seed)")
    summary = None
    if (path / "summary.json").is_file():
        summary = _read_json(path / "summary.json", "a run's summary.json")
        if (not isinstance(summary, dict) or not is_int(summary.get("best_epoch"))
                or not all(is_finite_number(summary.get(k)) for k in ("test_error", "best_val_error"))):
            raise ConfigError(f"{path / 'summary.json'} lacks the test error, best epoch or validation error (as "
                              "numbers): is the file damaged? `binaryconnect train --resume` rewrites it")
    if summary is not None and not is_finite_number(summary.get("wall_seconds")):
        summary.pop("wall_seconds", None)  # damaged or missing: shown as unknown, not a crash
    environment = info.get("environment") if isinstance(info.get("environment"), dict) else {}
    run = Run(path, info["config"], environment, summary,
              plan=info["plan"] if isinstance(info.get("plan"), dict) else None)
    if summary is None:
        records = read_metrics(path)
        run.epochs_done = len(records)
        if records:
            run.best_so_far = min(reversed(records), key=lambda r: r["val_error"])  # ties: the later epoch
        run.diverged = _read_diverged(path)
    return run


def _read_diverged(path: Path) -> dict | None:
    """``diverged.json`` of a run directory (train writes it when the loss becomes NaN/Inf): its epoch, step
    and loss; None if there is none. A damaged one still says the run diverged."""
    if not (path / DIVERGED_NAME).is_file():
        return None
    try:
        record = json.loads((path / DIVERGED_NAME).read_text())
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and is_int(record.get("epoch")) and is_int(record.get("step"))):
        return {}
    return {k: record[k] for k in ("epoch", "step", "loss") if k in record}


def read_metrics(path: str | Path) -> list[dict]:
    """The per-epoch records of a run directory's ``metrics.jsonl`` ([] if there is none yet); a line cut
    by a crash ends what can be read."""
    path = Path(path) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():  # a damaged byte: that line
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not (isinstance(record, dict) and is_int(record.get("epoch"))
                and all(is_finite_number(record.get(k)) for k in ("val_error", "test_error", "train_loss"))):
            break  # not a record train writes: what follows is not read either
        records.append(record)
    return records


def unique_runs(runs: list[Run]) -> list[Run]:
    """``runs`` without repeats of a run directory (overlapping globs name one twice), first kept."""
    seen, unique = set(), []
    for run in runs:
        if run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            unique.append(run)
    return unique


def _experiment(config: dict) -> dict:
    """The options that make the experiment: not the seed, device, speed options ..., not the epochs a
    time budget planned (they differ from run to run of one experiment), and not options left at None (a
    run directory written before an option existed lacks it: the same experiment)."""
    skip = NOT_THE_EXPERIMENT + (("epochs",) if config.get("time_budget") is not None else ())
    experiment = {k: v for k, v in config.items() if k not in skip and v is not None}
    if isinstance(experiment.get("dataset_kwargs"), dict):  # reading the data with or without the cache or
        experiment["dataset_kwargs"] = {k: v for k, v in experiment["dataset_kwargs"].items()  # the checksums
                                        if k not in NOT_THE_DATA}  # gives the same tensors
    return experiment


def _key(config: dict) -> str:
    return json.dumps(_experiment(config), sort_keys=True)


def group_runs(runs: list[Run], include_unfinished: bool = False) -> list[Group]:
    """Finished runs (and, if asked, unfinished ones: for curves, not for means) grouped by experiment, in
    order of first appearance; seeds sorted within a group.

    Each group is labelled by its recipe (else model and binarization), followed by the options in which
    it differs from other groups of the same label (``epochs=30``)."""
    groups: dict[str, Group] = {}
    for run in unique_runs(runs):
        if run.summary is None and not include_unfinished:
            continue
        key = _key(run.config)
        if key not in groups:
            c = run.config
            groups[key] = Group(c.get("recipe") or f"{c.get('model')} {c.get('binarization')}", _experiment(c))
        groups[key].runs.append(run)
    result = list(groups.values())
    base = [g.label for g in result]
    for g, label in zip(result, base, strict=True):
        g.runs.sort(key=lambda r: (r.config["seed"], str(r.path)))
        same_label = [o for o, other in zip(result, base, strict=True) if other == label and o is not g]
        differs = sorted({k for o in same_label for k in g.config.keys() | o.config.keys()
                          if g.config.get(k) != o.config.get(k)})
        if differs:
            g.label += " " + " ".join(f"{k}={json.dumps(g.config.get(k), sort_keys=True)}" for k in differs
                                      if k in g.config)  # (a budget's planned epochs are not in it)
    return result


def report_dict(runs: list[Run]) -> dict:
    """``group_runs(runs)`` and the unfinished runs, as JSON-ready data (``report --json``)."""
    return {"groups": [g.to_dict() for g in group_runs(runs)],
            "unfinished": [{"run": str(r.path), "epochs_done": r.epochs_done, "epochs": r.config.get("epochs"),
                            "epochs_at_most": r.epochs_at_most, "diverged": r.diverged}
                           for r in unique_runs(runs) if r.summary is None]}


def _seconds(runs: list[Run]) -> str:
    s = [r.summary.get("wall_seconds") for r in runs if r.summary.get("wall_seconds") is not None]
    if not s:
        return "?"
    return f"{min(s):.0f} s" if len(s) == 1 or round(min(s)) == round(max(s)) else f"{min(s):.0f}-{max(s):.0f} s"


def format_report(runs: list[Run], markdown: bool = False) -> str:
    """The table of ``group_runs(runs)``, then the unfinished runs."""
    groups = group_runs(runs)
    header = ["experiment", "n", "test error % by seed", "mean ± sd (%)", "best epochs", "wall time per run"]
    rows = []
    for g in groups:
        per_seed = ", ".join(f"s{r.config['seed']} {e:.2f}" for r, e in zip(g.runs, g.errors, strict=True))
        spread = f"{g.mean:.2f} ± {g.sd:.2f}" if g.sd is not None else f"{g.mean:.2f} (one run)"
        epochs = ", ".join(str(r.summary["best_epoch"]) for r in g.runs)
        rows.append([g.label, str(len(g.runs)), per_seed, spread, epochs, _seconds(g.runs)])
    lines = []
    if not rows:
        lines.append("no finished runs")
    elif markdown:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
        for r in [header, *rows]:
            lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    repeated = [(g, seed) for g in groups for seed in g.repeated_seeds]
    if repeated:  # e.g. one seed run on the CPU and on a GPU: two runs of one experiment, not two seeds
        lines.append("")
        for g, seed in repeated:
            lines.append(f"note: {g.label}: seed {seed} appears in {sum(r.config['seed'] == seed for r in g.runs)} "
                         "runs (other devices or options that do not define the experiment); its mean and sd count "
                         "each run")
    unfinished = [r for r in unique_runs(runs) if r.summary is None]
    if unfinished:
        lines.append("")
        lines.append("unfinished (not in any mean):")
        for r in unfinished:
            best = r.best_so_far
            note = (f", best so far {100 * best['test_error']:.2f}% at epoch {best['epoch']}" if best else "")
            if r.diverged is not None:
                where = (f" at epoch {r.diverged['epoch']}, step {r.diverged['step']}" if r.diverged else "")
                loss = f" (loss {r.diverged['loss']})" if "loss" in r.diverged else ""
                note += f"; diverged{where}{loss}"
            lines.append(f"  {r.path}: {r.progress()}{note}")
    return "\n".join(lines)
