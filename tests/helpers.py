"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binaryconnect.cli import main
from binaryconnect.config import recipe_config

#: The marks of a test that needs CUDA: ``gpu`` (``pytest -m gpu`` runs those alone, on a GPU machine) and skipped
#: where there is no CUDA device.
NEEDS_CUDA = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


def needs_cuda(test):
    """Decorate ``test`` with ``NEEDS_CUDA``."""
    for mark in NEEDS_CUDA:
        test = mark(test)
    return test


#: The CPU, and a GPU where there is one (the GPU cases skipped without one).
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def small_config(**kw):
    """A small, fast MNIST configuration: 2,000 training images, a 2 x 64 MLP, 2 epochs, CPU."""
    base = dict(train_subset=2000, epochs=2, batch_size=100, device="cpu", model_kwargs={"hidden": 64, "depth": 2})
    return recipe_config("mnist-deterministic", **{**base, **kw})


def quiet(*args, **kwargs):
    """A ``log`` callback that prints nothing."""


def assert_one_line_error(argv, message, capsys):
    """``binaryconnect ARGV`` exits with code 2 and one stderr line containing ``message``, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit through SystemExit
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def png_bytes(value: int, size=(8, 8), seed=0) -> bytes:
    """A PNG file of random RGB pixels, the same for the same ``value`` and ``seed``."""
    rng = np.random.default_rng(value * 1000 + seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_image_tree(root: Path, classes=("cat", "dog", "emu"), n_train=6, n_test=2) -> Path:
    """An ImageFolder tree ``root/{train,test}/<class>/NNN.png`` of 8 x 8 images, each different."""
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                value = ci * 100 + i + (50 if split == "test" else 0)
                (root / split / c / f"{i:03d}.png").write_bytes(png_bytes(value))
    return root


def assert_same_training_state(a, b, opt_a, opt_b, exact=True, atol=0.0):
    """Models ``a`` and ``b`` (state dicts) and their optimizers' states equal: bit for bit, or within ``atol``."""
    check = (lambda u, v: torch.equal(u, v)) if exact else (lambda u, v: torch.allclose(u, v, atol=atol, rtol=0))
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert check(u.float(), v.float()), name
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        for key, value in opt_a.state[pa].items():
            assert check(value.float().cpu(), opt_b.state[pb][key].float().cpu()), key
