"""Training curves of run directories: ``binaryconnect report RUN_DIR ... --plot FILE``.

Drawn as the paper's Figure 3 (training curves of its CIFAR-10 ConvNet): per epoch, the validation error
rate (solid lines, left axis) and the training cost, the mean square hinge loss of the epoch's mini-batches
(dotted lines, right axis), one colour per experiment (the groups of ``report``: runs that differ only in
their seed), one line per seed. Both axes are logarithmic, so that MNIST's 1% and the first epochs' 10%
read alike (an axis with a zero on it stays linear). Unfinished runs are drawn as far as they got. The
data are the runs' ``metrics.jsonl`` files.

Needs matplotlib (``python -m pip install -e ".[plot]"``); drawn with its object API (no pyplot: no
display, no global state), and written atomically in the format the file name's suffix names.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .errors import ConfigError
from .report import Run, group_runs, read_metrics


def plot_curves(runs: list[Run], path: str | Path):
    """Draw the training curves of ``runs`` (see the module docstring) into ``path`` (``.png``, ``.pdf``,
    ``.svg``, ...); return the matplotlib ``Figure``."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter, MaxNLocator
    except ImportError:
        raise ConfigError('--plot needs matplotlib: python -m pip install -e ".[plot]" (or pip install '
                          "matplotlib)") from None
    path = Path(path)
    groups = group_runs(runs, include_unfinished=True)
    # the legend goes below the axes: the figure grows with it, the axes keep their size
    fig = Figure(figsize=(8, 4.3 + 0.2 * len(groups)), layout="constrained")
    formats = fig.canvas.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise ConfigError(f"cannot tell the plot's format from {path.name!r}: end the name in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")

    error_axis = fig.add_subplot()
    loss_axis = error_axis.twinx()
    drawn = 0
    for i, group in enumerate(groups):
        color = f"C{i % 10}"
        label = textwrap.fill(f"{group.label} ({len(group.runs)} run{'s' if len(group.runs) > 1 else ''})", 100)
        for run in group.runs:
            records = read_metrics(run.path)
            if not records:
                continue
            epochs = [r["epoch"] for r in records]
            marker = "o" if len(epochs) == 1 else None  # a line of one point draws nothing
            error_axis.plot(epochs, [100 * r["val_error"] for r in records], color=color, linewidth=1.2,
                            label=label, marker=marker, markersize=4)
            loss_axis.plot(epochs, [r["train_loss"] for r in records], color=color, linewidth=1.0,
                           linestyle=":", marker=marker, markersize=4)
            label = None  # one legend entry per group
            drawn += 1
    if drawn == 0:
        raise ConfigError("no epoch has finished in these runs (their metrics.jsonl are empty): nothing to plot")
    error_axis.set_xlabel("epoch")
    error_axis.set_ylabel("validation error (%), solid")
    loss_axis.set_ylabel("training loss (square hinge), dotted")
    for axis in (error_axis, loss_axis):
        if min(min(line.get_ydata()) for line in axis.lines) <= 0:  # a 0% error or a zero loss: a log axis
            continue  # would leave it out, so this axis stays linear
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 20, 0.5: plain numbers
        axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    error_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if max(max(line.get_xdata()) for line in error_axis.lines) == 1:  # one epoch: one tick, at epoch 1
        error_axis.set_xlim(0.5, 1.5)
        error_axis.set_xticks([1])
    error_axis.grid(True, which="both", alpha=0.3)
    # below the axes, as wide as the figure: long labels (experiments that differ in many options) take
    # height, not the curves' width
    fig.legend(loc="outside lower center", fontsize="small")
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=150)
    except Exception as exc:  # noqa: BLE001 - e.g. .pgf without LaTeX: matplotlib's own message says why
        raise ConfigError(f"matplotlib could not draw {path.name!r} as {fmt} ({exc}); try .png, .pdf or .svg") from None
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:  # an operating-system error: the command line's exit code 1, in one line
        raise OSError(exc.errno, f"cannot write the plot ({exc.strerror or exc})", str(path)) from None
    return fig
