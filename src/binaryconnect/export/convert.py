"""From a trained PyTorch model to a ``PackedNetwork``: pack the binary weights, fold the batch norms.

The model is walked generically: its leaf modules, in registration order, must be the sequence its
forward applies (an ``nn.Sequential``, or modules that hold one, like the paper's MLP and convnet).
Supported leaves: ``nn.Flatten``, ``BinaryLinear``/``nn.Linear``, ``BinaryConv2d``/``nn.Conv2d``,
``nn.BatchNorm1d``/``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d`` (``nn.Identity`` and ``nn.Dropout``
are skipped). ``export_model`` checks the result against the model on random inputs, so a forward that
is not that sequence is caught instead of exported wrongly.

Folding. A binary layer computes ``a_o = sum_k Wb_ok x_k (+ bias_o)`` with ``Wb = +-H``, and the batch
norm after it (eval mode) ``y = gamma (a - mean) / sqrt(var + eps) + beta``. With ``s_ok = Wb_ok / H``
in {-1, +1} and ``g = gamma / sqrt(var + eps)``:

    y_o = scale_o * sum_k s_ok x_k + offset_o,   scale_o = g_o H,   offset_o = g_o (bias_o - mean_o) + beta_o

so the per-channel ``scale`` is the only multiplication left. Folding is done in float64 and stored as
float32. A batch norm that does not directly follow a linear/conv layer becomes an ``affine`` layer.

Stochastic BinaryConnect: its test-time network uses the real-valued weights (the paper), which cannot
be packed; the export carries ``H * sign(W)`` (eq. 1 applied to the latent weights) and says so in
``source["stochastic_weights"]``. Its batch norms' statistics do not fit those weights:
``recalibrate_batch_norm`` recomputes them first (``binaryconnect export`` does, by default, for such a run).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import BinaryConnectError
from ..layers import BinaryConv2d, BinaryLinear, binary_layers
from .format import PackedNetwork
from .pack import pack_signs

SKIPPED = (nn.Identity, nn.Dropout)
SUPPORTED = "Flatten, BinaryLinear/Linear, BinaryConv2d/Conv2d, BatchNorm1d/2d, ReLU, MaxPool2d, Identity, Dropout"


class ExportError(BinaryConnectError):
    """A model that cannot be exported: an unsupported layer or a forward that is not sequential."""


def _leaves(module: nn.Module):
    children = list(module.children())
    if not children:
        yield module
        return
    for child in children:
        yield from _leaves(child)


def _two(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _weight_layer(module: nn.Module, index: int, tensors: dict) -> dict:
    p = f"layers.{index}."
    binary = isinstance(module, (BinaryLinear, BinaryConv2d)) and module.binarization != "none"
    binarization = module.binarization if isinstance(module, (BinaryLinear, BinaryConv2d)) else "none"
    H = float(module.H) if binary else None
    w = module.weight.detach().to(torch.float64).cpu()
    out = w.shape[0]
    if binary:
        tensors[p + "weight_bits"] = pack_signs(w)
        scale = torch.full((out,), H, dtype=torch.float64)
    else:
        tensors[p + "weight"] = w.to(torch.float32).contiguous()
        scale = torch.ones(out, dtype=torch.float64)
    bias = torch.zeros(out, dtype=torch.float64)
    if module.bias is not None:
        bias = module.bias.detach().to(torch.float64).cpu()
    tensors[p + "scale"], tensors[p + "offset"] = scale, bias  # float64 until the end (folding)
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "binary": binary, "binarization": binarization, "H": H}
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ExportError(f"cannot export {module}: only groups=1 and padding_mode='zeros' are supported")
    if isinstance(module.padding, str):
        if module.padding == "valid":
            padding = [0, 0]
        else:  # "same" (stride 1): symmetric when dilation * (kernel - 1) is even
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise ExportError(f"cannot export {module}: padding='same' is asymmetric here")
            padding = [t // 2 for t in total]
    else:
        padding = _two(module.padding)
    return {"type": "conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": _two(module.kernel_size), "stride": _two(module.stride), "padding": padding,
            "dilation": _two(module.dilation), "binary": binary, "binarization": binarization, "H": H}


def _batchnorm(module: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, b)`` with ``BN(a) = g a + b`` in eval mode, float64."""
    if module.running_mean is None or module.running_var is None:
        raise ExportError(f"cannot export {module}: it has no running statistics (track_running_stats=False)")
    var = module.running_var.detach().to(torch.float64).cpu()
    mean = module.running_mean.detach().to(torch.float64).cpu()
    g = 1.0 / torch.sqrt(var + module.eps)
    b = -mean * g
    if module.weight is not None:
        gamma = module.weight.detach().to(torch.float64).cpu()
        beta = module.bias.detach().to(torch.float64).cpu()
        g, b = g * gamma, b * gamma + beta
    return g, b


