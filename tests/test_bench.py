"""The training-step benchmark (``bench/bench_train_step.py``) runs and reports what it says it measures.

Its numbers are timings and are not asserted here (speed lives in the benchmarks); what is checked is that
the script runs on the CPU with a tiny network, times every variant, and derives its ratios from its own
per-round timings: a broken benchmark would otherwise only show on the GPU, where time is scarce."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_train_step.py"
TINY = ["--device", "cpu", "--network", "mnist", "--hidden", "16", "--batch-size", "4", "--steps", "1",
        "--warmup", "0", "--rounds", "3"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_step_benchmark_times_the_three_variants_and_their_ratios(bench, capsys):
    result = bench.main(TINY)
    assert set(result["median_step_ms"]) == {"none", "deterministic", "stochastic"}
    assert all(ms > 0 for ms in result["median_step_ms"].values())
    assert set(result["ratio_to_float"]) == {"deterministic", "stochastic"}
    for r in result["ratio_to_float"].values():
        assert 0 < r["min"] <= r["median"] <= r["max"]
    assert "speedup_over_fp32_float" not in result
    out = capsys.readouterr().out
    assert "deterministic" in out and "x float (rounds:" in out and "speed-up of" not in out


def test_the_fp32_baseline_is_timed_in_the_same_rounds_and_gives_each_variant_its_speed_up(bench, capsys):
    result = bench.main(TINY + ["--amp", "bf16", "--fp32-baseline"])
    ms = result["median_step_ms"]
    assert set(ms) == {"none", "deterministic", "stochastic", bench.FP32}
    speedup = result["speedup_over_fp32_float"]
    assert set(speedup) == {"none", "deterministic", "stochastic"}
    for r in speedup.values():
        assert 0 < r["min"] <= r["median"] <= r["max"]
    out = capsys.readouterr().out
    assert "float, fp32" in out
    assert "speed-up of --amp bf16 over the float step in float32" in out


@pytest.mark.parametrize("options", [["--amp", "bf16", "--channels-last"], ["--channels-last"]])
def test_the_fp32_baseline_variant_differs_from_the_others_only_in_precision_and_layout(bench, monkeypatch, options):
    built = []

    def make_variant(binarization, state, args, device, x, y):  # records the options, builds nothing
        built.append((binarization, dict(vars(args))))
        return lambda x, y: None

    monkeypatch.setattr(bench, "make_variant", make_variant)
    bench.main(TINY + options + ["--fp32-baseline"])
    assert [b for b, _ in built] == ["none", "deterministic", "stochastic", "none"]
    main_args = built[0][1]
    assert all(a == main_args for _, a in built[1:3])
    assert main_args["channels_last"] and main_args["amp"] == ("bf16" if "--amp" in options else "none")
    assert built[3][1] == {**main_args, "amp": "none", "channels_last": False}


def test_the_fp32_baseline_needs_an_option_to_measure(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(TINY + ["--fp32-baseline"])
    assert exc.value.code == 2
    assert "give one of them" in capsys.readouterr().err


def test_the_ratios_are_the_statistics_of_the_per_round_quotients(bench, monkeypatch):
    """Given timings through a fake clock, each ratio is the median (min, max) over rounds of that round's
    quotient, not a quotient of medians."""
    clock = {"t": 0.0}
    durations = {"none": [1.0, 2.0, 4.0], "deterministic": [1.5, 2.0, 8.0], "stochastic": [3.0, 3.0, 3.0],
                 bench.FP32: [2.0, 2.0, 2.0]}
    order = []

    def make_variant(binarization, state, args, device, x, y):
        name = bench.FP32 if args.amp == "none" and binarization == "none" else binarization

        def step(x, y):
            order.append(name)
        return step

    monkeypatch.setattr(bench, "make_variant", make_variant)
    round_of = {v: 0 for v in durations}

    def perf_counter():
        return clock["t"]

    real_sync = bench.sync

    def sync(device):
        real_sync(device)
        if order:  # the end of a timed block: advance the clock by that variant's duration for this round
            v = order[-1]
            clock["t"] += durations[v][round_of[v]]
            round_of[v] += 1
            order.clear()

    monkeypatch.setattr(bench, "sync", sync)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=perf_counter))  # the script's clock only
    result = bench.main(TINY[:10] + ["--warmup", "0", "--rounds", "3", "--amp", "bf16", "--fp32-baseline"])
    assert result["ratio_to_float"]["deterministic"] == {"median": 1.5, "min": 1.0, "max": 2.0}
    assert result["ratio_to_float"]["stochastic"]["median"] == 1.5
    assert result["speedup_over_fp32_float"]["none"] == {"median": 1.0, "min": 0.5, "max": 2.0}
    assert result["speedup_over_fp32_float"]["stochastic"]["median"] == pytest.approx(2 / 3)
    assert result["median_step_ms"]["none"] == statistics.median([1e3, 2e3, 4e3])
