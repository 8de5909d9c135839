"""Drop-in binary layers: ``BinaryLinear`` for ``nn.Linear``, ``BinaryConv2d`` for ``nn.Conv2d``.

The latent real-valued weight W stays the parameter ``weight`` (so optimizers, ``state_dict`` and
tools that walk modules keep working). Every training forward pass computes the binary weight
``Wb = binarize(W)`` and propagates with it; the gradient reaches W through the straight-through
estimator (``binarize.binarize_ste``). At test time (``module.eval()``):

- ``deterministic`` uses the binary weights (the paper);
- ``stochastic`` uses the real-valued weights (``stochastic_eval="real"``, the paper's choice), or one
  fresh sample of binary weights (``stochastic_eval="sample"``);
- ``none`` is an ordinary float layer (the paper's "no regularizer" baseline).

Pitfall: the latent weights must be clipped to [-H, H] after each update, or they grow without bound
and stop responding to gradients (a weight at +50 needs 50 units of updates before its sign can flip).
``optim.make_optimizer`` installs that clipping; if you build your own optimizer, call
``optim.clip_latent_(model)`` after every ``optimizer.step()``.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import binarize_deterministic, binarize_ste, check_binarization, check_ste

STOCHASTIC_EVAL = ("real", "sample")


def fans(layer: nn.Module) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a linear or convolutional layer's weight, as Glorot & Bengio define them."""
    w = layer.weight
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def _autocast_dtype(w: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``w`` to for a convolution or matrix product, or None outside autocast, for a
    weight autocast leaves alone (float64: autocast casts only float32, float16 and bfloat16 tensors) and with
    a torch before 2.4 (whose autocast queries differ: the weight is then cast by autocast itself)."""
    if torch.compiler.is_compiling():  # binarize_ste then takes its traced form, which ignores it (Inductor
        return None  # fuses the cast), and Dynamo need not trace the queries
    device_type = w.device.type
    try:
        if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):
        pass
    return None


class _BinaryMixin:
    """Shared state and behaviour of the binary layers."""

    weight: nn.Parameter
    binarization: str
    H: float
    ste: str
    stochastic_eval: str
    generator: torch.Generator | None

    def _init_binary(self, binarization: str, H: float, ste: str, stochastic_eval: str) -> None:
        if not H > 0:
            raise ValueError(f"H must be positive, got {H}")
        if stochastic_eval not in STOCHASTIC_EVAL:
            raise ValueError(
                f"unknown stochastic_eval {stochastic_eval!r}; choose one of {', '.join(STOCHASTIC_EVAL)}"
            )
        self.binarization = check_binarization(binarization)
        self.H = float(H)
        self.ste = check_ste(ste)
        self.stochastic_eval = stochastic_eval
        self.generator = None

    @property
    def is_binary(self) -> bool:
        """True when the weight is binarized during training (``deterministic`` or ``stochastic``)."""
        return self.binarization != "none"

    def reset_latent(self) -> None:
        """Initialise the weight as the original code does: a binarized layer's latent weight uniformly in
        [-H, H]; a float layer (``binarization="none"``) Glorot-uniform in [-a, a], a = sqrt(6 / (fan_in +
        fan_out)) (Lasagne's default, which the original code's float layers keep). Biases start at zero."""
        with torch.no_grad():
            if self.is_binary:
                bound = self.H
            else:
                fan_in, fan_out = fans(self)
                bound = math.sqrt(6.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0  # (an empty weight)
            self.weight.uniform_(-bound, bound)
            if getattr(self, "bias", None) is not None:
                self.bias.zero_()

    def effective_weight(self) -> torch.Tensor:
        """The weight this forward pass propagates with (binary, sampled binary, or real). Under autocast the
        binary weights come in autocast's dtype (the values its cast would give), ready for the convolution or
        matrix product, which autocast runs in that dtype."""
        mode = self.binarization
        if not self.training and mode == "stochastic" and self.stochastic_eval == "real":
            mode = "none"
        return binarize_ste(self.weight, mode, self.H, self.ste, self.generator, _autocast_dtype(self.weight))

    def binary_weight(self) -> torch.Tensor:
        """The deterministic binary weight ``+-H`` (eq. 1), detached. For a stochastic layer this is
        ``H * sign(W)``, the weight an exported stochastic model carries."""
        return binarize_deterministic(self.weight.detach(), self.H)

    def extra_repr(self) -> str:  # pragma: no cover - formatting only
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"binarization={self.binarization}, H={self.H}"
        if self.ste != "identity":
            extra += f", ste={self.ste}"
        if self.binarization == "stochastic":
            extra += f", stochastic_eval={self.stochastic_eval}"
        return f"{base}, {extra}"


class BinaryLinear(_BinaryMixin, nn.Linear):
    """``nn.Linear`` whose weight is binarized to +-H in forward and backward passes.

    Args: as ``nn.Linear`` (``bias`` defaults to False: in BinaryConnect a batch norm follows), plus
    ``binarization`` (``deterministic``, ``stochastic``, ``none``), ``H`` (the binary value, 1 in the
    paper), ``ste`` (``identity``: the paper; ``clipped``: zero gradient where |W| > H) and
    ``stochastic_eval`` (``real`` or ``sample``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        device=None,
        dtype=None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_binary(binarization, H, ste, stochastic_eval)
        self.reset_latent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is binarized to +-H in forward and backward passes.

    Args: as ``nn.Conv2d`` (``bias`` defaults to False), plus ``binarization``, ``H``, ``ste`` and
    ``stochastic_eval`` as in ``BinaryLinear``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        device=None,
        dtype=None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._init_binary(binarization, H, ste, stochastic_eval)
        self.reset_latent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


BINARY_LAYERS = (BinaryLinear, BinaryConv2d)


def binary_layers(model: nn.Module):
    """Yield every ``BinaryLinear``/``BinaryConv2d`` in ``model`` (binarized or not)."""
    for module in model.modules():
        if isinstance(module, BINARY_LAYERS):
            yield module


def set_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every stochastic layer of ``model`` draw its binary weights from ``generator``."""
    for layer in binary_layers(model):
        layer.generator = generator


def set_stochastic_eval(model: nn.Module, stochastic_eval: str) -> None:
    """Choose, for every stochastic layer, what eval mode propagates with: ``real`` or ``sample``."""
    if stochastic_eval not in STOCHASTIC_EVAL:
        raise ValueError(f"unknown stochastic_eval {stochastic_eval!r}; choose one of {', '.join(STOCHASTIC_EVAL)}")
    for layer in binary_layers(model):
        layer.stochastic_eval = stochastic_eval


#: What ``binarize_modules_`` replaces, by exact type.
_REPLACED = (nn.Linear, nn.Conv2d)
#: Names of the ways a layer's weight can be made other than as a plain parameter, for messages.
_NOT_PLAIN = ("a parametrization (torch.nn.utils.parametrizations.weight_norm, spectral_norm ...), pruning, the "
              "older torch.nn.utils.weight_norm / spectral_norm, or a lazy layer not run yet")
#: Modules that read their child layers' weights outside the children's ``forward``: PyTorch's fast path of
#: ``nn.TransformerEncoderLayer`` (inference without autograd) passes ``linear1.weight`` and ``linear2.weight``
#: to one fused kernel, where a binarized layer's latent float weight would be used as it is.
_READ_BY_PARENT = (nn.TransformerEncoderLayer,)
WEIGHT_INITS = ("keep", "reset")


def binarize_modules_(model: nn.Module, binarization: str = "deterministic", *, H: float = 1.0,
                      ste: str = "identity", stochastic_eval: str = "real", exclude=(),
                      weights: str = "keep") -> nn.Module:
    """Turn an existing network into a BinaryConnect one, in place: every ``nn.Linear`` and ``nn.Conv2d``
    of ``model`` not named in ``exclude`` (by a name ``model.named_modules()`` gives it, e.g. ``"features.0"``,
    ``"fc"``) becomes a ``BinaryLinear`` / ``BinaryConv2d`` with the same shape, options (stride, padding,
    dilation, groups, padding mode), bias, device, dtype, memory format, training mode and ``requires_grad``,
    and the given ``binarization``, ``H``, ``ste`` and ``stochastic_eval``. A layer used in several places
    stays one layer. Return ``model`` (the new layer when ``model`` is itself one of those layers: use the
    return value).

    ``weights``: ``keep`` (default) makes the latent weight the old weight clipped to [-H, H], for
    fine-tuning a trained float network (and draws no random numbers); ``reset`` initialises it as the
    paper does (uniform in [-H, H], bias zero). Hooks registered on a replaced layer (forward, backward,
    state-dict) move to the new one, and their handles still remove them; other attributes set on the old
    layer object do not.

    Refused with a ValueError naming the layers, before anything changes, where the result would silently
    not be BinaryConnect: a weight or bias tied to another module's (an output layer sharing its embedding's
    weight: binarizing one side unties them), a weight that is not a plain parameter (a parametrization such
    as weight norm, pruning, a lazy layer not run yet: what computes it would be dropped), and the linear
    layers of ``nn.TransformerEncoderLayer`` (PyTorch's inference fast path reads their weights directly).
    Exclude those layers to convert the rest.
    Only the exact types are replaced: a subclass may use its weight outside ``forward`` (as
    ``nn.MultiheadAttention``'s output projection does).

    The paper binarizes every layer, the first and the last included; a common variant keeps those in float
    (``exclude=["conv1", "fc"]`` for a torchvision ResNet). Then build the optimizer with
    ``optim.make_optimizer`` (or ``param_groups`` and ``clip_latent_``): the Glorot learning-rate scales
    and the clipping to [-H, H] after every step apply to the replaced layers, as to the paper's networks.
    """
    if weights not in WEIGHT_INITS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_INITS)}")
    _BinaryMixin()._init_binary(binarization, H, ste, stochastic_eval)  # bad options fail here, model untouched
    exclude = {exclude} if isinstance(exclude, str) else set(exclude)
    names: dict[int, list[str]] = {}  # each layer to consider, by id: all its names (a shared layer has several)
    layers: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _linear_or_conv(module):
            names.setdefault(id(module), []).append(name)
            layers[id(module)] = module
    unknown = sorted(exclude - {n for ns in names.values() for n in ns})
    if unknown:
        raise ValueError(f"exclude names no nn.Linear or nn.Conv2d of the model: {', '.join(map(repr, unknown))}; "
                         f"those it has: {', '.join(n for ns in names.values() for n in ns) or 'none'}")
    chosen = [key for key, ns in names.items() if not exclude.intersection(ns)]
    _refuse_what_would_not_be_binary(model, {key: layers[key] for key in chosen})
    options = dict(binarization=binarization, H=H, ste=ste, stochastic_eval=stochastic_eval)
    new = {key: _binary_copy(layers[key], options, weights) for key in chosen}
    if id(model) in new:
        return new[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # (named_children skips a second use)
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return model


def _linear_or_conv(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``nn.Conv2d``: of that exact type, or made one by a parametrization (its class is
    then a subclass PyTorch makes, ``ParametrizedLinear``) or to become one (an uninitialised lazy layer)."""
    kind = type(module)
    return (kind in _REPLACED or (nn.utils.parametrize.is_parametrized(module) and kind.__bases__[0] in _REPLACED)
            or getattr(module, "cls_to_become", None) in _REPLACED)


def _refuse_what_would_not_be_binary(model: nn.Module, chosen: dict[int, nn.Module]) -> None:
    """ValueError naming the ``chosen`` layers (by id) whose binarization would silently not take effect."""
    name_of = {id(m): name or "(the model itself)" for name, m in model.named_modules()}
    made = [name_of[key] for key, layer in chosen.items()
            if type(layer) not in _REPLACED or not isinstance(layer._parameters.get("weight"), nn.Parameter)]
    if made:
        raise ValueError(f"the weights of {', '.join(made)} are not plain parameters but made by {_NOT_PLAIN}; "
                         "binarizing would drop what makes them: remove it first (parametrize.remove_parametrizations, "
                         "prune.remove, remove_weight_norm, or one forward pass), or exclude them")
    holders: dict[int, list[str]] = {}  # parameter id -> the modules holding it (each module once)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(name_of[id(module)])
    tied = [f"{name_of[key]} (with {', '.join(n for n in holders[id(p)] if n != name_of[key])})"
            for key, layer in chosen.items() for p in (layer.weight, layer.bias)
            if p is not None and len(holders[id(p)]) > 1]
    if tied:
        raise ValueError(f"binarizing would untie the weights these layers share with other modules: "
                         f"{'; '.join(tied)}: exclude them")
    read = [f"{prefix}.{child}" if prefix else child
            for prefix, parent in model.named_modules() if isinstance(parent, _READ_BY_PARENT)
            for child, module in parent.named_children() if id(module) in chosen]
    if read:
        raise ValueError(f"the weights of {', '.join(read)} are read by the module holding them outside their "
                         "forward (nn.TransformerEncoderLayer's inference fast path), where a binarized layer's "
                         "latent float weight would be used as it is: exclude them")


def _binary_copy(module: nn.Module, options: dict, weights: str) -> nn.Module:
    """The binary layer that replaces ``module``, made on the meta device first (no random numbers drawn, no
    second copy of a weight that is copied anyway), then given storage where ``module``'s weight is."""
    w = module.weight
    common = dict(bias=module.bias is not None, device="meta", dtype=w.dtype, **options)
    if isinstance(module, nn.Conv2d):
        layer = BinaryConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, groups=module.groups,
                             padding_mode=module.padding_mode, **common)
    else:
        layer = BinaryLinear(module.in_features, module.out_features, **common)
    layer = layer.to_empty(device=w.device)
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        layer = layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        if weights == "keep":
            layer.weight.copy_(w.clamp(-layer.H, layer.H) if layer.is_binary else w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        else:
            layer.reset_latent()
    layer.weight.requires_grad_(w.requires_grad)
    if module.bias is not None:
        layer.bias.requires_grad_(module.bias.requires_grad)
    _move_hooks(module, layer)
    return layer.train(module.training)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s hooks (forward, pre-forward, backward, state-dict, load-state-dict) to ``new``: ``new``
    takes ``old``'s hook dictionaries themselves, so the handles that registered the hooks
    (``handle.remove()``) still reach them, and ``old`` gets empty ones, so that the two share nothing. A
    hook PyTorch calls with its module (load-state-dict pre-hooks, kept with a weak reference to it) is
    given ``new``: ``old`` may be gone when it runs."""
    for name in [n for n in vars(new) if "hook" in n and n in vars(old)]:
        value = old.__dict__[name]
        new.__dict__[name] = value
        if isinstance(value, dict):
            old.__dict__[name] = type(value)()
            for hook in value.values():
                module = getattr(hook, "module", None)
                if getattr(hook, "with_module", False) and isinstance(module, weakref.ref) and module() is old:
                    hook.module = weakref.ref(new)
