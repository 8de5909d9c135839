"""On real MNIST: a model trained here, exported, loaded and run gives the eval-mode model's predictions on
all 10,000 test images; and the export / predict / summary commands end to end."""

import json
import warnings

import numpy as np
import pytest
import torch

from binaryconnect.cli import main
from binaryconnect.config import TrainConfig
from binaryconnect.export import export_run, load_packed
from binaryconnect.export.tools import model_predictions
from binaryconnect.train import fit, load_run

pytestmark = pytest.mark.slow


def _train(tmp_path_factory, mnist, binarization: str, name: str, hidden: int = 256, depth: int = 2):
    run = tmp_path_factory.mktemp(name)
    config = TrainConfig(dataset="mnist", model="mlp", model_kwargs={"hidden": hidden, "depth": depth},
                         binarization=binarization, epochs=1, batch_size=100, train_subset=6000, seed=0,
                         device="cpu", lr_start=3e-3, lr_end=1e-3)
    summary = fit(config, run, progress=False, log=lambda *a, **k: None, data=mnist)
    return run, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist):
    return _train(tmp_path_factory, mnist, "deterministic", "det")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run, _ = trained
    path = tmp_path_factory.mktemp("bcnn") / "mlp.bcnn"
    export_run(run).save(path)
    return path


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_packed_predictions_equal_the_eval_model_on_the_test_set(trained, exported, mnist, engine):
    run, summary = trained
    model, _ = load_run(run)
    reference = model_predictions(model, mnist.test_x)
    packed = load_packed(exported, engine=engine)
    predictions = packed.predict(mnist.test_x)
    assert len(predictions) == 10_000
    assert torch.equal(predictions, reference), f"{int((predictions != reference).sum())} predictions differ"
    error = int((predictions != mnist.test_y).sum()) / len(mnist.test_y)
    assert error == pytest.approx(summary["test_error"], abs=1e-12)
    assert error < 0.2  # it did learn (chance is 0.9)


