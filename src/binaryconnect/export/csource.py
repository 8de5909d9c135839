"""A packed network as portable C99 source, for targets without Python or PyTorch (microcontrollers,
embedded Linux, other languages through a C interface).

``write_c_source(net, folder, name)`` writes ``<name>.h`` and ``<name>.c``. The source holds the
network's tensors as constant arrays, byte for byte those of the ``.bcnn`` file: 1 bit per binary weight,
float32 ``scale`` / ``offset`` (the folded batch norm) and the weights of float layers. It also holds the
layers (``kernels/c_runtime.inc``): a binary layer adds or subtracts its inputs and multiplies once per
output. It needs only a C99 compiler: no allocation, no library call and no header beyond its own in
the source (an optimizing compiler may turn a zeroing loop into ``memset``: ``-ffreestanding`` keeps it
out of a bare-metal build). The
header declares::

    #define <NAME>_INPUT_SIZE      floats of one example, [C][H][W] (or [F]) as PyTorch lays it out
    #define <NAME>_NUM_CLASSES     logits
    #define <NAME>_SCRATCH_FLOATS  working memory of <name>_logits_scratch
    #define <NAME>_CONST_BYTES     bytes of the constant arrays (weights, scales, offsets)
    void <name>_logits(const float *input, float *logits);     /* a static scratch buffer: not reentrant */
    void <name>_logits_scratch(const float *input, float *logits, float *scratch);
    int <name>_predict(const float *input);                     /* argmax, the first on ties */

The input is preprocessed as the training data were. Float constants are written as C99 hexadecimal
literals, so they are exactly the file's float32 values; the sums run in another order than PyTorch's,
so logits agree with the packed model to float32 rounding (tests/test_export_csource.py); an infinite input
gives the +-inf logits float32 PyTorch gives (the native engine's kernels give NaN there; ``PackedModel`` refuses it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import atomic_write_bytes
from ..errors import ConfigError
from .format import PackedNetwork, layer_shapes

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")


@dataclass
class CSource:
    """What ``write_c_source`` wrote."""

    header: Path
    source: Path
    const_bytes: int  # the constant arrays: equal to the .bcnn file's tensor bytes
    scratch_floats: int
    layers: int


def check_name(name: str) -> str:
    """``name`` if it can prefix C identifiers and name files, else a ConfigError saying what would."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r} must be a C identifier that starts with a letter (letters, digits and _, "
                          "at most 63 characters; a leading _ is reserved to the compiler and its library), e.g. "
                          "mnist_bc")
    return name


def _floats(t: torch.Tensor) -> list[str]:
    return [float(v).hex() + "f" for v in t.detach().to(torch.float32).flatten().tolist()]


def _bytes(t: torch.Tensor) -> list[str]:
    return [f"0x{v:02x}" for v in t.detach().to(torch.uint8).flatten().tolist()]


def _array(ctype: str, name: str, values: list[str], per_line: int) -> str:
    lines = [", ".join(values[i:i + per_line]) for i in range(0, len(values), per_line)]
    return f"static const {ctype} {name}[{len(values)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def _runtime(functions: set[str]) -> str:
    """``kernels/c_runtime.inc``: its opening comment and the sections of ``functions`` (unused static
    functions would make compilers warn)."""
    text = resources.files(__package__).joinpath("kernels/c_runtime.inc").read_text()
    head, *sections = re.split(r"^/\* == bcnn_(\w+) == \*/\n", text, flags=re.M)
    chosen = [body for fn, body in zip(sections[::2], sections[1::2], strict=True) if fn in functions]
    return head + "".join(chosen)


# The default of the most floats a binary stride-1 convolution's table of signed sums may take (8 MiB;
# ``export-c --table-floats``): a larger layer runs in bands of output rows, as many as fit, at least one
# (so a layer whose one-row band exceeds it still takes that). Bands cost a table rebuild per band and
# shorter runs of additions: on the 2-vCPU EPYC (1 MiB L2 per core) the CIFAR-10 convnet ran 2.3x slower
# with tables of at most 64 Ki floats than unbanded (2.4 MB for its largest layer), so by default only
# large images band. A binary linear layer takes its byte tables (256 floats per 8 inputs) where they fit
# in it, else its half-byte tables (32 floats per 8 inputs).
TABLE_FLOATS = 1 << 21


