"""Time one training step of the float, deterministic and stochastic versions of the same network.

One step = forward (through ``speed.training_forward``) + square hinge loss + backward + Adam step with
the Glorot learning-rate scales and the latent-weight clipping (``optim.make_optimizer``): what
``train.fit`` runs per mini-batch. The three variants share the initial weights, the batch (random
normal images, random labels: step time does not depend on the values), the device and the speed
options, and run in one process; their timings are interleaved over ``--rounds`` rounds so that drift
in the machine's load or clocks hits all three alike. Printed: the median step time of each variant,
the ratios deterministic / float and stochastic / float (median, and min..max over the rounds), and the
hardware and software versions.

    python bench/bench_train_step.py                          # CUDA if present, else CPU
    python bench/bench_train_step.py --device cpu --batch-size 8 --steps 3 --rounds 3
    python bench/bench_train_step.py --compile --amp bf16 --channels-last     # the fast GPU path
    python bench/bench_train_step.py --network mnist                          # the MNIST MLP, batch 100
    python bench/bench_train_step.py --network mnist --compile-mode reduce-overhead   # + CUDA graphs
    python bench/bench_train_step.py --network mnist --cuda-graph      # the whole step as CUDA graphs
    python bench/bench_train_step.py --cuda-graph --profile 5     # + where each variant's device time goes
    python bench/bench_train_step.py --cuda-graph --serial-groups # Adam's groups recorded one after the other
    python bench/bench_train_step.py --amp bf16 --channels-last --fp32-baseline   # + what bf16 / NHWC buy

``--fp32-baseline`` times a fourth variant in the same rounds: the float network with the same options but
float32 and the default memory format (no ``--amp``, no ``--channels-last``), and prints how much faster
each variant is than it: what the precision and layout options buy, measured against their baseline in the
same run.

The project's goals (issue 3) are for one H100: deterministic at most 1.10x and stochastic at most
1.20x the float step. CPU ratios say little about them (no fused kernels, different bottlenecks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from binaryconnect import __version__  # noqa: E402
from binaryconnect.cudagraph import GraphedStep  # noqa: E402
from binaryconnect.layers import set_generator  # noqa: E402
from binaryconnect.losses import square_hinge_loss  # noqa: E402
from binaryconnect.models import create_model  # noqa: E402
from binaryconnect.models.convnet import CIFAR10_CHANNELS, SVHN_CHANNELS  # noqa: E402
from binaryconnect.optim import make_optimizer  # noqa: E402
from binaryconnect.speed import AMP_MODES, COMPILE_MODES, CUDA_GRAPH_MODES, training_forward  # noqa: E402

VARIANTS = ("none", "deterministic", "stochastic")  # float, deterministic, stochastic BinaryConnect
FP32 = "none-fp32"  # --fp32-baseline: the float network in float32 and the default memory format
NETWORKS = {"cifar10": CIFAR10_CHANNELS, "svhn": SVHN_CHANNELS, "mnist": None}  # mnist: the paper's MLP


def build(network: str, hidden: int, binarization: str = "none") -> torch.nn.Module:
    """The paper's network for ``network``: a convnet, or for mnist the 784-input MLP (3 hidden layers)."""
    if network == "mnist":
        return create_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=hidden, depth=3,
                            bn_momentum=0.15, binarization=binarization)
    return create_model("convnet", channels=NETWORKS[network], hidden=hidden, binarization=binarization)


