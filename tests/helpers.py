"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from binaryconnect.cli import main
from binaryconnect.config import recipe_config


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
