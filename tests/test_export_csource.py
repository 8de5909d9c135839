"""The C99 source export (``export/csource.py``): compiled with the machine's C compiler, warnings as
errors, and run on inputs; its logits against the eval-mode PyTorch model in float64, to the bound
``test_export_convert.py`` holds the packed engines to; its predictions equal to the packed model's."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from binaryconnect.cli import main
from binaryconnect.data import load_dataset
from binaryconnect.errors import ConfigError
from binaryconnect.export import PackedModel, csource, export_model, load_packed
from binaryconnect.export.csource import c_source, check_name, write_c_source
from binaryconnect.export.format import layer_shapes
from binaryconnect.layers import BinaryConv2d, BinaryLinear
from binaryconnect.models import create_model
from test_export_convert import _mixed_convnet, _small_convnet, _tolerance, calibrate

#: Strict: the generated code must compile cleanly for users who build with warnings as errors (-O3: gcc's
#: loop analyses warn there, not at -O2).
CFLAGS = ["-std=c99", "-O3", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion", "-Werror"]

HARNESS = r"""
#include <stdio.h>
#include <string.h>
#include "NAME.h"

/* Reads examples (float32) from stdin; writes per example its logits, the logits computed with the
   caller's scratch memory, and the predicted class (as a float; -1 if the scratch memory overflowed). */