def environment(device: torch.device) -> dict:
    """Hardware and versions, for the record."""
    env = {"binaryconnect": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        env["cpu"] = platform.processor()
    env["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def make_variant(binarization: str, state: dict, args, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    """Model (initial weights ``state``), optimizer and step function of one variant (``args``: its speed
    options)."""
    model = build(args.network, args.hidden, binarization).to(device)
    model.load_state_dict(state)
    model.train()
    generator = torch.Generator(device=device).manual_seed(1)
    set_generator(model, generator)  # as train.fit does
    forward = training_forward(model, args.amp, args.channels_last, args.compile, args.compile_mode,
                               autocast_cache=not args.cuda_graph)
    optimizer = make_optimizer(model, lr=1e-3)  # as train.fit builds it

    if args.cuda_graph:  # as train.fit runs it with --cuda-graph: batch into the static inputs, two replays
        graph = GraphedStep(lambda a, b: square_hinge_loss(forward(a), b), model, optimizer, x, y,
                            generators=[generator], concurrent_groups=not args.serial_groups)

        def graphed_step(x, y):
            graph.load(x, y)
            loss = graph.forward_backward()
            graph.step()
            return loss

        return graphed_step

    def step(x, y):
        loss = square_hinge_loss(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # also clips the latent weights
        return loss

    return step


def profile_steps(stepper, x, y, steps: int, device: torch.device) -> dict:
    """Run ``steps`` steps under torch.profiler: the GPU kernels (CUDA graph replays included, as CUPTI
    reports them), or on the CPU the operators, by self time per step, the most costly first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper(x, y)
        sync(device)
    rows = []
    for e in prof.key_averages():
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if e.device_type != DeviceType.CPU or not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        rows.append({"name": e.key, "calls_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "per_step": sum(r["calls_per_step"] for r in rows),
            "self_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--network", choices=sorted(NETWORKS), default="cifar10")
    p.add_argument("--hidden", type=int, default=1024, help="units of the dense layers (paper: 1024)")
    p.add_argument("--batch-size", type=int, help="default: the paper's (50; mnist 100) on CUDA, 8 on CPU "
                                                  "(mnist: 100)")
    p.add_argument("--steps", type=int, help="timed steps per variant and round (default: 50 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 10 CUDA, 1 CPU; "
                                              "compilation happens here)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward/backward pass")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode (implies --compile); reduce-overhead: CUDA graphs on a GPU")
    p.add_argument("--amp", choices=AMP_MODES, default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cuda-graph", action="store_true",
                   help="record each variant's whole step (passes, Adam, clipping) as CUDA graphs, as train "
                        "--cuda-graph does (CUDA only; not with --compile-mode reduce-overhead/max-autotune)")
    p.add_argument("--serial-groups", action="store_true",
                   help="with --cuda-graph: record the optimizer's parameter groups (one per binarized layer) one "
                        "after the other, as before, instead of side by side on streams of their own")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the timing, run STEPS more steps of each variant under torch.profiler and print "
                        "its kernels (on the CPU: its operators) by self time per step, the most costly first")
    p.add_argument("--top", type=int, default=12, help="kernels printed per variant with --profile (default 12)")
    p.add_argument("--fp32-baseline", action="store_true",
                   help="also time the float network in float32 and the default memory format (the other options "
                        "the same) in the same rounds, and print each variant's speed-up over it: what --amp and "
                        "--channels-last buy")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = p.parse_args(argv)
    if args.profile < 0 or args.top < 1:
        p.error("--profile must be >= 0 and --top >= 1")
    args.compile = args.compile or args.compile_mode != "default"  # a compile mode implies --compile

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    if args.cuda_graph and not on_gpu:
        p.error(f"--cuda-graph needs a CUDA device; the device is {device}")
    if args.serial_groups and not args.cuda_graph:
        p.error("--serial-groups goes with --cuda-graph (without it the groups are always stepped in turn)")
    if args.cuda_graph and args.compile_mode in CUDA_GRAPH_MODES:
        p.error(f"--cuda-graph records the whole step itself; --compile-mode {args.compile_mode} cannot be "
                "nested in it")
    batch = args.batch_size or (100 if args.network == "mnist" else 50 if on_gpu else 8)
    steps = args.steps or (50 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    if args.fp32_baseline and args.amp == "none" and not args.channels_last:
        p.error("--fp32-baseline measures what --amp bf16 and/or --channels-last buy: give one of them")
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    state = build(args.network, args.hidden).state_dict()
    x = torch.randn(batch, *((1, 28, 28) if args.network == "mnist" else (3, 32, 32)), device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    load_before = loadavg()

    variants = VARIANTS + ((FP32,) if args.fp32_baseline else ())
    steppers, compile_seconds = {}, {}
    for v in variants:
        if v == FP32:  # the float network with these options, but in float32 and the default memory format
            steppers[v] = make_variant("none", state, argparse.Namespace(**{**vars(args), "amp": "none",
                                                                            "channels_last": False}), device, x, y)
        else:
            steppers[v] = make_variant(v, state, args, device, x, y)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            steppers[v](x, y)
        sync(device)
        compile_seconds[v] = time.perf_counter() - t0

    per_step: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                steppers[v](x, y)
            sync(device)
            per_step[v].append((time.perf_counter() - t0) / steps)

    median = {v: statistics.median(t) for v, t in per_step.items()}

    def per_round(num: str, den: str) -> dict:
        """The quotient per_step[num] / per_step[den] of each round: its median, min and max over the rounds."""
        r = [a / b for a, b in zip(per_step[num], per_step[den], strict=True)]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    result = {
        "environment": environment(device), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "network": args.network, "hidden": args.hidden, "batch_size": batch, "steps": steps, "warmup": warmup,
        "rounds": args.rounds, "compile": args.compile, "compile_mode": args.compile_mode, "amp": args.amp,
        "channels_last": args.channels_last, "cuda_graph": args.cuda_graph,
        "concurrent_groups": args.cuda_graph and not args.serial_groups,
        "median_step_ms": {v: 1e3 * t for v, t in median.items()},
        "ratio_to_float": {v: per_round(v, "none") for v in VARIANTS[1:]},
        "warmup_seconds": compile_seconds,
    }
    if args.fp32_baseline:  # each variant's speed-up over the float32 float step, per round
        result["speedup_over_fp32_float"] = {v: per_round(FP32, v) for v in VARIANTS}

    if args.profile:
        result["profile"] = {v: profile_steps(steppers[v], x, y, args.profile, device) for v in VARIANTS}

    env = result["environment"]
    print(f"binaryconnect {env['binaryconnect']}, torch {env['torch']}, python {env['python']}, {env['platform']}")
    hw = env.get("gpu") or env.get("cpu", "unknown CPU")
    print(f"device {device}: {hw}" + (f" (CUDA {env['cuda']}, cuDNN {env['cudnn']})" if on_gpu else
                                      f", {env['threads']} torch threads, {env['cpu_count']} CPUs"))
    print(f"load average before / after: {load_before} / {result['loadavg_after']}")
    kind = "MLP, 3 hidden layers" if args.network == "mnist" else "convnet"
    print(f"network {args.network} {kind} (hidden {args.hidden}), batch {batch}, {steps} steps x {args.rounds} "
          f"interleaved rounds after {warmup} warm-up steps; compile={args.compile} ({args.compile_mode}) "
          f"amp={args.amp} channels_last={args.channels_last} cuda_graph={args.cuda_graph}"
          + (f" concurrent_groups={result['concurrent_groups']}" if args.cuda_graph else ""))
    names = {"none": "float", "deterministic": "deterministic", "stochastic": "stochastic", FP32: "float, fp32"}
    for v in variants:
        line = f"  {names[v]:14s} {1e3 * median[v]:10.2f} ms/step"
        if v in result["ratio_to_float"]:
            r = result["ratio_to_float"][v]
            line += f"   {r['median']:.3f}x float (rounds: {r['min']:.3f}..{r['max']:.3f})"
        print(line)
    print("goals (one H100): deterministic <= 1.10x, stochastic <= 1.20x the float step")
    if args.fp32_baseline:
        options = " ".join(o for o, on in (("--amp bf16", args.amp == "bf16"),
                                           ("--channels-last", args.channels_last)) if on)
        print(f"speed-up of {options} over the float step in float32 and the default memory format "
              f"(rounds min..max): " + ", ".join(
                  f"{names[v]} {r['median']:.2f}x ({r['min']:.2f}..{r['max']:.2f})"
                  for v, r in result["speedup_over_fp32_float"].items()))
    for v, prof in result.get("profile", {}).items():
        unit = "kernels" if on_gpu else "operators"
        print(f"profile {names[v]}: {prof['per_step']:.1f} {unit} and {prof['self_us_per_step']:.1f} us of self "
              f"{'device' if on_gpu else 'CPU'} time per step ({args.profile} steps)")
        for row in prof["top"][:args.top]:
            print(f"    {row['us_per_step']:9.1f} us {row['calls_per_step']:6.1f}x  {row['name'][:100]}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
