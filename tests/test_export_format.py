"""The .bcnn file: exact round trip, no pickle, and one clear error for every kind of malformed file."""

import json
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from binaryconnect.export import PackedFormatError, PackedNetwork, export_model, load_packed, read_packed
from binaryconnect.export.format import FORMAT, FORMAT_VERSION
from binaryconnect.layers import BinaryConv2d, BinaryLinear


def _small_net() -> PackedNetwork:
    model = nn.Sequential(
        BinaryConv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        BinaryLinear(4 * 3 * 3, 13), nn.BatchNorm1d(13), nn.ReLU(),
        BinaryLinear(13, 5, binarization="none"), nn.BatchNorm1d(5),
    ).eval()
    return export_model(model, (2, 6, 6))


@pytest.fixture()
def net() -> PackedNetwork:
    return _small_net()


def _bytes(tensors: dict, metadata: dict) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _load(data: bytes, tmp_path):
    path = tmp_path / "bad.bcnn"
    path.write_bytes(data)
    return read_packed(path)


def test_round_trip_is_exact(net, tmp_path):
    path = tmp_path / "m.bcnn"
    size = net.save(path)
    assert size == path.stat().st_size
    back = read_packed(path)
    assert back.layers == net.layers and back.input_shape == net.input_shape and back.num_classes == 5
    assert back.tensors.keys() == net.tensors.keys()
    for name, t in net.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    assert back.to_bytes() == path.read_bytes()  # deterministic bytes
    assert back.tensor(4, "weight_bits").dtype == torch.uint8 and back.tensor(6, "weight").dtype == torch.float32


