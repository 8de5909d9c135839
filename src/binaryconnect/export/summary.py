"""Per-layer accounting of a packed network: parameters, binary parameters, bytes, multiply-accumulates.

Definitions (per layer of the packed file, and in total):

- parameters: the real-valued numbers the same network needs in float32 after batch-norm folding:
  the weights plus ``scale`` and ``offset`` (2 per output channel). Where max pooling sits between a
  convolution and its batch norm (the paper's convnets), the convolution keeps a ``scale`` (H) and
  ``offset`` of its own and the batch norm becomes an ``affine`` layer: 2 numbers per such channel more
  than the PyTorch model counts (the CIFAR-10 convnet: 14,031,508 against 14,029,716);
- binary parameters: the weights stored as 1 bit;
- float32 bytes: ``4 x parameters``;
- packed bytes: the bytes of the layer's tensors in the file. The safetensors header (8 bytes + its
  JSON) is its own row, so the total is exactly the file's size on disk;
- MACs: multiply-accumulates per example of the float32 network (linear: ``out x in``; conv:
  ``out_channels x in_channels x kh x kw x OH x OW``); in a binary layer every one of them becomes an
  addition or subtraction (``replaced``), leaving one multiplication per output (the folded scale,
  counted separately as ``scale_multiplications``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass

from .format import PackedNetwork, layer_fan_in, layer_shapes


@dataclass
class LayerRow:
    index: int | None
    layer: str
    output_shape: list[int]
    params: int
    binary_params: int
    float32_bytes: int
    packed_bytes: int
    macs: int
    macs_replaced: int

    @property
    def compression(self) -> float | None:
        return self.float32_bytes / self.packed_bytes if self.packed_bytes and self.float32_bytes else None


def _relative(float32_bytes: int, packed_bytes: int) -> str:
    """How the float32 parameters' bytes compare with the file's: "29.9x larger", or "0.99x: smaller"."""
    ratio = float32_bytes / packed_bytes
    return f"{ratio:.1f}x larger" if ratio >= 1 else f"{ratio:.2f}x the file: smaller, its header included"


def _describe(layer: dict) -> str:
    kind = layer["type"]
    if kind == "linear":
        text = f"linear {layer['in_features']}->{layer['out_features']}"
    elif kind == "conv2d":
        kh, kw = layer["kernel_size"]
        text = f"conv2d {layer['in_channels']}->{layer['out_channels']} {kh}x{kw}"
        if layer["stride"] != [1, 1]:
            text += f" stride {layer['stride']}"
    elif kind == "maxpool2d":
        text = f"maxpool2d {layer['kernel_size'][0]}x{layer['kernel_size'][1]}"
    elif kind == "affine":
        text = f"affine {layer['channels']}"
    else:
        text = kind
    if kind in ("linear", "conv2d"):
        text += f" ({layer['binarization']})" if layer["binary"] else " (float32)"
    return text


def summarize(net: PackedNetwork, data: bytes | None = None) -> dict:
    """Rows and totals for ``net``; ``data`` are its file bytes (serialized here when not given)."""
    if data is None:
        data = net.to_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    shapes = layer_shapes(net.layers, net.input_shape)
    rows: list[LayerRow] = []
    for i, (layer, (_, out_shape)) in enumerate(zip(net.layers, shapes, strict=True)):
        prefix = f"layers.{i}."
        packed = sum(t.numel() * t.element_size() for name, t in net.tensors.items() if name.startswith(prefix))
        params = binary = macs = 0
        if layer["type"] in ("linear", "conv2d"):
            out = out_shape[0]
            weights = out * layer_fan_in(layer)
            params = weights + 2 * out
            binary = weights if layer["binary"] else 0
            macs = weights * (math.prod(out_shape[1:]) if layer["type"] == "conv2d" else 1)
        elif layer["type"] == "affine":
            params = 2 * layer["channels"]
        rows.append(LayerRow(i, _describe(layer), list(out_shape), params, binary, 4 * params, packed, macs,
                             macs if binary else 0))
    rows.append(LayerRow(None, "safetensors header", [], 0, 0, 0, 8 + header_len, 0, 0))
    total = LayerRow(None, "total", [net.num_classes], sum(r.params for r in rows),
                     sum(r.binary_params for r in rows), sum(r.float32_bytes for r in rows),
                     sum(r.packed_bytes for r in rows), sum(r.macs for r in rows), sum(r.macs_replaced for r in rows))
    if total.packed_bytes != len(data):  # pragma: no cover - would be a bug in the accounting
        raise AssertionError(f"summary counts {total.packed_bytes} bytes, the file has {len(data)}")
    scalings = sum(math.prod(out) for layer, (_, out) in zip(net.layers, shapes, strict=True)
                   if layer["type"] in ("linear", "conv2d", "affine"))
    return {"rows": rows, "total": total, "file_bytes": len(data), "source": net.source,
            "input_shape": list(net.input_shape), "scale_multiplications": scalings}


def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def format_summary(summary: dict, title: str = "") -> str:
    """A fixed-width table of ``summarize``'s result."""
    head = (f"{'#':>3} {'layer':34s} {'output':>14s} {'params':>12s} {'binary':>12s} {'float32 B':>13s} "
            f"{'packed B':>11s} {'ratio':>7s} {'MACs':>13s} {'adds':>6s}")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in [*summary["rows"], summary["total"]]:
        if r.layer == "total":
            lines.append("-" * len(head))
        ratio = f"{r.compression:.1f}x" if r.compression else "-"
        share = f"{100 * r.macs_replaced / r.macs:.0f}%" if r.macs else "-"
        idx = "" if r.index is None else str(r.index)
        shape = "x".join(map(str, r.output_shape)) if r.output_shape else ""
        lines.append(f"{idx:>3} {r.layer:34s} {shape:>14s} {r.params:>12,} {r.binary_params:>12,} "
                     f"{_fmt_bytes(r.float32_bytes):>13s} {_fmt_bytes(r.packed_bytes):>11s} {ratio:>7s} "
                     f"{r.macs:>13,} {share:>6s}")
    t = summary["total"]
    lines.append(f"file: {t.packed_bytes:,} bytes; float32 parameters: {t.float32_bytes:,} bytes "
                 f"({_relative(t.float32_bytes, t.packed_bytes)}); {t.binary_params:,} of {t.params:,} parameters "
                 f"binary; {100 * t.macs_replaced / max(1, t.macs):.2f}% of {t.macs:,} MACs per example are additions, "
                 f"plus {summary['scale_multiplications']:,} multiplications by the folded batch-norm scales")
    note = summary["source"].get("stochastic_weights") if isinstance(summary["source"], dict) else None
    if note:
        lines.append(f"note: stochastic layers exported as {note}")
    return "\n".join(lines)


def summary_json(summary: dict) -> str:
    def row(r: LayerRow) -> dict:
        return {**asdict(r), "compression": r.compression}

    return json.dumps({"rows": [row(r) for r in summary["rows"]], "total": row(summary["total"]),
                       "file_bytes": summary["file_bytes"], "input_shape": summary["input_shape"],
                       "scale_multiplications": summary["scale_multiplications"], "source": summary["source"]},
                      indent=2)