def test_cli_export_predict_summary(trained, exported, data_root, tmp_path, capsys):
    run, summary = trained
    out = tmp_path / "m.bcnn"
    assert main(["export", str(run), "-o", str(out), "--evaluate", "--data-dir", str(data_root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == out.stat().st_size
    assert result["agreement"] == 1.0
    assert result["packed_test_error"] == result["model_test_error"] == pytest.approx(summary["test_error"])
    assert result["compression"] > 20

    assert main(["export", str(run), "-o", str(out)]) == 2  # exists
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(out), "--force"]) == 0
    assert "smaller than the float32 parameters" in capsys.readouterr().out

    assert main(["summary", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["total"]["packed_bytes"] == table["file_bytes"] == out.stat().st_size
    assert sum(r["packed_bytes"] for r in table["rows"]) == out.stat().st_size
    assert main(["summary", str(run)]) == 0  # a run directory: exported in memory, same bytes
    text = capsys.readouterr().out
    assert f"would write {out.stat().st_size:,} bytes" in text and "100.00% of" in text

    assert main(["predict", str(out), "--data-dir", str(data_root), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["test_error"] == pytest.approx(summary["test_error"]) and pred["examples"] == 10_000

    x = np.random.default_rng(0).uniform(-1, 1, size=(7, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]) == 0
    logits = np.load(tmp_path / "y.npy", allow_pickle=False)
    expected = load_packed(out)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(logits, expected)
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--engine", "torch"]) == 0
    classes = [int(v) for v in capsys.readouterr().out.split()]
    assert classes == expected.argmax(1).tolist()


def test_cli_errors_are_one_line(exported, tmp_path, capsys):
    bad = tmp_path / "bad.bcnn"
    bad.write_bytes(exported.read_bytes()[:-10])
    assert main(["predict", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binaryconnect: error: ") and "is truncated" in err and err.count("\n") == 1
    assert main(["summary", str(tmp_path / "missing.bcnn")]) == 2
    assert "binaryconnect: error:" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 3), dtype=np.float32))
    assert main(["predict", str(exported), "--input", str(tmp_path / "x.npy")]) == 2
    assert "does not match the model's input shape [batch, 1, 28, 28]" in capsys.readouterr().err


def test_predict_and_export_refuse_to_lose_files_and_bad_arrays(trained, exported, tmp_path, capsys):
    from safetensors.numpy import save_file

    def one_line_error(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err

    run, _ = trained
    x = np.zeros((3, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "keep.npy").write_bytes(b"precious")
    predict = ["predict", str(exported), "--input", str(tmp_path / "x.npy"), "--output"]
    one_line_error([*predict, str(tmp_path / "keep.npy")], "keep.npy already exists; pass --force")
    assert (tmp_path / "keep.npy").read_bytes() == b"precious"
    one_line_error([*predict, str(tmp_path / "x.npy"), "--force"], "is the --input file")
    one_line_error([*predict, str(tmp_path / "out.txt")], "must end in .npy")
    assert main([*predict, str(tmp_path / "keep.npy"), "--force"]) == 0  # asked for: overwritten, whole
    assert np.load(tmp_path / "keep.npy").shape == (3, 10)
    (tmp_path / "blocker").write_text("a file")
    assert main([*predict, str(tmp_path / "blocker" / "out.npy")]) == 1  # an OS error: one line, exit 1
    err = capsys.readouterr().err
    assert "blocker" in err and "(check the path, its permissions and the free space)" in err
    assert err.count("\n") == 1 and "Traceback" not in err

    np.save(tmp_path / "big_endian.npy", x.astype(">f8"))  # any byte order and width NumPy reads is fine
    assert main(["predict", str(exported), "--input", str(tmp_path / "big_endian.npy")]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    bad = {"empty.npy": np.zeros((0, 1, 28, 28), np.float32), "nan.npy": np.where(x == 0, np.nan, x),
           "inf.npy": np.full_like(x, np.inf), "big.npy": np.full(x.shape, 1e300),
           "huge.npy": np.where(x == 0, 2e38, x),  # finite in float32, above half its largest
           "complex.npy": x.astype(np.complex64)}
    for name, array in bad.items():
        np.save(tmp_path / name, array)
    (tmp_path / "zero.npy").write_bytes(b"")
    save_file({"x": np.ones((3, 1, 28, 28), dtype=bool)}, str(tmp_path / "bool.safetensors"))
    for name, message in [("empty.npy", "holds no examples"), ("nan.npy", "NaN or infinite"),
                          ("inf.npy", "NaN or infinite"), ("big.npy", "beyond float32's range"),
                          ("huge.npy", "holds values beyond +-1.7e+38 (half float32's largest)"),
                          ("complex.npy", "not real numbers"), ("zero.npy", "is not a plain numeric .npy array"),
                          ("bool.safetensors", "holds torch.bool values, not real numbers")]:
        one_line_error(["predict", str(exported), "--input", str(tmp_path / name)], message)

    before = (run / "model.safetensors").read_bytes()
    for own in ("model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "config.json", "summary.json"):
        one_line_error(["export", str(run), "-o", str(run / own), "--force"], "must end in .bcnn")
    one_line_error(["export", str(run / "model.safetensors"), "-o", str(run / "checkpoint.safetensors"), "--force"],
                   "must end in .bcnn")
    assert (run / "model.safetensors").read_bytes() == before
    one_line_error(["export", str(run), "-o", str(tmp_path / "m.bcnn"), "--evaluate", "--data-dir",
                    str(tmp_path / "nowhere")], "MNIST not found")
    assert not (tmp_path / "m.bcnn").exists()  # the data are looked for before the file is written
    one_line_error(["predict", str(run)], f"{run} is a directory: predict takes a packed .bcnn file; make one")


def test_stochastic_run_reports_both_accuracies(tmp_path_factory, mnist, data_root, tmp_path, capsys):
    run, summary = _train(tmp_path_factory, mnist, "stochastic", "sto", hidden=64, depth=1)
    out = tmp_path / "s.bcnn"
    with pytest.warns(UserWarning, match="again without --recalibrate 0"):  # its statistics do not fit sign(W)
        assert main(["export", str(run), "-o", str(out), "--evaluate", "--data-dir", str(data_root),
                     "--recalibrate", "0"]) == 0
    text = capsys.readouterr().out
    assert "note: stochastic layers exported as H * sign(W)" in text
    # the paper's evaluation (real-valued weights) and the packed network's, side by side
    assert f"training model (eval mode) {100 * summary['test_error']:.2f}%, packed model " in text
    packed_error = float(text.split("packed model ")[1].split("%")[0]) / 100
    packed = load_packed(out).predict(mnist.test_x)
    assert packed_error == pytest.approx(int((packed != mnist.test_y).sum()) / 10_000, abs=5e-5)

    # --recalibrate: statistics for H * sign(W); the file says so; the packed model is the recalibrated one
    out2 = tmp_path / "r.bcnn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run), "-o", str(out2), "--evaluate", "--recalibrate", "20", "--data-dir",
                     str(data_root), "--json"]) == 0
    assert not [w for w in caught if "--recalibrate" in str(w.message)]
    result = json.loads(capsys.readouterr().out)
    assert result["recalibrated_examples"] == 20 * 100 and result["recalibrated_agreement"] == 1.0
    assert result["model_test_error"] == pytest.approx(summary["test_error"])
    recal = load_packed(out2)
    assert recal.net.source["batch_norm_recalibrated"] == {"examples": 2000, "batch_size": 100, "split": "train",
                                                            "seed": 0, "weights": "H * sign(W) in binary layers"}
    error = int((recal.predict(mnist.test_x) != mnist.test_y).sum()) / 10_000
    assert error == pytest.approx(result["packed_test_error"], abs=1e-12)
    assert error < packed_error  # for this stochastic model, recalibration helps the packed network

    # by default a stochastic run's export recalibrates, on 100 batches: 10,000 of MNIST's 50,000 training images
    out3 = tmp_path / "d.bcnn"
    assert main(["export", str(run), "-o", str(out3), "--data-dir", str(data_root)]) == 0
    assert "(100 batches, the default for a stochastic run; --recalibrate 0 skips it)" in capsys.readouterr().out
    assert load_packed(out3).net.source["batch_norm_recalibrated"]["examples"] == 10_000
    assert main(["summary", str(run)]) == 0  # the size of --recalibrate 0's file, said so
    assert f"`binaryconnect export --recalibrate 0` would write {out.stat().st_size:,} bytes" in capsys.readouterr().out
    # without the training data, the default is an error that says what to do, and writes nothing
    assert main(["export", str(run), "-o", str(tmp_path / "e.bcnn"), "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and "give --data-dir, or --recalibrate 0" in err and err.count("\n") == 1
    assert not (tmp_path / "e.bcnn").exists()
    # with --evaluate, which needs the data whatever the recalibration, the error does not offer --recalibrate 0
    assert main(["export", str(run), "-o", str(tmp_path / "e.bcnn"), "--evaluate", "--data-dir",
                 str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and "--recalibrate" not in err and err.count("\n") == 1
    assert not (tmp_path / "e.bcnn").exists()


def test_recalibrating_a_float_run_says_its_weights_are_the_float_ones(tmp_path_factory, mnist, data_root, tmp_path,
                                                                       capsys, monkeypatch):
    """Also: the data root is --data-dir, else $BINARYCONNECT_DATA (as for --evaluate), not the run's own
    data_dir, which may be gone (here: a folder that does not exist)."""
    run = tmp_path_factory.mktemp("float")
    config = TrainConfig(dataset="mnist", model="mlp", model_kwargs={"hidden": 32, "depth": 1}, binarization="none",
                         epochs=1, batch_size=100, train_subset=3000, seed=0, device="cpu",
                         data_dir=str(tmp_path / "gone"))
    fit(config, run, progress=False, log=lambda *a, **k: None, data=mnist)
    assert json.loads((run / "config.json").read_text())["config"]["data_dir"] == str(tmp_path / "gone")
    monkeypatch.setenv("BINARYCONNECT_DATA", str(data_root))
    out = tmp_path / "f.bcnn"
    assert main(["export", str(run), "-o", str(out), "--recalibrate", "5", "--evaluate"]) == 0
    text = capsys.readouterr().out
    assert "the model packed (W (no binary layer), recomputed statistics)" in text
    assert load_packed(out).net.source["batch_norm_recalibrated"]["weights"] == "W (no binary layer)"