int main(void)
{
    static float input[NAME_U_INPUT_SIZE], logits[NAME_U_NUM_CLASSES], again[NAME_U_NUM_CLASSES];
    static float scratch[NAME_U_SCRATCH_FLOATS + 64];  /* 64 guard floats: never written */
    float predicted;
    int i;
    for (i = 0; i < 64; ++i)
        scratch[NAME_U_SCRATCH_FLOATS + i] = 12345.0f;
    while (fread(input, sizeof(float), NAME_U_INPUT_SIZE, stdin) == NAME_U_INPUT_SIZE) {
        NAME_logits(input, logits);
        NAME_logits_scratch(input, again, scratch);
        predicted = (float)NAME_predict(input);
        for (i = 0; i < 64; ++i)
            if (scratch[NAME_U_SCRATCH_FLOATS + i] != 12345.0f)
                predicted = -1.0f;  /* the network wrote past the scratch memory it declares */
        fwrite(logits, sizeof(float), NAME_U_NUM_CLASSES, stdout);
        fwrite(again, sizeof(float), NAME_U_NUM_CLASSES, stdout);
        fwrite(&predicted, sizeof(float), 1, stdout);
    }
    return 0;
}
"""


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler (cc, gcc or clang on PATH, or $CC): the C export is tested by compiling it")
    return cc


def build(net, folder, name="net", **options) -> str:
    """Write ``net`` as C into ``folder`` (``options``: write_c_source's), compile it with the harness,
    return the program's path."""
    write_c_source(net, folder, name, **options)
    (folder / "main.c").write_text(HARNESS.replace("NAME_U", name.upper()).replace("NAME", name))
    program = folder / "run"
    result = subprocess.run([compiler(), *CFLAGS, "-o", str(program), str(folder / "main.c"),
                             str(folder / f"{name}.c")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return str(program)


def run_c(program: str, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, logits with the caller's scratch, predicted classes) of the compiled network on ``x``."""
    out = subprocess.run([program], input=x.to(torch.float32).contiguous().numpy().tobytes(), capture_output=True,
                         check=True).stdout
    rows = torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(len(x), 2 * num_classes + 1)
    return rows[:, :num_classes], rows[:, num_classes:2 * num_classes], rows[:, -1].long()


def check_c(model: nn.Module, net, x: torch.Tensor, folder, **options) -> torch.Tensor:
    logits, again, predicted = run_c(build(net, folder, **options), x, net.num_classes)
    ref64 = model.double()(x.double()).detach()
    model.float()
    err = (logits.double() - ref64).abs().max().item()
    assert err <= _tolerance(ref64), f"error {err:.3g} > {_tolerance(ref64):.3g}"
    assert torch.equal(logits, again)  # the static and the caller's scratch compute the same
    assert torch.equal(predicted, logits.argmax(1))
    assert torch.equal(predicted, PackedModel(net, engine="torch").predict(x))
    return logits


def _strided_net() -> nn.Sequential:
    """Geometry the paper's networks lack: stride 2, dilation 2, an odd fan-in (27: a partial byte),
    padded 3x3 pooling with stride 2, a ReLU that follows a pooling, a float first layer."""
    return nn.Sequential(
        nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
        BinaryConv2d(5, 7, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(7),
        nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), BinaryLinear(7 * 4 * 4, 9), nn.BatchNorm1d(9), nn.ReLU(), BinaryLinear(9, 4), nn.BatchNorm1d(4))


def _lenet() -> nn.Sequential:
    """5x5 convolutions padded by 2 on 14x14 planes: the stride-1 run of additions is 248 long, a multiple of
    8, where a loop bound written `i + 8 <= n` made gcc -O3 warn of undefined behaviour."""
    return nn.Sequential(
        BinaryConv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        BinaryConv2d(6, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), BinaryLinear(8 * 7 * 7, 10), nn.BatchNorm1d(10))


@pytest.mark.parametrize("table_floats", [None, 25087], ids=["byte-tables", "half-byte-tables"])
def test_the_paper_mlp_in_c_matches_the_eval_model(table_floats, tmp_path):
    """Binary linear layers add one entry of 256 signed sums per byte of weights where those tables fit the
    budget (the 784 inputs' take 98 x 256 = 25,088 floats), else one of 16 per half-byte."""
    model = calibrate(create_model("mlp", hidden=256), torch.rand(512, 1, 28, 28) * 2 - 1)
    net = export_model(model, (1, 28, 28))
    options = {} if table_floats is None else {"table_floats": table_floats}
    _, source, _, scratch = c_source(net, "net", **options)
    calls = source.split("bcnn_linear(")[2:]  # after the function's own definition
    flags = [call.split(");")[0].split(", ")[-2] for call in calls]  # its `bytes` argument
    assert flags == (["1", "1", "1", "1"] if table_floats is None else ["0", "1", "1", "1"])
    # the largest tables (784 inputs: 98 x 256 floats; else those of 256 inputs, 32 x 256) and two activations
    assert scratch == (256 * 98 if table_floats is None else 256 * 32) + 2 * 256
    check_c(model, net, torch.rand(20, 1, 28, 28) * 2 - 1, tmp_path, **options)


@pytest.mark.parametrize("make, shape", [(lambda: _small_convnet(True), (3, 16, 16)),
                                         (lambda: _small_convnet(False), (3, 16, 16)),
                                         (_mixed_convnet, (3, 10, 10)), (_strided_net, (3, 15, 15)),
                                         (_lenet, (1, 28, 28))],
                         ids=["bn-after-pool", "bn-before-pool", "mixed-binary-float", "strided-dilated", "lenet"])
def test_convnets_in_c_match_the_eval_model(make, shape, tmp_path):
    model = calibrate(make(), torch.randn(256, *shape))
    net = export_model(model, shape)
    check_c(model, net, torch.randn(12, *shape), tmp_path)


def _table_net() -> nn.Sequential:
    """Binary stride-1 convolutions (the table of signed sums over groups of 4 input channels) on a
    non-square 11x13 image: 3 and 6 and 9 input channels (a partial last group), dilation 2 padded by 2, a
    1x3 kernel and a 1x1 kernel (other bit windows than 3x3), more than one group of 4 with 3x3 (several
    64-bit windows, the last reading fewer than 8 bytes of its row)."""
    return nn.Sequential(
        BinaryConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        BinaryConv2d(6, 9, 3, padding=2, dilation=2), nn.BatchNorm2d(9), nn.ReLU(),
        BinaryConv2d(9, 5, (1, 3), padding=(0, 1)), nn.BatchNorm2d(5), nn.ReLU(),
        BinaryConv2d(5, 4, 1), nn.BatchNorm2d(4),
        nn.Flatten(), BinaryLinear(4 * 11 * 13, 10), nn.BatchNorm1d(10))


@pytest.mark.parametrize("table_floats", [None, 1500], ids=["whole-image", "bands-of-rows"])
def test_binary_stride_1_convolutions_in_c_match_the_eval_model(table_floats, tmp_path, capsys):
    """With the default table budget each layer's table covers the whole image; with 1,500 floats the
    layers run in bands of 10, 1, 2 and 6 output rows (of 11: the last band shorter), the table rebuilt for
    each band's input rows, and the working memory shrinks."""
    from binaryconnect.export.csource import TABLE_FLOATS, _conv_work, c_source
    model = calibrate(_table_net(), torch.randn(256, 3, 11, 13))
    net = export_model(model, (3, 11, 13))
    options = {} if table_floats is None else {"table_floats": table_floats}
    bands = [_conv_work(layer, layer["in_channels"], 11, 13, 11, **options)[0] for layer in net.layers
             if layer["type"] == "conv2d"]
    assert bands == ([11] * 4 if table_floats is None else [10, 1, 2, 6])
    if table_floats is not None:
        assert c_source(net, "net", table_floats)[3] < c_source(net, "net", TABLE_FLOATS)[3]
        net.save(tmp_path / "m.bcnn")  # the command line's option
        for given in (["--table-floats", str(table_floats)], []):
            assert main(["export-c", str(tmp_path / "m.bcnn"), "-o", str(tmp_path / "cli"), "--json", "--force",
                         *given]) == 0
            written = json.loads(capsys.readouterr().out)
            assert written["scratch_bytes"] == 4 * c_source(net, "bcnn_model", table_floats if given else
                                                            TABLE_FLOATS)[3]
    check_c(model, net, torch.randn(12, 3, 11, 13), tmp_path, **options)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(BinaryConv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten()), (6, 5, 5)),
    (lambda: nn.Sequential(nn.Flatten(), BinaryLinear(30, 5), nn.BatchNorm1d(5)), (30,))], ids=["conv", "linear"])
def test_infinite_inputs_give_pytorchs_infinities(make, shape, tmp_path):
    """A binary layer's table of signed sums adds each entry's own terms: an infinite input gives the +-inf
    float32 PyTorch gives, not inf - inf = NaN (as a table built by doubling did), and an input above half
    the largest float does not overflow."""
    model = calibrate(make(), torch.randn(256, *shape))
    net = export_model(model, shape, num_classes=model(torch.zeros(1, *shape)).shape[1])
    x = torch.randn(4, *shape)
    x.view(4, -1)[0, 17] = float("inf")
    x.view(4, -1)[1, 3] = -float("inf")
    x.view(4, -1)[2, 11] = 3e38
    logits, _, _ = run_c(build(net, tmp_path), x, net.num_classes)
    with torch.inference_mode():
        ref = model.eval()(x)
    assert not ref.isnan().any() and ref[:2].isinf().any(dim=1).all() and ref[2:].isfinite().all()
    assert torch.equal(logits.isfinite(), ref.isfinite())
    assert torch.equal(logits[logits.isinf()], ref[ref.isinf()])


def test_max_pooling_propagates_nan_as_pytorch_does(tmp_path):
    """A NaN anywhere in a pooling window is that window's maximum (PyTorch's max_pool2d), not only when
    it comes first; the logits after it are NaN where float32 PyTorch's are (the packed model refuses a NaN
    input: test_export_kernels.py)."""
    model = calibrate(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), BinaryLinear(4, 3), nn.BatchNorm1d(3)),
                      torch.randn(32, 2, 4, 2))
    net = export_model(model, (2, 4, 2))
    x = torch.randn(3, 2, 4, 2)
    x[0, 0, 1, 1] = float("nan")  # last in its window
    x[1, 1, 2, 0] = float("nan")  # first in its window
    logits, _, _ = run_c(build(net, tmp_path), x, 3)
    with torch.inference_mode():
        reference = model.eval()(x)
    assert torch.equal(logits.isnan(), reference.isnan()) and reference[:2].isnan().all()
    torch.testing.assert_close(logits[2], reference[2], rtol=1e-5, atol=1e-5)


