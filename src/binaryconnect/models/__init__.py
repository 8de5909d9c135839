"""Model registry: a name in configuration becomes a network through ``create_model``.

``create_model("mlp", binarization="stochastic")`` builds the paper's permutation-invariant MNIST MLP.
An unknown name raises a ValueError that lists the registered ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a model factory under ``name`` (snake_case)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def forward_options(factory: Callable, cls: type, computed: tuple[str, ...] = ()) -> None:
    """Give a ``factory(own..., **kwargs)`` that passes ``kwargs`` on to ``cls`` the signature of both: its own
    parameters and ``cls``'s (keyword-only), less those the factory ``computed`` itself; options are then
    checked by name before anything is built (``check_model_options``), and a TypeError the options cause
    inside is still reported as bad options (``create_model``)."""
    own = [p for p in inspect.signature(factory).parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in own} | set(computed)
    extra = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(cls).parameters.values()
             if p.name not in taken and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    factory.__signature__ = inspect.Signature(own + extra)
    factory.passes_options_on = True


def check_model_options(name: str, partial: bool = False, **kwargs) -> None:
    """Raise a ValueError unless model ``name`` is registered and takes every option of ``kwargs`` (by name:
    values are checked when the model is built), and, unless ``partial``, gets every one it requires; the
    message lists its options."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    signature = inspect.signature(factory)
    try:
        (signature.bind_partial if partial else signature.bind)(**kwargs)
    except TypeError as exc:
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            raise ValueError(f"bad options for model {name!r}: {exc}") from None
        unknown = sorted(set(kwargs) - set(signature.parameters))
        what = f"no option {', '.join(map(repr, unknown))}" if unknown else str(exc)
        raise ValueError(f"bad options for model {name!r}: {what}; its options: {', '.join(signature.parameters)}") \
            from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``; raise a clear error on an unknown name."""
    check_model_options(name, **kwargs)
    factory = _REGISTRY[name]
    signature = inspect.signature(factory)
    passes_on = (getattr(factory, "passes_options_on", False)
                 or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()))
    try:
        return factory(**kwargs)
    except TypeError as exc:  # options passed on (``**kwargs``) are checked only by what they are passed to;
        if not passes_on:  # otherwise an error inside the factory is its own, with its traceback
            raise
        raise ValueError(f"bad options for model {name!r}: {exc}") from exc


from . import convnet, mlp  # noqa: E402,F401  (registers the models)