def test_file_is_plain_safetensors(net, tmp_path):
    path = tmp_path / "m.bcnn"
    net.save(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert [la["type"] for la in json.loads(meta["architecture"])] == [
        "conv2d", "relu", "maxpool2d", "flatten", "linear", "relu", "linear"]
    assert header["layers.0.weight_bits"]["dtype"] == "U8" and header["layers.0.weight_bits"]["shape"] == [4, 3]
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert 8 + n + end == len(data)


def test_loading_never_unpickles(net, tmp_path, monkeypatch):
    path = tmp_path / "m.bcnn"
    net.save(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    model = load_packed(path, engine="torch")
    assert model(torch.randn(2, 2, 6, 6)).shape == (2, 5)


def test_a_pickle_file_is_refused(tmp_path):
    path = tmp_path / "m.bcnn"
    torch.save({"x": torch.zeros(3)}, path)
    with pytest.raises(PackedFormatError):
        read_packed(path)


def test_missing_file(tmp_path):
    with pytest.raises(PackedFormatError, match="does not exist"):
        read_packed(tmp_path / "nope.bcnn")


def test_truncated_files(net, tmp_path):
    data = net.to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (0, 5, 8, 8 + n // 2, 8 + n, 8 + n + 3, len(data) - 1):
        with pytest.raises(PackedFormatError, match="truncated|not a valid|corrupt"):
            _load(data[:cut], tmp_path)


def test_trailing_garbage_is_refused(net, tmp_path):
    with pytest.raises(PackedFormatError, match="16 bytes past the end of its tensors"):
        _load(net.to_bytes() + b"\0" * 16, tmp_path)


def test_unknown_version(net, tmp_path):
    meta = {**net.metadata(), "format_version": "2"}
    with pytest.raises(PackedFormatError, match="format version '2'; this binaryconnect reads version 1"):
        _load(_bytes(net.tensors, meta), tmp_path)


def test_other_safetensors_file_is_not_a_packed_model(net, tmp_path):
    with pytest.raises(PackedFormatError, match="is not a binaryconnect packed model"):
        _load(_bytes(net.tensors, {"format": "binaryconnect-model"}), tmp_path)


def test_missing_tensor(net, tmp_path):
    tensors = dict(net.tensors)
    del tensors["layers.4.scale"]
    with pytest.raises(PackedFormatError, match="missing tensors: layers.4.scale"):
        _load(_bytes(tensors, net.metadata()), tmp_path)


def test_extra_tensor(net, tmp_path):
    tensors = {**net.tensors, "layers.4.bias": torch.zeros(13)}
    with pytest.raises(PackedFormatError, match="unexpected tensors: layers.4.bias"):
        _load(_bytes(tensors, net.metadata()), tmp_path)


@pytest.mark.parametrize("name, bad, message", [
    ("layers.4.weight_bits", torch.zeros(13, 4, dtype=torch.uint8), "has shape \\[13, 4\\], expected \\[13, 5\\]"),
    ("layers.4.scale", torch.ones(12), "has shape \\[12\\], expected \\[13\\]"),
    ("layers.6.weight", torch.ones(5, 12), "has shape \\[5, 12\\], expected \\[5, 13\\]"),
    ("layers.4.scale", torch.ones(13, dtype=torch.float64), "dtype torch.float64, expected torch.float32"),
    ("layers.0.weight_bits", torch.zeros(4, 3, dtype=torch.int8), "dtype torch.int8, expected torch.uint8"),
])
def test_wrong_shapes_and_dtypes(net, tmp_path, name, bad, message):
    with pytest.raises(PackedFormatError, match=message):
        _load(_bytes({**net.tensors, name: bad}, net.metadata()), tmp_path)


@pytest.mark.parametrize("name", ["layers.0.scale", "layers.4.offset", "layers.6.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(net, tmp_path, name, value):
    bad = net.tensors[name].clone()
    bad.view(-1)[1] = value
    with pytest.raises(PackedFormatError, match=f"tensor {name} holds NaN or Inf"):
        _load(_bytes({**net.tensors, name: bad}, net.metadata()), tmp_path)


def test_nonzero_padding_bits(net, tmp_path):
    bits = net.tensors["layers.4.weight_bits"].clone()  # 36 inputs: 4 padding bits in the last byte
    bits[3, -1] |= 0x80
    with pytest.raises(PackedFormatError, match="nonzero padding bits"):
        _load(_bytes({**net.tensors, "layers.4.weight_bits": bits}, net.metadata()), tmp_path)


@pytest.mark.parametrize("k", range(1, 16))
def test_every_nonzero_padding_bit_is_refused(k, tmp_path):
    """A binary linear layer of k = 1..15 inputs: its rows end in 8 * ceil(k / 8) - k padding bits (bits k % 8 .. 7
    of the last byte). A file with any one of them set, in any row, is refused; the file as written (padding 0, and
    here every data bit 1, so that a check reaching into the data bits would refuse it too) loads."""
    out = 3
    model = BinaryLinear(k, out).eval()
    with torch.no_grad():
        model.weight.uniform_(0.1, 1.0)  # W >= 0 everywhere: every data bit is 1 (eq. 1)
    net = export_model(model, (k,))
    name = "layers.0.weight_bits"
    assert net.tensors[name].tolist() == [[0xFF] * (k // 8) + ([(1 << (k % 8)) - 1] if k % 8 else [])] * out
    _load(net.to_bytes(), tmp_path)
    for j in range(k % 8, 8) if k % 8 else ():
        for row in range(out):
            bits = net.tensors[name].clone()
            bits[row, -1] |= 1 << j
            with pytest.raises(PackedFormatError, match=f"tensor {name} has nonzero padding bits"):
                _load(_bytes({**net.tensors, name: bits}, net.metadata()), tmp_path)


@pytest.mark.parametrize("name, k", [("layers.0.weight_bits", 2 * 3 * 3), ("layers.4.weight_bits", 4 * 3 * 3)])
def test_each_padding_bit_of_a_conv_and_a_linear_layer_is_refused(net, tmp_path, name, k):
    """The fixture's conv (2 x 3 x 3 = 18 inputs per row: bits 2..7 of byte 2 are padding) and linear layer (36
    inputs: bits 4..7 of byte 4): each padding bit alone makes the file unloadable."""
    assert net.tensors[name].shape[-1] == (k + 7) // 8
    for j in range(k % 8, 8):
        bits = net.tensors[name].clone()
        bits[0, -1] |= 1 << j
        with pytest.raises(PackedFormatError, match=f"tensor {name} has nonzero padding bits"):
            _load(_bytes({**net.tensors, name: bits}, net.metadata()), tmp_path)


def _with_layers(net, edit):
    layers = json.loads(json.dumps(net.layers))
    edit(layers)
    return {**net.metadata(), "architecture": json.dumps(layers)}


@pytest.mark.parametrize("edit, message", [
    (lambda la: la[0].update(type="conv3d"), "layer 0 has unknown type 'conv3d'"),
    (lambda la: la[0].update(type=["conv2d"]), "layer 0 has unknown type \\['conv2d'\\]"),
    (lambda la: la[4].pop("in_features"), "layer 4 \\(linear\\) has missing keys \\['in_features'\\]"),
    (lambda la: la[4].update(bias=True), "unknown keys \\['bias'\\]"),
    (lambda la: la[0].update(stride=[0, 1]), "stride must be a list of two integers >= 1"),
    (lambda la: la[4].update(H=-1.0), "H must be a positive number"),
    (lambda la: la[0].update(in_channels=3), "layer 0 \\(conv2d\\) expects 3 input channels but receives 2"),
    (lambda la: la.pop(3), "layer 3 \\(linear\\) expects 36 input features but receives shape \\[4, 3, 3\\]"),
    (lambda la: la[2].update(kernel_size=[7, 7], padding=[0, 0]), "smaller than the kernel"),
])
def test_inconsistent_architecture(net, tmp_path, edit, message):
    with pytest.raises(PackedFormatError, match=message):
        _load(_bytes(net.tensors, _with_layers(net, edit)), tmp_path)


@pytest.mark.parametrize("index", [0, 4])
@pytest.mark.parametrize("h", [0, 0.0, -0.0, -1e-30, -2, float("nan"), float("inf"), float("-inf"), "1.0", None,
                               True, [1.0]])
def test_binary_layer_needs_a_positive_finite_number_h(net, tmp_path, index, h):
    """H of a binary layer (eq. 1: Wb = +-H) must be a finite number > 0: zero (either sign), negative numbers,
    NaN/Inf, strings, null, booleans and lists are refused, for a conv (layer 0) and a linear layer (layer 4)."""
    kind = net.layers[index]["type"]
    assert net.layers[index]["binary"] and net.layers[index]["H"] > 0
    message = re.escape(f"layer {index} ({kind}): H must be a positive number, got {h!r}")
    with pytest.raises(PackedFormatError, match=message):
        _load(_bytes(net.tensors, _with_layers(net, lambda la: la[index].update(H=h))), tmp_path)


def test_bad_metadata(net, tmp_path):
    with pytest.raises(PackedFormatError, match="unreadable metadata"):
        _load(_bytes(net.tensors, {**net.metadata(), "architecture": "[{"}), tmp_path)
    with pytest.raises(PackedFormatError, match="unreadable metadata"):
        meta = net.metadata()
        del meta["num_classes"]
        _load(_bytes(net.tensors, meta), tmp_path)
    with pytest.raises(PackedFormatError, match="the last layer outputs shape \\[5\\], not the 7 classes"):
        _load(_bytes(net.tensors, {**net.metadata(), "num_classes": "7"}), tmp_path)
    with pytest.raises(PackedFormatError, match="input_shape must be a list of positive integers"):
        _load(_bytes(net.tensors, {**net.metadata(), "input_shape": "[2, 0, 6]"}), tmp_path)


def test_no_pickle_in_the_export_package():
    from pathlib import Path

    import binaryconnect.export as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        for needle in ("import pickle", "torch.load(", "allow_pickle=True", "weights_only=False"):
            assert needle not in text, f"{path.name} uses {needle}"


def _numpy_reader(data: bytes):
    """A reader written from the README's byte-level description, with struct, json and NumPy only."""
    import numpy as np

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    assert meta["format"] == "binaryconnect-packed" and meta["format_version"] == "1"
    dtypes = {"U8": np.uint8, "F32": np.dtype("<f4")}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + begin:8 + n + end], dtype=dtypes[info["dtype"]])
        tensors[name] = raw.reshape(info["shape"]).astype(np.float64)
    layers = json.loads(meta["architecture"])

    def weights(i, layer, k):
        if not layer["binary"]:
            return tensors[f"layers.{i}.weight"].reshape(len(tensors[f"layers.{i}.scale"]), -1)
        packed = tensors[f"layers.{i}.weight_bits"].astype(np.uint8)
        bits = (packed[:, :, None] >> np.arange(8)) & 1  # bit j of byte g -> weight 8g + j
        return np.where(bits.reshape(packed.shape[0], -1)[:, :k] == 1, 1.0, -1.0)

    def forward(x):  # one example
        for i, layer in enumerate(layers):
            kind = layer["type"]
            if kind == "flatten":
                x = x.reshape(-1)
            elif kind == "relu":
                x = np.maximum(x, 0)
            elif kind == "affine":
                shape = (-1,) + (1,) * (x.ndim - 1)
                x = tensors[f"layers.{i}.scale"].reshape(shape) * x + tensors[f"layers.{i}.offset"].reshape(shape)
            elif kind == "linear":
                w = weights(i, layer, layer["in_features"])
                x = tensors[f"layers.{i}.scale"] * (w @ x) + tensors[f"layers.{i}.offset"]
            elif kind == "conv2d":
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (layer[k] for k in ("kernel_size", "stride", "padding",
                                                                             "dilation"))
                w = weights(i, layer, layer["in_channels"] * kh * kw).reshape(-1, layer["in_channels"], kh, kw)
                xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
                oh = (x.shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
                ow = (x.shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
                y = np.zeros((w.shape[0], oh, ow))
                for dy in range(kh):
                    for dx in range(kw):
                        patch = xp[:, dy * dh:dy * dh + sh * (oh - 1) + 1:sh, dx * dw:dx * dw + sw * (ow - 1) + 1:sw]
                        y += np.einsum("oc,chw->ohw", w[:, :, dy, dx], patch)
                x = tensors[f"layers.{i}.scale"][:, None, None] * y + tensors[f"layers.{i}.offset"][:, None, None]
            elif kind == "maxpool2d":
                (kh, kw), (sh, sw), (ph, pw) = layer["kernel_size"], layer["stride"], layer["padding"]
                xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
                oh, ow = (x.shape[1] + 2 * ph - kh) // sh + 1, (x.shape[2] + 2 * pw - kw) // sw + 1
                x = np.stack([np.stack([xp[:, a * sh:a * sh + kh, b * sw:b * sw + kw].max(axis=(1, 2))
                                        for b in range(ow)], -1) for a in range(oh)], -2)
        return x

    return forward, json.loads(meta["input_shape"]), int(meta["num_classes"])


def test_an_independent_reader_from_the_readme_gives_the_same_outputs(tmp_path):
    model = nn.Sequential(
        BinaryConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        BinaryConv2d(6, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.MaxPool2d(2, 1, 1),
        nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), BinaryLinear(5 * 6 * 6, 11), nn.BatchNorm1d(11), nn.ReLU(),
        BinaryLinear(11, 4, binarization="none"), nn.BatchNorm1d(4),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    net = export_model(model.eval(), (3, 10, 7))
    assert {la["type"] for la in net.layers} == {"conv2d", "relu", "maxpool2d", "affine", "flatten", "linear"}
    path = tmp_path / "m.bcnn"
    net.save(path)
    forward, input_shape, num_classes = _numpy_reader(path.read_bytes())
    assert input_shape == [3, 10, 7] and num_classes == 4
    x = torch.randn(5, 3, 10, 7)
    ours = load_packed(path)(x).double()
    for b in range(5):
        theirs = torch.from_numpy(forward(x[b].double().numpy()))
        torch.testing.assert_close(ours[b], theirs, rtol=1e-4, atol=1e-4)



def test_damaged_source_metadata(net, tmp_path):
    from binaryconnect.errors import ConfigError
    from binaryconnect.export.tools import dataset_of

    with pytest.raises(PackedFormatError, match="source must be a JSON object"):
        _load(_bytes(net.tensors, {**net.metadata(), "source": "[1]"}), tmp_path)
    for source in ({"dataset": ["mnist"]}, {"dataset": "mnist", "dataset_kwargs": ["preprocess"]}):
        loaded = _load(_bytes(net.tensors, {**net.metadata(), "source": json.dumps(source)}), tmp_path)
        with pytest.raises(ConfigError, match="source metadata is damaged"):
            dataset_of(loaded, None)


def test_summary_says_smaller_when_the_float32_parameters_take_fewer_bytes_than_the_file():
    """A float network's file holds its float32 parameters plus a header: not "1.0x larger"."""
    from binaryconnect.export.summary import _relative

    assert _relative(390_272 * 30, 390_272) == "30.0x larger"
    assert _relative(203_856, 205_944) == "0.99x the file: smaller, its header included"