def _conv_work(layer: dict, c: int, h: int, w: int, oh: int, table_floats: int = TABLE_FLOATS) -> tuple[int, int]:
    """``(band, work floats)`` of a conv2d layer for ``bcnn_conv2d`` (c_runtime.inc): for a binary layer of
    stride 1, the output rows per band (its table at most ``table_floats`` where one row allows) and its
    table plus the band's sums; for a float layer of stride 1, the zero-padded input plus the sums; other
    strides need no work memory (band 0, unused)."""
    if layer["stride"] != [1, 1]:
        return 0, 0
    (kh, _), (ph, pw), (dh, _) = layer["kernel_size"], layer["padding"], layer["dilation"]
    padded_w = w + 2 * pw
    if not layer["binary"]:
        return 0, c * (h + 2 * ph) * padded_w + oh * padded_w
    groups = (c + 3) // 4
    reach, per_row = (kh - 1) * dh, (16 * (groups - 1) + 2 ** (c - 4 * (groups - 1))) * padded_w
    band = max(1, min(oh, table_floats // per_row - reach))
    return band, per_row * (band + reach) + band * padded_w


def c_source(net: PackedNetwork, name: str = "bcnn_model",
             table_floats: int = TABLE_FLOATS) -> tuple[str, str, int, int]:
    """``(header, source, const_bytes, scratch_floats)`` of ``net`` as C99 (module docstring); ``table_floats``
    as ``TABLE_FLOATS``."""
    check_name(name)
    if isinstance(table_floats, bool) or not isinstance(table_floats, int) or table_floats < 1:
        raise ConfigError(f"table_floats must be a positive number of floats (an int), not {table_floats!r}")
    macro = name.upper()
    shapes = layer_shapes(net.layers, tuple(net.input_shape))
    arrays, calls, const_bytes, buffer_floats, work_floats = [], [], 0, 1, 0
    current, spare = "input", ("a", "b")
    fused_relu: set[int] = set()
    for i, layer in enumerate(net.layers):
        kind = layer["type"]
        if kind == "relu" and i - 1 in fused_relu:
            continue
        if (kind in ("linear", "conv2d", "affine") and i + 1 < len(net.layers)
                and net.layers[i + 1]["type"] == "relu"):
            fused_relu.add(i)
        shape_in, shape_out = shapes[i]
        if kind == "flatten":
            calls.append(f"    /* layer {i}: flatten (a no-op in [C][H][W] order) */")
            continue
        out = spare[0] if current != spare[0] else spare[1]
        relu = int(i in fused_relu)
        prefix = f"{name}_l{i}"
        for tensor_name, tensor in sorted((k.split(".", 2)[2], v) for k, v in net.tensors.items()
                                          if k.startswith(f"layers.{i}.")):
            values = _bytes(tensor) if tensor.dtype == torch.uint8 else _floats(tensor)
            ctype = "unsigned char" if tensor.dtype == torch.uint8 else "float"
            arrays.append(_array(ctype, f"{prefix}_{tensor_name}", values, 16 if ctype != "float" else 4))
            const_bytes += tensor.numel() * tensor.element_size()
        if kind in ("linear", "conv2d"):
            weights = (f"{prefix}_weight_bits, 0" if layer["binary"] else f"0, {prefix}_weight")
            comment = f"{'binary' if layer['binary'] else 'float'} weights{', ReLU' if relu else ''}"
            if kind == "linear":
                c, o = layer["in_features"], layer["out_features"]
                bytes_ = 0
                if layer["binary"]:  # its tables of signed sums: bytes (256 per 8 inputs) where they fit
                    bytes_ = int(256 * ((c + 7) // 8) <= table_floats)
                    work_floats = max(work_floats, (256 if bytes_ else 32) * ((c + 7) // 8))
                calls.append(f"    /* layer {i}: linear {c}->{o}, {comment} */\n"
                             f"    bcnn_linear({current}, {out}, {c}, {o}, {weights}, {prefix}_scale, {prefix}_offset, "
                             f"{relu}, {bytes_}, work);")
            else:
                (c, h, w), (o, oh, ow) = shape_in, shape_out
                geometry = (*layer["kernel_size"], *layer["stride"], *layer["padding"], *layer["dilation"])
                band, floats = _conv_work(layer, c, h, w, oh, table_floats)
                work_floats = max(work_floats, floats)
                calls.append(f"    /* layer {i}: conv2d {c}->{o} {layer['kernel_size'][0]}x{layer['kernel_size'][1]}, "
                             f"{comment} */\n"
                             f"    bcnn_conv2d({current}, {out}, {c}, {h}, {w}, {o}, {', '.join(map(str, geometry))}, "
                             f"{oh}, {ow}, {band},\n                {weights}, {prefix}_scale, {prefix}_offset, "
                             f"{relu}, work);")
        elif kind == "affine":
            size = math.prod(shape_in[1:])
            calls.append(f"    /* layer {i}: affine (batch norm) on {layer['channels']} channels"
                         f"{', ReLU' if relu else ''} */\n"
                         f"    bcnn_affine({current}, {out}, {layer['channels']}, {size}L, {prefix}_scale, "
                         f"{prefix}_offset, {relu});")
        elif kind == "relu":
            calls.append(f"    /* layer {i}: ReLU */\n    bcnn_relu({current}, {out}, {math.prod(shape_in)}L);")
        elif kind == "maxpool2d":
            (c, h, w), (_, oh, ow) = shape_in, shape_out
            geometry = (*layer["kernel_size"], *layer["stride"], *layer["padding"])
            calls.append(f"    /* layer {i}: max pooling {layer['kernel_size'][0]}x{layer['kernel_size'][1]} */\n"
                         f"    bcnn_maxpool2d({current}, {out}, {c}, {h}, {w}, {', '.join(map(str, geometry))}, "
                         f"{oh}, {ow});")
        else:  # format.LAYER_TYPES and this function must list the same layers
            raise ConfigError(f"layer {i}: no C implementation of layer type {kind!r}")
        buffer_floats = max(buffer_floats, math.prod(shape_out))
        current = out
    used = {f for f in ("linear", "conv2d", "affine", "relu", "maxpool2d") if f"bcnn_{f}(" in "\n".join(calls)}
    runtime = _runtime(used | ({"signed_sums"} if used & {"linear", "conv2d"} else set()))
    input_size = math.prod(net.input_shape)
    scratch_floats = 2 * buffer_floats + work_floats
    shape = "[" + "][".join(map(str, net.input_shape)) + "]"
    header = f"""/* {name}.h: a binaryconnect network as C99, generated by binaryconnect {__version__}. Do not edit. */
#ifndef {macro}_BCNN_H
#define {macro}_BCNN_H

#ifdef __cplusplus
extern "C" {{
#endif

#define {macro}_INPUT_SIZE {input_size} /* floats of one example, {shape} in C order, preprocessed as in training */
#define {macro}_NUM_CLASSES {net.num_classes}
#define {macro}_SCRATCH_FLOATS {scratch_floats} /* working memory of {name}_logits_scratch, in floats */
#define {macro}_CONST_BYTES {const_bytes} /* the constant arrays: 1 bit per binary weight */

/* The logits of one example. Uses a static scratch buffer: not reentrant. */
void {name}_logits(const float *input, float *logits);
/* The same with the caller's scratch memory of {macro}_SCRATCH_FLOATS floats: reentrant. */
void {name}_logits_scratch(const float *input, float *logits, float *scratch);
/* The predicted class (the first of the largest logits). Not reentrant. */
int {name}_predict(const float *input);

#ifdef __cplusplus
}}
#endif

#endif
"""
    body = "\n".join(calls)
    offsets = {"a": 0, "b": buffer_floats, "work": 2 * buffer_floats}  # the scratch: two buffers, a work area
    code = re.sub(r"/\*.*?\*/", "", body, flags=re.S)  # the calls without their comments
    uses = [v for v in offsets if re.search(rf"\b{v}\b", code)]
    declarations = "".join(f"    float *{v} = scratch{f' + {offsets[v]}' if offsets[v] else ''};\n" for v in uses)
    layers = ", ".join(la["type"] for la in net.layers)
    source = f"""/* {name}.c: a binaryconnect network as C99, generated by binaryconnect {__version__}. Do not edit.
 * Layers: {layers}. Input {shape}, {net.num_classes} classes. */
#include "{name}.h"

{runtime}
/* ---- the network's tensors, as in its .bcnn file ---- */
{"".join(arrays)}
/* ---- the network ---- */
void {name}_logits_scratch(const float *input, float *logits, float *scratch)
{{
{declarations}    int i;
{body}
    for (i = 0; i < {macro}_NUM_CLASSES; ++i)
        logits[i] = {current}[i];
}}

static float {name}_scratch[{macro}_SCRATCH_FLOATS];

void {name}_logits(const float *input, float *logits)
{{
    {name}_logits_scratch(input, logits, {name}_scratch);
}}

int {name}_predict(const float *input)
{{
    static float logits[{macro}_NUM_CLASSES];
    int i, best = 0;
    {name}_logits(input, logits);
    for (i = 1; i < {macro}_NUM_CLASSES; ++i)
        if (logits[i] > logits[best])
            best = i;
    return best;
}}
"""
    if not uses:  # a network of flatten layers only: the scratch is unused
        source = source.replace("    int i;\n", "    int i;\n    (void)scratch;\n", 1)
    return header, source, const_bytes, scratch_floats


def write_c_source(net: PackedNetwork, folder: str | Path, name: str = "bcnn_model",
                   force: bool = False, table_floats: int = TABLE_FLOATS) -> CSource:
    """Write ``<folder>/<name>.h`` and ``<folder>/<name>.c`` (``folder`` is created); an existing file is
    refused unless ``force``, before anything is written. ``table_floats``: as ``TABLE_FLOATS``."""
    header, source, const_bytes, scratch = c_source(net, name, table_floats)
    folder = Path(folder)
    paths = (folder / f"{name}.h", folder / f"{name}.c")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force "
                          "to overwrite, or choose another -o folder or --name")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"-o {folder} is a file, not a folder: give the folder to write {name}.h and {name}.c in")
    for path, text in zip(paths, (header, source), strict=True):
        atomic_write_bytes(path, text.encode())
    return CSource(paths[0], paths[1], const_bytes, scratch, len(net.layers))
