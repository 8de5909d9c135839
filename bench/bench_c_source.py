"""The C99 export (``binaryconnect export-c``) against float32 PyTorch and the packed native engine, one
example at a time (what an embedded target runs).

    python bench/bench_c_source.py                          # MLP and convnet, -O2 and -O3 -march=native
    python bench/bench_c_source.py --models mlp --runs 400 --cflags="-O2" --json /tmp/c.json
    python bench/bench_c_source.py --packed runs/det-s0/model.bcnn --models ""   # a trained model's test split

``--packed FILE`` also writes that packed model as C, compiles it, and runs the test split of the dataset
it was trained on (``--data-dir``, else ``$BINARYCONNECT_DATA``) through the program: its test error, the
packed model's (torch engine), the share of identical predictions and the largest logit difference.

The networks are ``bench_inference.py``'s: random-initialised (seeded), batch norms calibrated on random
inputs. Each is exported (``export_model``), written as C (``write_c_source``) and compiled with the
machine's C compiler (``$CC``, else cc) and each ``--cflags`` set, with a harness that times every call
with ``clock_gettime`` (warm-up calls first) and prints the median. Float32 PyTorch (``nn.Linear`` /
``nn.Conv2d`` holding the +-1 weights, ``eval()``, ``inference_mode``) and the packed native engine run
batch 1 in this process with ``--threads`` threads (the C code runs on one). The sides take turns in 3
blocks of ``--runs / 3`` calls, so background load falls on all of them; PyTorch's and the engine's numbers
are medians of all their calls, the C program's the median of its 3 blocks' medians. The largest
difference between the C program's logits and float32 PyTorch's on the same input is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_inference import LAYERS, MODELS, build, cpu_name, finish, float_twin, loadavg
from binaryconnect.export import PackedModel, export_model
from binaryconnect.export.csource import write_c_source

HARNESS = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "net.h"

static int by_value(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* argv: input file (one example, float32), warm-up calls, timed calls. Prints the median seconds per
   call, then the logits. */
int main(int argc, char **argv)
{
    static float input[NET_INPUT_SIZE], logits[NET_NUM_CLASSES];
    FILE *f;
    int warmup, runs, i;
    double *seconds;
    if (argc != 4 || !(f = fopen(argv[1], "rb")) || fread(input, sizeof(float), NET_INPUT_SIZE, f) != NET_INPUT_SIZE)
        return 2;
    fclose(f);
    warmup = atoi(argv[2]);
    runs = atoi(argv[3]);
    seconds = malloc(sizeof(double) * (size_t)runs);
    for (i = 0; i < warmup; ++i)
        net_logits(input, logits);
    for (i = 0; i < runs; ++i) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        net_logits(input, logits);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        seconds[i] = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    }
    qsort(seconds, (size_t)runs, sizeof(double), by_value);
    printf("%.9e\n", seconds[runs / 2]);
    for (i = 0; i < NET_NUM_CLASSES; ++i)
        printf("%.9e\n", (double)logits[i]);
    free(seconds);
    return 0;
}
"""


def compile_c(folder: Path, cc: str, cflags: str) -> Path:
    program = folder / ("run" + str(abs(hash(cflags))))
    subprocess.run([cc, "-std=c99", *cflags.split(), "-o", str(program), str(folder / "main.c"),
                    str(folder / "net.c")], check=True)
    return program


STREAM = r"""
#include <stdio.h>
#include "net.h"

/* Reads examples (float32) from stdin, writes their logits (float32) to stdout. */
int main(void)
{
    static float input[NET_INPUT_SIZE], logits[NET_NUM_CLASSES];
    while (fread(input, sizeof(float), NET_INPUT_SIZE, stdin) == NET_INPUT_SIZE) {
        net_logits(input, logits);
        fwrite(logits, sizeof(float), NET_NUM_CLASSES, stdout);
    }
    return 0;
}
"""