def test_a_network_of_one_flatten_layer_compiles_cleanly(tmp_path):
    """No compute layer: the output is the input; no scratch variable is declared unused."""
    net = export_model(nn.Sequential(nn.Flatten()), (2, 5), num_classes=10)
    x = torch.randn(4, 2, 5)
    logits, _, predicted = run_c(build(net, tmp_path), x, 10)
    assert torch.equal(logits, x.reshape(4, 10)) and torch.equal(predicted, x.reshape(4, 10).argmax(1))


def test_32_bit_targets_compile_without_warnings(tmp_path):
    """Where long is 32 bits (Cortex-M, i386) the usual arithmetic conversions differ: compiled (not linked:
    the source includes no system header, so no 32-bit C library is needed) with -m32 and the strict flags,
    for a binary linear, a binary convolution and pooling."""
    cc = compiler()
    probe = tmp_path / "probe.c"
    probe.write_text("int probe(void) { return 0; }\n")
    if subprocess.run([cc, "-m32", "-c", "-o", str(tmp_path / "probe.o"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cc} cannot compile for 32-bit x86")
    model = calibrate(_strided_net(), torch.randn(64, 3, 15, 15))
    write_c_source(export_model(model, (3, 15, 15)), tmp_path, "net")
    result = subprocess.run([cc, "-m32", *CFLAGS, "-c", "-o", str(tmp_path / "net.o"), str(tmp_path / "net.c")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_constants_are_the_packed_files_tensors(tmp_path):
    """Every tensor of the packed network is an array of the source, value for value (hexadecimal float
    literals are exact), and the reported constant bytes are the file's tensor bytes."""
    model = calibrate(_strided_net(), torch.randn(64, 3, 15, 15))
    net = export_model(model, (3, 15, 15))
    header, source, const_bytes, scratch = c_source(net, "m")
    assert const_bytes == sum(t.numel() * t.element_size() for t in net.tensors.values())
    assert f"#define M_CONST_BYTES {const_bytes}" in header and f"#define M_SCRATCH_FLOATS {scratch}" in header
    for key, tensor in net.tensors.items():
        _, i, name = key.split(".", 2)
        body = source.split(f"m_l{i}_{name}[{tensor.numel()}] = {{", 1)[1].split("};", 1)[0]
        values = [v.strip() for v in body.split(",")]
        if tensor.dtype == torch.uint8:
            assert [int(v, 16) for v in values] == tensor.flatten().tolist()
        else:
            assert [float.fromhex(v[:-1]) for v in values] == tensor.flatten().tolist()
    biggest = max(int(np.prod(out)) for _, out in layer_shapes(net.layers, net.input_shape))
    assert scratch >= 2 * biggest  # two activation buffers at least (that it is enough: the harness's guard)


def test_a_trained_mnist_run_exported_to_c_agrees_with_the_packed_file(tmp_path, data_root, capsys):
    """The command line end to end on a real MNIST run: `export`, then `export-c` of the .bcnn; the
    compiled program predicts what the packed model predicts on 500 test images."""
    run = tmp_path / "run"
    assert main(["train", "mnist-deterministic", "--data-dir", str(data_root), "-o", str(run), "--train-subset",
                 "2000", "--hidden", "64", "--epochs", "1", "--device", "cpu", "--no-progress", "-q"]) == 0
    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "c"
    assert main(["export-c", str(run / "model.bcnn"), "-o", str(out), "--name", "mnist_bc", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["header"] == str(out / "mnist_bc.h") and result["source"] == str(out / "mnist_bc.c")
    packed = load_packed(run / "model.bcnn", engine="torch")
    assert result["const_bytes"] == sum(t.numel() * t.element_size() for t in packed.net.tensors.values())
    x = load_dataset("mnist", data_root, download=False).test_x[:500]
    (out / "main.c").write_text(HARNESS.replace("NAME_U", "MNIST_BC").replace("NAME", "mnist_bc"))
    subprocess.run([compiler(), *CFLAGS, "-o", str(out / "run"), str(out / "main.c"), str(out / "mnist_bc.c")],
                   check=True)
    logits, _, predicted = run_c(str(out / "run"), x, 10)
    assert torch.equal(predicted, packed.predict(x))
    torch.testing.assert_close(logits, packed(x), rtol=1e-4, atol=1e-4)


def test_export_c_refuses_bad_names_existing_files_and_non_packed_inputs(tmp_path, capsys):
    for bad in ("9lives", "my-net", "_STDIO", "__", "", "x" * 64):
        with pytest.raises(ConfigError, match="must be a C identifier"):
            check_name(bad)
    model = calibrate(nn.Sequential(nn.Flatten(), BinaryLinear(6, 3), nn.BatchNorm1d(3)), torch.randn(32, 6))
    net = export_model(model, (6,))
    write_c_source(net, tmp_path / "c", "net")
    before = (tmp_path / "c" / "net.c").read_bytes()
    with pytest.raises(ConfigError, match="net.c already exist; pass --force"):
        write_c_source(net, tmp_path / "c", "net")
    write_c_source(net, tmp_path / "c", "net", force=True)
    assert (tmp_path / "c" / "net.c").read_bytes() == before  # deterministic output
    net.save(tmp_path / "m.bcnn")
    assert main(["export-c", str(tmp_path / "m.bcnn"), "-o", str(tmp_path / "c"), "--name", "net"]) == 2
    assert "already exist; pass --force" in capsys.readouterr().err
    assert main(["export-c", str(tmp_path / "m.bcnn"), "-o", str(tmp_path / "c"), "--name", "my-net"]) == 2
    assert "must be a C identifier" in capsys.readouterr().err
    assert main(["export-c", str(tmp_path), "-o", str(tmp_path / "d")]) == 2
    assert "takes a packed .bcnn file" in capsys.readouterr().err
    assert main(["export-c", str(tmp_path / "missing.bcnn"), "-o", str(tmp_path / "d")]) == 2
    with pytest.raises(SystemExit):
        main(["export-c", str(tmp_path / "m.bcnn"), "-o", str(tmp_path / "d"), "--table-floats", "0"])
    assert "argument --table-floats: expected a positive integer, got '0'" in capsys.readouterr().err
    for bad in (0, 1500.0, True):
        with pytest.raises(ConfigError, match="table_floats must be a positive number"):
            write_c_source(net, tmp_path / "d", "net", table_floats=bad)
    assert not (tmp_path / "d").exists()


def test_the_table_floats_help_gives_the_default_the_exporter_takes(capsys):
    # the CLI writes the number out (importing csource when the parser is built would slow every command)
    with pytest.raises(SystemExit):
        main(["export-c", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {csource.TABLE_FLOATS}, {csource.TABLE_FLOATS * 4 // 2**20} MiB)" in help_text
