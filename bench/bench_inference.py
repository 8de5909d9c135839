"""Packed inference (1-bit weights, additions only) against float32 PyTorch eval of the same network.

    python bench/bench_inference.py                       # MLP and convnet, 1 and 2 threads, batch 1 and 256
    python bench/bench_inference.py --models mlp --runs 400 --json /tmp/bench.json
    python bench/bench_inference.py --models linear1024 --threads 1 --batches 1,256     # one layer
    python bench/bench_inference.py --models conv3-128,conv128-128,conv128-256,conv256-256,conv256-512,conv512-512 \
        --threads 1 --batches 16                                                        # the convnet's layers

Both sides run in this process on the same inputs:

- float32: the network as a user would deploy it without this package: ``nn.Linear``/``nn.Conv2d`` holding
  the binary weights ``+-H`` as float32, the same batch norms, ReLUs and poolings, ``eval()`` under
  ``torch.inference_mode()`` (PyTorch's MKL / oneDNN kernels). The training model itself in eval mode is
  slower still (it re-binarizes its latent weights on every call); ``--training-model`` times it too.
- packed: ``export_model`` of the same network, run by ``PackedModel(engine="native")``.

The networks are random-initialised (seeded) with batch-norm statistics calibrated on random inputs:
speed does not depend on the values. The two sides take turns in 5 blocks of consecutive calls (each
after a few untimed warm-up calls), so background load hits both alike while each keeps its own data in
cache; each number is the median of ``--runs`` timed calls. The 1-minute load average is printed
before and after: on a shared machine, numbers taken under load are noisy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from binaryconnect.export import PackedModel, export_model
from binaryconnect.layers import BinaryConv2d, BinaryLinear
from binaryconnect.models import create_model, list_models

MODELS = {
    "mlp": ("784-1024-1024-1024-10 MLP (MNIST)", (1, 28, 28)),
    "convnet": ("2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10 (CIFAR-10)", (3, 32, 32)),
}
#: Single layers of the two networks, each followed by its batch norm (folded into the packed layer);
#: name -> (in, out, input shape); convolutions 3x3 with padding 1, then a global max pooling and a flatten
#: (a packed file ends in per-class scores: here one per channel; the pooling is about 1/27 of the
#: smallest convolution's work, 1/1150 of the others', on both sides alike).
LAYERS = {
    "linear1024": (1024, 1024, (1024,)),
    "conv3-128": (3, 128, (3, 32, 32)),
    "conv128-128": (128, 128, (128, 32, 32)),
    "conv128-256": (128, 256, (128, 16, 16)),
    "conv256-256": (256, 256, (256, 16, 16)),
    "conv256-512": (256, 512, (256, 8, 8)),
    "conv512-512": (512, 512, (512, 8, 8)),
}
for _name, (_cin, _cout, _shape) in LAYERS.items():
    _kind = "linear" if len(_shape) == 1 else f"3x3 convolution on {_shape[1]}x{_shape[2]}"
    MODELS[_name] = (f"one binary {_kind} layer {_cin}->{_cout} + batch norm", _shape)


def macs_per_example(name: str) -> float:
    """Rough multiply-accumulates per example (millions): sets the number of timed runs."""
    if name in LAYERS:
        cin, cout, shape = LAYERS[name]
        return cin * cout * (9 * shape[1] * shape[2] if len(shape) == 3 else 1) / 1e6
    return 3 if name == "mlp" else 600


def _local_convnet() -> nn.Sequential:
    """The paper's CIFAR-10 net from the binary layers (used when the ``convnet`` model is not registered)."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in (128, 256, 512):
        layers += [BinaryConv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                   BinaryConv2d(c, c, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    layers += [nn.Flatten(), BinaryLinear(512 * 16, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
               BinaryLinear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(), BinaryLinear(1024, 10), nn.BatchNorm1d(10)]
    return nn.Sequential(*layers)


def build(name: str, seed: int) -> tuple[nn.Module, str]:
    torch.manual_seed(seed)
    if name in LAYERS:
        cin, cout, shape = LAYERS[name]
        if len(shape) == 1:
            model = nn.Sequential(BinaryLinear(cin, cout), nn.BatchNorm1d(cout))
        else:
            model = nn.Sequential(BinaryConv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                  nn.MaxPool2d(shape[1]), nn.Flatten())
        origin = "bench-local single layer"
    elif name == "mlp":
        model, origin = create_model("mlp"), "binaryconnect.models mlp"
    elif "convnet" in list_models():
        model, origin = create_model("convnet", input_shape=(3, 32, 32)), "binaryconnect.models convnet"
    else:
        model, origin = _local_convnet(), "bench-local convnet"
    calibrate(model, torch.randn(64, *MODELS[name][1]))
    return model, origin


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    model(x)
    model.eval()


def float_twin(model: nn.Module) -> nn.Module:
    """The same network with plain float32 layers holding the binary weights +-H."""
    twin = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, BinaryLinear):
                new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            elif isinstance(child, BinaryConv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, bias=child.bias is not None)
            else:
                swap(child)
                continue
            with torch.no_grad():
                new.weight.copy_(child.binary_weight() if child.binarization != "none" else child.weight)
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            setattr(parent, name, new)

    swap(twin)
    return twin.eval()


def timed(fns: dict, x: torch.Tensor, runs: int, warmup: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each function. The functions take turns in ``rounds`` blocks of
    consecutive calls (each block after ``warmup`` untimed calls), so background load falls on all of
    them alike while each runs with its own data in cache, as a deployed model would. ``rounds=runs``
    alternates call by call instead: each call then finds the caches filled by the other side."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    rounds = max(1, min(rounds, runs))
    if rounds == runs:
        warmup = 0
    with torch.inference_mode():
        for r in range(rounds):
            block = runs // rounds + (r < runs % rounds)
            for key, fn in fns.items():
                for _ in range(warmup):
                    fn(x)
                for _ in range(block):
                    start = time.perf_counter()
                    fn(x)
                    times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,convnet")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--runs", type=int, default=0, help="timed runs per configuration (default: by size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--training-model", action="store_true", help="also time the training model in eval mode")
    p.add_argument("--alternate", action="store_true",
                   help="alternate float32 and packed call by call (cold caches) instead of in 5 blocks")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)

    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "seed": args.seed,
           "timing": "alternating call by call" if args.alternate else "5 alternating blocks of consecutive calls",
           "loadavg_before": loadavg()}
    print(f"# CPU {env['cpu']} ({env['cores']} cores), torch {env['torch']}, python {env['python']}, "
          f"seed {args.seed}, timing: {env['timing']}, load average {env['loadavg_before']}")
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        model, origin = build(name, args.seed)
        twin = float_twin(model)
        num_classes = LAYERS[name][1] if name in LAYERS else None  # a pooled convolution: one score per channel
        packed = PackedModel(export_model(model, MODELS[name][1], num_classes=num_classes), engine="native")
        print(f"## {name}: {MODELS[name][0]} [{origin}], packed engine {packed.engine} ({packed.isa})")
        print(f"{'threads':>7} {'batch':>5} {'runs':>5} {'float32 ms':>11} {'packed ms':>10} {'speedup':>8} "
              f"{'max|diff|':>10} {'same argmax':>11}" + ("  training-model ms" if args.training_model else ""))
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for batch in map(int, args.batches.split(",")):
                g = torch.Generator().manual_seed(args.seed + batch)
                x = torch.randn(batch, *MODELS[name][1], generator=g)
                runs = args.runs or max(5, min(300, int(3e4 / (macs_per_example(name) * batch))))
                fns = {"float32": twin, "packed": packed}
                if args.training_model:
                    fns["training"] = model
                with torch.inference_mode():  # untimed warm-up of both sides
                    for fn in fns.values():
                        fn(x)
                med = timed(fns, x, runs, warmup=max(1, min(10, runs // 10)), rounds=runs if args.alternate else 5)
                with torch.inference_mode():
                    ref, out = twin(x), packed(x)
                diff = float((ref - out).abs().max())
                same = float((ref.argmax(1) == out.argmax(1)).float().mean())
                row = {"model": name, "threads": threads, "batch": batch, "runs": runs,
                       "float32_ms": 1e3 * med["float32"], "packed_ms": 1e3 * med["packed"],
                       "speedup": med["float32"] / med["packed"], "max_abs_diff": diff, "same_argmax": same,
                       "isa": packed.isa}
                if args.training_model:
                    row["training_model_ms"] = 1e3 * med["training"]
                results.append(row)
                print(f"{threads:>7} {batch:>5} {runs:>5} {row['float32_ms']:>11.3f} {row['packed_ms']:>10.3f} "
                      f"{row['speedup']:>7.2f}x {diff:>10.2e} {100 * same:>10.1f}%"
                      + (f"  {row['training_model_ms']:.3f}" if args.training_model else ""))
    finish(env, results, args.json)
    return 0


def finish(env: dict, results: list[dict], path: str | None) -> None:
    """Print the load average after the run; write the environment and the results to ``path`` (JSON)."""
    env["loadavg_after"] = loadavg()
    print(f"# load average after: {env['loadavg_after']}")
    if path:
        with open(path, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