def check_packed(path: Path, data_dir: str | None, folder: Path, cc: str, cflags: str) -> dict:
    """The packed model at ``path`` as C, on its dataset's test split, against the packed model itself."""
    from binaryconnect.export import read_packed
    from binaryconnect.export.tools import dataset_of

    net = read_packed(path)
    packed = PackedModel(net, engine="torch")
    data = dataset_of(net, data_dir)
    x, y = data.test_x, data.test_y
    sub = folder / "packed"
    sub.mkdir()
    written = write_c_source(net, sub, "net")
    (sub / "main.c").write_text(STREAM)
    subprocess.run([cc, "-std=c99", *cflags.split(), "-o", str(sub / "run"), str(sub / "main.c"), str(sub / "net.c")],
                   check=True)
    start = time.perf_counter()
    out = subprocess.run([str(sub / "run")], input=x.numpy().astype(np.float32).tobytes(), capture_output=True,
                         check=True).stdout
    seconds = time.perf_counter() - start
    logits = torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(len(x), net.num_classes)
    with torch.inference_mode():
        reference = torch.cat([packed(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    row = {"packed": str(path), "cflags": cflags, "examples": len(x),
           "c_test_error": float((logits.argmax(1) != y).float().mean()),
           "packed_test_error": float((reference.argmax(1) != y).float().mean()),
           "same_prediction": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
           "max_abs_diff": float((logits - reference).abs().max()), "c_seconds": seconds,
           "const_bytes": written.const_bytes, "file_bytes": path.stat().st_size}
    print(f"## {path} in C ({cflags}): test error {100 * row['c_test_error']:.2f}% on {len(x):,} examples, "
          f"packed model {100 * row['packed_test_error']:.2f}%; same prediction on "
          f"{100 * row['same_prediction']:.2f}%, largest logit difference {row['max_abs_diff']:.2e}; "
          f"{seconds:.2f} s for the whole split, input and output through a pipe; "
          f"{written.const_bytes:,} bytes of constants ({row['file_bytes']:,} bytes in the .bcnn file)")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,convnet")
    p.add_argument("--cflags", action="append", help="compiler flags (repeatable; default: -O2, -O3 -march=native)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (the C code runs on one)")
    p.add_argument("--runs", type=int, default=0, help="timed calls per side (default: by size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed", help="also check this packed model (.bcnn) in C on its dataset's test split")
    p.add_argument("--data-dir", help="dataset root for --packed (default: $BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.runs and args.runs < 3:
        p.error(f"--runs must be at least 3 (the sides take turns in 3 blocks), got {args.runs}")
    cflags = args.cflags or ["-O2", "-O3 -march=native"]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        p.error("no C compiler: set $CC or put cc, gcc or clang on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    torch.set_num_threads(args.threads)
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "compiler": version, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "seed": args.seed, "threads": args.threads, "loadavg_before": loadavg()}
    print(f"# CPU {env['cpu']} ({env['cores']} cores), torch {env['torch']} ({args.threads} thread(s)), "
          f"{version}, seed {args.seed}, batch 1, load average {env['loadavg_before']}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "main.c").write_text(HARNESS)
        if args.packed:
            results.append(check_packed(Path(args.packed), args.data_dir, folder, cc, cflags[-1]))
        for name in filter(None, args.models.split(",")):
            if name not in MODELS:
                p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
            model, origin = build(name, args.seed)
            twin = float_twin(model)
            shape = MODELS[name][1]
            num_classes = LAYERS[name][1] if name in LAYERS else None  # a pooled convolution: one per channel
            net = export_model(model, shape, num_classes=num_classes)
            packed = PackedModel(net, engine="native")
            written = write_c_source(net, folder, "net", force=True)
            programs = {flags: compile_c(folder, cc, flags) for flags in cflags}
            x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
            (folder / "input.bin").write_bytes(x.numpy().astype(np.float32).tobytes())
            runs = args.runs or (300 if name == "mlp" else 15)
            warmup = max(1, runs // 10)
            times: dict[str, list[float]] = {"float32": [], "packed": [], **{f: [] for f in cflags}}
            logits = {}
            with torch.inference_mode():
                ref = twin(x)
                for _ in range(3):  # 3 blocks: PyTorch, the engine, each compiled program
                    for key, fn in (("float32", twin), ("packed", packed)):
                        for _ in range(warmup):
                            fn(x)
                        for _ in range(runs // 3):
                            start = time.perf_counter()
                            fn(x)
                            times[key].append(time.perf_counter() - start)
                    for flags, program in programs.items():
                        out = subprocess.run([str(program), str(folder / "input.bin"), str(warmup), str(runs // 3)],
                                             capture_output=True, text=True, check=True).stdout.split()
                        times[flags].append(float(out[0]))
                        logits[flags] = torch.tensor([float(v) for v in out[1:]])
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"## {name}: {MODELS[name][0]} [{origin}]; C: {written.const_bytes:,} bytes of constants, "
                  f"{4 * written.scratch_floats:,} bytes of working memory; packed engine {packed.isa}")
            print(f"{'side':>26} {'ms/example':>11} {'vs float32':>11} {'max|diff| vs float32':>21}")
            print(f"{'float32 PyTorch':>26} {1e3 * med['float32']:>11.3f} {'1.00x':>11}")
            print(f"{'packed native engine':>26} {1e3 * med['packed']:>11.3f} {med['float32'] / med['packed']:>10.2f}x")
            for flags in cflags:
                diff = float((logits[flags] - ref[0]).abs().max())
                print(f"{'C ' + flags:>26} {1e3 * med[flags]:>11.3f} {med['float32'] / med[flags]:>10.2f}x "
                      f"{diff:>21.2e}")
                results.append({"model": name, "cflags": flags, "c_ms": 1e3 * med[flags],
                                "float32_ms": 1e3 * med["float32"], "packed_ms": 1e3 * med["packed"],
                                "c_vs_float32": med["float32"] / med[flags], "max_abs_diff": diff,
                                "const_bytes": written.const_bytes, "runs": runs})
    finish(env, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