def packed_layers(model: nn.Module) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The ``architecture`` list and tensors of ``model`` (BN folded, binary weights packed)."""
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    foldable = False  # the previous layer is linear/conv with no batch norm folded into it yet
    for module in _leaves(model):
        i = len(layers)
        if isinstance(module, SKIPPED):
            continue
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ExportError(f"cannot export {module}: only Flatten(start_dim=1, end_dim=-1) is supported")
            layers.append({"type": "flatten"})
            foldable = False
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            layers.append(_weight_layer(module, i, tensors))
            foldable = True
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            g, b = _batchnorm(module)
            prev = layers[-1] if layers else None
            channels = prev and (prev.get("out_features") or prev.get("out_channels"))
            if foldable and channels == module.num_features:
                j = i - 1
                scale, offset = tensors[f"layers.{j}.scale"], tensors[f"layers.{j}.offset"]
                tensors[f"layers.{j}.scale"], tensors[f"layers.{j}.offset"] = g * scale, g * offset + b
                foldable = False
            else:
                layers.append({"type": "affine", "channels": module.num_features})
                tensors[f"layers.{i}.scale"], tensors[f"layers.{i}.offset"] = g, b
                foldable = False
        elif isinstance(module, nn.ReLU):
            layers.append({"type": "relu"})
        elif isinstance(module, nn.MaxPool2d):
            if module.ceil_mode or module.return_indices or _two(module.dilation) != [1, 1]:
                raise ExportError(f"cannot export {module}: ceil_mode, return_indices and dilation are not supported")
            layers.append({"type": "maxpool2d", "kernel_size": _two(module.kernel_size),
                           "stride": _two(module.stride if module.stride is not None else module.kernel_size),
                           "padding": _two(module.padding)})
            foldable = False
        else:
            raise ExportError(f"cannot export layer {type(module).__name__} ({module}); supported: {SUPPORTED}")
        # a ReLU between a layer and its batch norm would make folding wrong
        if layers and layers[-1]["type"] == "relu":
            foldable = False
    for name, t in tensors.items():
        if t.dtype == torch.float64:
            tensors[name] = t.to(torch.float32).contiguous()
    return layers, tensors


def _deterministic_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose stochastic layers use ``H * sign(W)`` (what is exported)."""
    import copy

    twin = copy.deepcopy(model).eval()
    for m in binary_layers(twin):
        if m.binarization == "stochastic":
            m.binarization = "deterministic"
    return twin


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x: torch.Tensor, batches: int, batch_size: int,
                           seed: int = 0) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode, on the CPU) whose batch norms' running statistics are recomputed for the
    weights that are exported: ``H * sign(W)`` in every binary layer, stochastic ones included. Return it and
    the number of examples used.

    The statistics a model carries were accumulated during training, for the weights it had then; a
    stochastic model's are those of sampled binary weights, or of the real-valued W, not those of
    ``H * sign(W)``. Here the copy runs ``batches`` batches of ``batch_size`` examples of ``x`` (its
    training inputs; a seeded random order, each example at most once) with only the batch norms in
    training mode, and each batch norm keeps the average of its batch statistics (``momentum=None``)."""
    import copy

    if batches < 1 or batch_size < 2:
        raise ExportError(f"recalibration needs at least one batch of at least 2 examples, got {batches} "
                          f"batches of {batch_size}")
    result = copy.deepcopy(model).to("cpu", torch.float32).eval()
    norms = [m for m in result.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ExportError("the model has no batch norm whose statistics could be recomputed")
    if not all(m.track_running_stats for m in norms):
        raise ExportError("a batch norm of the model keeps no running statistics (track_running_stats=False)")
    stochastic = [m for m in binary_layers(result) if m.binarization == "stochastic"]
    for m in stochastic:
        m.binarization = "deterministic"  # as exported (in eval mode a stochastic layer would use the real W)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    n = min(len(x), batches * batch_size)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    used = 0
    for i in range(0, n, batch_size):
        rows = order[i:i + batch_size]
        if len(rows) < 2:  # a batch of one has no variance
            break
        result(x[rows].to("cpu", torch.float32))
        used += len(rows)
    for m in stochastic:
        m.binarization = "stochastic"
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return result.eval(), used


@torch.no_grad()
def check_export(model: nn.Module, net: PackedNetwork, n: int = 8, seed: int = 0, rtol: float = 1e-3) -> float:
    """Max |packed - model| / max(1, max |model|) on ``n`` random inputs (torch fallback engine); raise
    ExportError above ``rtol``: the model's forward is then not the sequence of its leaf modules."""
    from .engine import PackedModel

    twin = _deterministic_twin(model).to("cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *net.input_shape, generator=g)
    ref = twin(x).float()
    if tuple(ref.shape) != (n, net.num_classes):
        raise ExportError(f"the model outputs shape {list(ref.shape)}, not [batch, {net.num_classes}]")
    out = PackedModel(net, engine="torch")(x)
    err = float((out - ref).abs().max() / max(1.0, float(ref.abs().max())))
    if not err <= rtol:
        raise ExportError(f"the exported network disagrees with the model (relative error {err:.2e}): is the "
                          "model's forward exactly the sequence of its layers (nn.Sequential style)?")
    return err


def export_model(model: nn.Module, input_shape, num_classes: int | None = None, source: dict | None = None,
                 config: dict | None = None, check: bool = True) -> PackedNetwork:
    """Pack ``model`` (any device, in any mode: it is read in eval mode) for inputs of ``input_shape``."""
    layers, tensors = packed_layers(model)
    if not layers:
        raise ExportError("the model has no layers to export")
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes is None:
        last = next((la for la in reversed(layers) if la["type"] in ("linear", "conv2d")), None)
        num_classes = last.get("out_features") if last else None
        if num_classes is None:
            raise ExportError("pass num_classes: the model does not end with a linear layer")
    binarizations = sorted({la["binarization"] for la in layers if la["type"] in ("linear", "conv2d")})
    source = {"exported_by": f"binaryconnect {__version__}", "binarizations": binarizations, **(source or {})}
    if "stochastic" in binarizations:
        source["stochastic_weights"] = ("H * sign(W): the binary weights eq. (1) gives the latent weights; the "
                                        "paper's test-time network uses the real-valued W, which cannot be packed")
    net = PackedNetwork(layers, tensors, input_shape, int(num_classes), source, config)
    try:
        net.validate("exported model")
    except BinaryConnectError as exc:
        raise ExportError(str(exc)) from None
    if check:
        check_export(model, net)
    return net


def export_run(path: str | Path) -> PackedNetwork:
    """Export the best model of a run directory (or its model.safetensors)."""
    from ..train import load_run_with_metadata

    return export_loaded_run(path, *load_run_with_metadata(path))


def export_loaded_run(path: str | Path, model: nn.Module, config, meta: dict[str, str],
                      recalibrated: dict | None = None) -> PackedNetwork:
    """``export_run`` of a run already loaded by ``train.load_run_with_metadata(path)``; ``recalibrated``: how
    ``model``'s batch-norm statistics were recomputed (``recalibrate_batch_norm``), for the file's metadata."""
    path = Path(path)
    input_shape = json.loads(meta["input_shape"])
    num_classes = int(meta["num_classes"])
    source = {"run": str(path), "model": config.model, "model_kwargs": config.model_kwargs,
              "dataset": config.dataset, "dataset_kwargs": config.dataset_kwargs, "val_size": config.val_size,
              "binarization": config.binarization, "recipe": config.recipe, "seed": config.seed,
              "epoch": meta.get("epoch"), "working_dir": meta.get("working_dir") or None,
              "data_fingerprint": meta.get("data_fingerprint") or None}
    if recalibrated:
        source["batch_norm_recalibrated"] = recalibrated
    return export_model(model, input_shape, num_classes, source=source, config=config.to_dict())
