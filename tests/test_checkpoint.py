"""checkpoint.py: atomic writes (interrupted at every point, and by a real SIGKILL), byte-deterministic
safetensors files, an exact optimizer round trip, and safe loading: a pickle payload is refused and
never runs, truncated files are refused (README, "Reliability")."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from binaryconnect import checkpoint
from binaryconnect.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint_state,
    remove_stale_temp_files,
    save_checkpoint,
    save_tensors,
)
from binaryconnect.cli import main
from binaryconnect.errors import CheckpointError
from binaryconnect.layers import BinaryConv2d, BinaryLinear
from binaryconnect.losses import square_hinge_loss
from binaryconnect.optim import make_optimizer
from binaryconnect.train import load_run, resume

SRC = Path(__file__).resolve().parents[1] / "src" / "binaryconnect"


class _Crash(BaseException):
    """Stands for the process dying at that point (BaseException: nothing may swallow it)."""


def _temp_files(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp"))


# --- atomic writes ---


@pytest.mark.parametrize("point", ["mid-write", "before-fsync", "before-rename", "after-rename"])
def test_a_write_interrupted_at_any_point_leaves_a_complete_file(tmp_path, monkeypatch, point):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"w": torch.full((10_000,), 1.0)}, {"n": 1})
    old = path.read_bytes()

    if point == "mid-write":  # half the bytes reach the temporary file, then the process dies
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise _Crash

        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    elif point == "before-fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(_Crash()))
    elif point == "before-rename":
        monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (_ for _ in ()).throw(_Crash()))
    else:  # the rename is done; the process dies before the folder's fsync (mkstemp's os.open still works)
        real_open = os.open

        def open_file_or_die(file, flags, *args, **kwargs):
            if Path(file).is_dir():
                raise _Crash
            return real_open(file, flags, *args, **kwargs)

        monkeypatch.setattr(checkpoint.os, "open", open_file_or_die)

    with pytest.raises(_Crash):
        save_checkpoint(path, {"w": torch.full((10_000,), 2.0)}, {"n": 2})
    monkeypatch.undo()
    tensors, state = load_checkpoint(path)  # loadable: the old file, or after the rename the new one
    if point == "after-rename":
        assert state == {"n": 2} and torch.equal(tensors["w"], torch.full((10_000,), 2.0))
    else:
        assert path.read_bytes() == old and state == {"n": 1}
    assert not _temp_files(tmp_path)


_WRITER = """
import sys, torch
from binaryconnect.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"w": torch.full((4_000_000,), float(i))}, {"i": i})
"""


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    """A child rewrites a 16 MB checkpoint in a loop; it is killed while a temporary file exists (a write
    in progress). The final name then holds a complete checkpoint whose every value matches its metadata."""
    path = tmp_path / CHECKPOINT_NAME
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and _temp_files(tmp_path)):  # the first write is done, a later one under way
            assert child.poll() is None and time.monotonic() < deadline, "the writer stopped or never wrote"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    tensors, state = load_checkpoint(path)
    assert state["i"] >= 1 and torch.equal(tensors["w"], torch.full((4_000_000,), float(state["i"])))
    leftovers = remove_stale_temp_files(tmp_path)  # what the crash left beside it, cleared on resume
    assert all(p.name.startswith(f".{CHECKPOINT_NAME}.") for p in leftovers) and not _temp_files(tmp_path)


def test_equal_contents_give_identical_bytes(tmp_path):
    """safetensors writes metadata in hash order (different in every process); files here are canonical."""
    tensors = {"b": torch.arange(5.0), "a": torch.ones(2, 3, dtype=torch.float64),
               "u": torch.zeros(7, dtype=torch.uint8)}
    save_tensors(tmp_path / "1", tensors, {"x": "1", "config": "{}", "epoch": "3", "a": "é"})
    save_tensors(tmp_path / "2", dict(reversed(tensors.items())), {"a": "é", "epoch": "3", "config": "{}", "x": "1"})
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()
    loaded, metadata = load_tensors(tmp_path / "1")
    assert metadata == {"x": "1", "config": "{}", "epoch": "3", "a": "é"}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


# --- optimizer state as named tensors ---


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(BinaryLinear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), BinaryLinear(16, 4), nn.BatchNorm1d(4))


def _steps(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        square_hinge_loss(model(x), y).backward()
        optimizer.step()


def test_optimizer_round_trip_through_a_file_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 20, generator=gen), torch.randint(0, 4, (32,), generator=gen)) for _ in range(6)]
    model = _net(0)
    optimizer = make_optimizer(model, 1e-2)
    _steps(model, optimizer, batches[:3])

    opt_tensors, opt_plain = optimizer_to_tensors(optimizer)
    save_checkpoint(tmp_path / "c", {**checkpoint.with_prefix("model.", model.state_dict()),
                                     **checkpoint.with_prefix("optimizer.", opt_tensors)}, {"optimizer": opt_plain})
    tensors, state = load_checkpoint(tmp_path / "c")
    restored = _net(1)  # other initial weights: everything must come from the file
    restored.load_state_dict(checkpoint.strip_prefix("model.", tensors))
    restored_optimizer = make_optimizer(restored, 1.0)  # another learning rate: it too comes from the file
    optimizer_from_tensors(restored_optimizer, checkpoint.strip_prefix("optimizer.", tensors), state["optimizer"])
    assert restored_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    _steps(model, optimizer, batches[3:])
    _steps(restored, restored_optimizer, batches[3:])
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    got, want = restored_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])


def test_restored_optimizer_state_takes_the_strides_of_channels_last_parameters(tmp_path):
    # a resumed --channels-last run failed on CUDA (fused Adam: "params, grads, exp_avgs, and exp_avg_sqs
    # must have same dtype, device, and layout"): the file gives contiguous states, the parameters are NHWC
    def net():
        model = nn.Sequential(BinaryConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), BinaryLinear(8 * 4 * 4, 4))
        return model.to(memory_format=torch.channels_last)

    model = net()
    optimizer = make_optimizer(model, 1e-2)
    x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    _steps(model, optimizer, [(x, torch.randint(0, 4, (5,)))])
    opt_tensors, opt_plain = optimizer_to_tensors(optimizer)
    save_checkpoint(tmp_path / "c", checkpoint.with_prefix("optimizer.", opt_tensors), {"optimizer": opt_plain})
    tensors, state = load_checkpoint(tmp_path / "c")
    restored = net()
    restored_optimizer = make_optimizer(restored, 1e-2)
    optimizer_from_tensors(restored_optimizer, checkpoint.strip_prefix("optimizer.", tensors), state["optimizer"])

    conv = restored[0].weight
    assert conv.stride() != torch.empty(conv.shape).stride()  # the case at hand: an NHWC parameter
    for param, values in restored_optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert values[key].stride() == param.stride(), key
    want = optimizer.state_dict()["state"]
    got = restored_optimizer.state_dict()["state"]
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])


def test_optimizer_state_for_other_parameters_is_refused():
    model = _net(0)
    optimizer = make_optimizer(model, 1e-2)
    tensors, plain = optimizer_to_tensors(optimizer)
    other = nn.Sequential(BinaryLinear(20, 4), nn.BatchNorm1d(4))
    with pytest.raises(CheckpointError, match="does not match the model's parameters"):
        optimizer_from_tensors(make_optimizer(other, 1e-2), tensors, plain)


# --- safe loading ---


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {"pickle": tmp_path / "pickle.safetensors", "torch.save": tmp_path / "torch_save.safetensors"}
    files["pickle"].write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    torch.save({"weight": _Payload(marker)}, files["torch.save"])
    return files


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    # positive control: the payload is live, unpickling it does run code
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "payload-ran"
    for kind, path in _pickle_files(tmp_path, marker).items():
        with pytest.raises(CheckpointError, match="looks like a pickle or torch.save file.*never unpickles"):
            load_tensors(path)
        with pytest.raises(CheckpointError, match="looks like a pickle"):
            load_run(path)
        with pytest.raises(CheckpointError, match="looks like a pickle"):
            read_checkpoint_state(path)
        assert main(["evaluate", str(path)]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "looks like a pickle" in err

        run = tmp_path / f"run-{kind.replace('.', '-')}"  # a run directory whose files were swapped
        run.mkdir()
        (run / CHECKPOINT_NAME).write_bytes(path.read_bytes())
        (run / "model.safetensors").write_bytes(path.read_bytes())
        with pytest.raises(CheckpointError, match="looks like a pickle"):
            resume(run, log=lambda *a: None)
        with pytest.raises(CheckpointError, match="looks like a pickle"):
            load_run(run)
        assert main(["train", "--resume", str(run)]) == 2
        assert "looks like a pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_checkpoints_are_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"w": torch.arange(1000.0)}, {"n": 1})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8 + header // 2, 8 + header, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load_checkpoint(path)
    path.write_bytes(data)
    assert load_checkpoint(path)[1] == {"n": 1}


def test_a_model_file_is_not_a_checkpoint_and_vice_versa(tmp_path):
    save_tensors(tmp_path / "m", {"w": torch.zeros(2)}, {"format": "binaryconnect-model", "format_version": "1",
                                                          "config": "{}"})
    with pytest.raises(CheckpointError, match="not a binaryconnect checkpoint"):
        load_checkpoint(tmp_path / "m")
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="not a binaryconnect model file"):
        load_run(tmp_path / "c")


def test_no_code_path_can_unpickle_a_user_file():
    """No torch.load, pickle.load(s), numpy allow_pickle or the like anywhere in the package. (CIFAR-10's
    official Python batches are read after their checksum matched, through an unpickler that accepts
    NumPy arrays and plain containers only: data/cifar.py.)"""
    forbidden = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|import dill|import joblib|"
                           r"weights_only\s*=\s*False|torch\.serialization")
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    before = os.umask(umask)
    try:
        checkpoint.atomic_write_bytes(tmp_path / "a.bin", b"data")
    finally:
        os.umask(before)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("header_length", [640, 896, 1152, 1408, 65536 + 640])
def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path, header_length):
    # the first 8 bytes of a safetensors file are its header's length: 640 is 0x80 0x02 ..., a pickle's
    # signature; such a file must load (a real pickle is still refused: test_a_pickle_payload_is_refused...)
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    base = int.from_bytes(checkpoint.serialize_tensors(tensors, {"pad": ""})[:8], "little")
    for pad in range(max(0, header_length - base - 16), header_length):  # the header grows with the padding
        data = checkpoint.serialize_tensors(tensors, {"pad": "x" * pad})
        if int.from_bytes(data[:8], "little") == header_length:
            break
    else:
        pytest.fail(f"no padding gives a header of {header_length} bytes")
    assert data[0] == 0x80 and data[1] in (2, 3, 4, 5)
    (tmp_path / "m.safetensors").write_bytes(data)
    loaded, metadata = checkpoint.load_tensors(tmp_path / "m.safetensors")
    assert torch.equal(loaded["w"], tensors["w"]) and metadata["pad"] == "x" * pad


def test_a_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durability, not only atomicity: the data reach the disk before the new name points at them (else a
    power cut can leave an empty file under the final name), and the folder is fsynced after the rename
    (else the rename itself can be lost). Seen through the calls, in their order: file fsync, rename,
    folder fsync."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"w": torch.ones(3)}, {"n": 1})
    assert events == ["fsync file", "rename", "fsync folder"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1] == {"n": 1}


def test_every_truncation_is_refused_by_both_readers_saying_what_is_missing(tmp_path):
    """A checkpoint cut after every possible byte count: loading it whole and reading its header alone (as
    ``read_checkpoint_state`` does, to poll a run cheaply) both refuse it with a CheckpointError that says
    what is missing: the 8-byte length, part of the header, or part of the tensors (never a struct or
    safetensors error, and never a header-only read that succeeds on a file whose tensors are cut)."""
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"w": torch.arange(5.0), "b": torch.ones(3, dtype=torch.uint8)}, {"n": 1})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        if cut < 8:
            expected = rf"is truncated \({cut} bytes\)"
        elif cut < 8 + n:
            expected = rf"is truncated: its header claims {n} bytes, the file has {cut - 8}$"
        else:
            expected = rf"is truncated: tensors need {len(data)} bytes, the file has {cut}$"
        for read in (load_checkpoint, read_checkpoint_state):
            with pytest.raises(CheckpointError, match=expected):
                read(path)
    path.write_bytes(data)
    assert read_checkpoint_state(path) == load_checkpoint(path)[1] == {"n": 1}


@pytest.mark.parametrize("content, kind", [
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }" + b" " * 64,
     "it is a NumPy .npy array"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "it is a PNG image"),
    (b'{"config": {"seed": 0}, "environment": {}}\n', "it looks like JSON text"),
    (b"epoch,loss\n1,0.5\n" * 4, "its first bytes are no safetensors header"),
    (b'{"runs":{"a":1}}', "it looks like JSON text"),  # byte 8 is "{" too, but its length is no header's
    (b'{"a": 1}', "it looks like JSON text"),  # 8 bytes: no header at all
])
def test_a_file_of_another_kind_is_called_so_not_truncated(tmp_path, capsys, content, kind):
    """A .npy, a PNG, a config.json or a CSV given where a model, checkpoint or packed file belongs: one line
    saying it is not a safetensors file and what it looks like (before: "truncated: its header claims
    379676406402707 bytes"), from every command that reads such files."""
    path = tmp_path / "wrong.safetensors"
    path.write_bytes(content)
    for argv in (["evaluate", str(path)], ["summary", str(path)], ["predict", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is not a safetensors file ({kind}" in err and "truncated" not in err, (argv, err)


@pytest.mark.parametrize("header, message", [
    (b"[1, 2]", r"corrupt safetensors header \(not a JSON object\)"),
    (b'"text"', r"corrupt safetensors header \(not a JSON object\)"),
    (b'{"w": {"dtype": "F32", "shape": [1]}}', r"corrupt safetensors header \(bad tensor entry\)"),  # KeyError
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": 4}}', r"\(bad tensor entry\)"),  # TypeError
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', r"\(bad tensor entry\)"),  # IndexError
    (b'{"w": 3}', r"\(bad tensor entry\)"),
    (b'{"__metadata__": {"a": "\xff"}}', r"corrupt safetensors header \(.*utf-8"),  # not UTF-8
    (b'{"__metadata__": ', r"corrupt safetensors header \("),
])
def test_a_malformed_header_is_a_checkpoint_error(tmp_path, header, message):
    """Headers of the right length but wrong content (a damaged or forged file): each is a CheckpointError
    naming the defect, from the full load and from the header-only read alike, never a TypeError, an
    AttributeError or a UnicodeDecodeError escaping as a traceback."""
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    for read in (load_tensors, read_checkpoint_state):
        with pytest.raises(CheckpointError, match=message):
            read(path)


def test_tensor_data_stay_8_byte_aligned_whatever_the_metadata(tmp_path):
    """Rewriting the header in sorted order changes its length; it is padded so that the tensor data still
    start at a multiple of 8 bytes, as the safetensors library writes them (float64 tensors can then be
    mapped in place). Checked for every header length modulo 8, and that the padded files load exactly."""
    tensors = {"w": torch.arange(3, dtype=torch.float64), "u": torch.arange(3, dtype=torch.uint8)}
    remainders = set()
    for pad in range(24):
        data = checkpoint.serialize_tensors(tensors, {"pad": "x" * pad})
        n = int.from_bytes(data[:8], "little")
        assert (8 + n) % 8 == 0, pad
        remainders.add(len(data[8 : 8 + n].rstrip(b" ")) % 8)
        (tmp_path / "t.safetensors").write_bytes(data)
        loaded, metadata = load_tensors(tmp_path / "t.safetensors")
        assert metadata == {"pad": "x" * pad} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert remainders == set(range(8))  # every unpadded length modulo 8 was met


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_of_every_protocol_that_has_a_signature_is_refused(tmp_path, protocol):
    """Protocols 2-5 begin with 0x80 and the protocol number: each is refused by its signature, by both
    readers, and its payload never runs (protocols 0-1 have no signature: they fail as corrupt headers)."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=protocol))
    for read in (load_tensors, read_checkpoint_state):
        with pytest.raises(CheckpointError, match="looks like a pickle or torch.save file"):
            read(path)
    assert not marker.exists()


def test_optimizer_state_for_groups_of_other_sizes_is_refused_by_its_own_check():
    """As many parameter groups, but the last one ("other": the batch-norm parameters) holds 2 parameters in the
    model and 4 in the file: refused before PyTorch's loader sees it, with the message that says why."""
    model = _net(0)
    optimizer = make_optimizer(model, 1e-2)
    _steps(model, optimizer, [(torch.randn(8, 20), torch.randint(0, 4, (8,)))])
    tensors, plain = optimizer_to_tensors(optimizer)
    other = nn.Sequential(BinaryLinear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), BinaryLinear(16, 4))
    other_optimizer = make_optimizer(other, 1e-2)
    assert len(other_optimizer.param_groups) == len(optimizer.param_groups)
    with pytest.raises(CheckpointError, match="optimizer state does not match the model's parameters"):
        optimizer_from_tensors(other_optimizer, tensors, plain)


def test_non_tensor_per_parameter_state_goes_through_the_json_part():
    """Per-parameter optimizer values that are not tensors (numbers: Adam has none, other optimizers do)
    travel in the checkpoint's JSON metadata and come back, beside the tensors, for their parameter."""
    model = _net(0)
    optimizer = make_optimizer(model, 1e-2)
    _steps(model, optimizer, [(torch.randn(8, 20), torch.randint(0, 4, (8,)))])
    params = list(model.parameters())
    optimizer.state[params[1]].update(count=3, scale=0.5)
    tensors, plain = optimizer_to_tensors(optimizer)
    assert "1.count" not in tensors and "1.exp_avg" in tensors
    restored = _net(0)
    restored_optimizer = make_optimizer(restored, 1e-2)
    optimizer_from_tensors(restored_optimizer, tensors, json.loads(json.dumps(plain)))
    values = restored_optimizer.state[list(restored.parameters())[1]]
    assert (values["count"], values["scale"]) == (3, 0.5)
    assert torch.equal(values["exp_avg"], optimizer.state[params[1]]["exp_avg"])


def test_restored_optimizer_state_takes_the_strides_of_any_non_contiguous_parameter():
    """Not only 4-d channels-last weights: a transposed (column-major) 2-d weight gets moments with its
    strides back too, with their values (the file holds them contiguous), and steps on exactly as the
    optimizer that was saved."""
    def net():
        torch.manual_seed(0)
        layer = nn.Linear(6, 5)
        layer.weight = nn.Parameter(torch.randn(6, 5).t())
        return layer

    model = net()
    optimizer = make_optimizer(model, 1e-2)
    batches = [(torch.randn(4, 6), torch.randint(0, 5, (4,))) for _ in range(2)]
    _steps(model, optimizer, batches[:1])
    tensors, plain = optimizer_to_tensors(optimizer)
    restored = net()
    restored.load_state_dict(model.state_dict())
    restored_optimizer = make_optimizer(restored, 1e-2)
    contiguous = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}  # as from a file
    optimizer_from_tensors(restored_optimizer, contiguous, plain)
    assert restored.weight.stride() == (1, 5)
    for key in ("exp_avg", "exp_avg_sq"):
        assert restored_optimizer.state[restored.weight][key].stride() == (1, 5), key
        assert torch.equal(restored_optimizer.state[restored.weight][key], optimizer.state[model.weight][key])
    _steps(model, optimizer, batches[1:])
    _steps(restored, restored_optimizer, batches[1:])
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)


def test_files_that_do_not_match_their_own_configuration_are_refused_in_one_line(tmp_path, mnist, capsys):
    """A model file or checkpoint whose tensors and configuration disagree (metadata edited by hand, or files of
    two runs mixed): a CheckpointError naming the file and what is wrong, from load_run, evaluate, export and
    resume alike; nothing is trained or written."""
    from binaryconnect.train import fit
    from helpers import assert_one_line_error, quiet, small_config

    run = tmp_path / "run"
    fit(small_config(epochs=1, model_kwargs={"hidden": 16, "depth": 1}), run, data=mnist, log=quiet)
    model_path = run / "model.safetensors"
    tensors, meta = load_tensors(model_path)
    config = json.loads(meta["config"])
    wider = {**meta, "config": json.dumps({**config, "model_kwargs": {**config["model_kwargs"], "hidden": 32}})}
    save_tensors(model_path, tensors, wider)
    with pytest.raises(CheckpointError, match=f"(?s){re.escape(str(model_path))} does not match its configuration: "
                                              "Error.*size mismatch for layers.1.weight"):
        load_run(run)
    for command in (["evaluate", str(run)], ["export", str(run), "-o", str(tmp_path / "m.bcnn")]):
        assert_one_line_error(command, "does not match its configuration", capsys)
    assert not (tmp_path / "m.bcnn").exists()
    save_tensors(model_path, tensors, {k: v for k, v in meta.items() if k != "input_shape"})
    with pytest.raises(CheckpointError, match="has an unusable configuration in its metadata \\('input_shape'\\)"):
        load_run(run)

    checkpoint_path = run / CHECKPOINT_NAME
    tensors, state = load_checkpoint(checkpoint_path)
    before = checkpoint_path.read_bytes()
    state["config"]["model_kwargs"]["hidden"] = 32
    save_checkpoint(checkpoint_path, tensors, state)
    edited = checkpoint_path.read_bytes()
    with pytest.raises(CheckpointError, match="the checkpoint's model does not match its configuration \\("):
        resume(run, data=mnist, log=quiet, epochs=2)
    assert checkpoint_path.read_bytes() == edited and before != edited  # left as it was found
    assert (run / "summary.json").is_file()  # the finished run's summary too


@pytest.mark.parametrize("metadata, message", [
    ({"format": "binaryconnect-model", "format_version": "99", "config": "{}"},
     "has model file format version '99'; this binaryconnect reads version 1"),
    ({"format": "binaryconnect-model", "format_version": "1", "config": "{not json"},
     "has no readable configuration in its metadata"),
    ({"format": "binaryconnect-model", "format_version": "1"}, "has no readable configuration in its metadata"),
])
def test_a_model_file_with_damaged_metadata_is_refused(tmp_path, metadata, message):
    save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, metadata)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_run(tmp_path)


@pytest.mark.parametrize("state, message", [
    (None, "has no readable training state in its metadata"),
    ("{not json", "has no readable training state in its metadata"),
    ("[1, 2]", "has a training state that is not a JSON object"),
])
def test_a_checkpoint_with_a_damaged_training_state_is_refused(tmp_path, state, message):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"w": torch.zeros(2)}, {})
    tensors, metadata = load_tensors(path)
    metadata = {k: v for k, v in metadata.items() if k != "state"}
    save_tensors(path, tensors, metadata if state is None else {**metadata, "state": state})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)
