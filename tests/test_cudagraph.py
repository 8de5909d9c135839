"""cudagraph.py (``--cuda-graph``): the training step as two recorded CUDA graphs.

On the CPU: the step machinery without recording (static inputs, warm-up taken back, learning rates as
tensors) trains bit-identically to the plain loop; checkpoints store those learning rates as numbers; the
option is refused with a clear message where it cannot work; a failed recording (PyTorch's graph stood in
for) says what failed and how to go on, and that way works. On a GPU (skipped without one): the recorded
step trains as the eager one does, and stochastic layers draw fresh binary weights at every replay.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch

from binaryconnect.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from binaryconnect.config import recipe_config
from binaryconnect.cudagraph import GraphedStep, check_recordable, register_generator, tensor_learning_rates
from binaryconnect.errors import ConfigError, CudaGraphError
from binaryconnect.layers import set_generator
from binaryconnect.losses import square_hinge_loss
from binaryconnect.models import create_model
from binaryconnect.optim import make_optimizer, set_lr
from binaryconnect.train import fit, resume
from helpers import assert_one_line_error, assert_same_training_state, needs_cuda, quiet, small_config

cuda = needs_cuda


def _mlp(binarization: str, device: str = "cpu", features: int = 20) -> torch.nn.Module:
    torch.manual_seed(3)
    return create_model("mlp", input_shape=(features,), num_classes=10, hidden=32, depth=2,
                        binarization=binarization).to(device)


def _batches(n: int, device: str = "cpu", features: int = 20, batch: int = 16):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, features, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]


def _train_eager(model, batches, lrs, seed, device="cpu"):
    """The plain loop of train.py: zero_grad, loss, backward, step (with the clipping hook)."""
    optimizer = make_optimizer(model, 1e-3)
    generator = torch.Generator(device=device).manual_seed(seed)
    set_generator(model, generator)
    model.train()
    losses = []
    for (x, y), lr in zip(batches, lrs, strict=True):
        set_lr(optimizer, lr)
        loss = square_hinge_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return optimizer, generator, losses


def _train_graphed(model, batches, lrs, seed, capture, device="cpu", concurrent_groups=True):
    optimizer = make_optimizer(model, 1e-3)
    generator = torch.Generator(device=device).manual_seed(seed)
    set_generator(model, generator)
    model.train()
    step = GraphedStep(lambda x, y: square_hinge_loss(model(x), y), model, optimizer, *batches[0],
                       generators=[generator], capture=capture, concurrent_groups=concurrent_groups)
    losses = []
    for (x, y), lr in zip(batches, lrs, strict=True):
        set_lr(optimizer, lr)
        step.load(x, y)
        losses.append(step.forward_backward().item())
        step.step()
    return optimizer, generator, losses


@pytest.mark.parametrize("binarization", ["deterministic", "stochastic", "none"])
def test_step_machinery_without_recording_trains_exactly_as_the_plain_loop(binarization, one_thread):
    # the warm-up steps (3) are taken back: parameters, batch-norm statistics, Adam's state (created by
    # the warm-up, zeroed) and the binarization generator are as before, so the 6 steps are the same
    # 6 steps, bit for bit, learning-rate schedule included
    batches = _batches(6)
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 1e-3, 1e-3]
    eager, graphed = _mlp(binarization), _mlp(binarization)
    opt_e, gen_e, losses_e = _train_eager(eager, batches, lrs, seed=7)
    opt_g, gen_g, losses_g = _train_graphed(graphed, batches, lrs, seed=7, capture=False)
    assert losses_g == losses_e
    assert_same_training_state(eager, graphed, opt_e, opt_g)
    assert torch.equal(gen_e.get_state(), gen_g.get_state())
    assert all(torch.is_tensor(g["lr"]) for g in opt_g.param_groups)
    assert [g["lr"].item() for g in opt_g.param_groups] == pytest.approx([g["lr"] for g in opt_e.param_groups])


def test_warm_up_is_taken_back_even_from_a_trained_optimizer_state(one_thread):
    # resuming: Adam already has moments and a step count; the warm-up must restore them, not zero them
    batches = _batches(4)
    a = _mlp("deterministic")
    opt_a, _, _ = _train_eager(a, batches[:2], [1e-2, 1e-2], seed=1)
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b, 1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    before = {k: v.clone() for k, v in b.state_dict().items()}
    moments = {k: v.clone() for k, v in opt_b.state[next(b.parameters())].items()}
    GraphedStep(lambda x, y: square_hinge_loss(b(x), y), b, opt_b, *batches[2], capture=False)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt_b.state[next(b.parameters())].items():
        assert torch.equal(v, moments[k]), k
    assert moments["step"].item() == 2


def test_batches_of_another_shape_are_refused():
    model = _mlp("deterministic")
    x, y = _batches(1)[0]
    step = GraphedStep(lambda x, y: square_hinge_loss(model(x), y), model, make_optimizer(model, 1e-3), x, y,
                       capture=False)
    with pytest.raises(ValueError, match=r"batches of shape \(16, 20\)"):
        step.load(x[:8], y[:8])


def test_recording_needs_a_cuda_device():
    model = _mlp("deterministic")
    x, y = _batches(1)[0]
    with pytest.raises(ConfigError, match="need a CUDA device; the training device is cpu"):
        GraphedStep(lambda x, y: square_hinge_loss(model(x), y), model, make_optimizer(model, 1e-3), x, y)


def test_a_cumulative_batch_norm_cannot_be_recorded():
    """A batch norm with momentum=None reads its batch count back to the host at every training step, which
    CUDA graph recording forbids: refused with a message naming it. The recipes' models (and a batch norm
    that keeps no running statistics) pass."""
    model = _mlp("deterministic")
    check_recordable(model)
    check_recordable(create_model("convnet", channels=(8, 16, 32), hidden=32, binarization="stochastic"))
    check_recordable(torch.nn.Sequential(torch.nn.BatchNorm1d(4, momentum=None, track_running_stats=False)))
    bad = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(ConfigError, match=r"batch norm with momentum=None .* cannot be recorded as a CUDA graph: 1; "
                                          r"give it a momentum, or train without --cuda-graph"):
        check_recordable(bad)


def test_generators_are_registered_without_the_deprecation_warning_of_later_torch_versions():
    """torch 2.14's ``CUDAGraph.register_generator_state`` is a no-op that warns (the message below is the one
    in its libtorch_python); 2.11's does the work. The call is made either way, that warning is silenced,
    any other warning gets through."""
    class Graph:
        def __init__(self, also=None):
            self.registered, self.also = [], also

        def register_generator_state(self, generator):
            self.registered.append(generator)
            warnings.warn("CUDAGraph.register_generator_state() is deprecated, and will be removed in a future "
                          "PyTorch release. It is now a no-op and can be safely removed from your code.",
                          DeprecationWarning, stacklevel=2)
            if self.also:
                warnings.warn(self.also, UserWarning, stacklevel=2)

    g = torch.Generator()
    graph = Graph()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_generator(graph, g)
    assert graph.registered == [g]
    with pytest.warns(UserWarning, match="something else"):
        register_generator(Graph(also="something else"), g)


def test_set_lr_updates_a_tensor_learning_rate_in_place():
    model = _mlp("deterministic")
    optimizer = make_optimizer(model, 1e-3)
    tensor_learning_rates(optimizer, torch.device("cpu"))
    held = [g["lr"] for g in optimizer.param_groups]
    set_lr(optimizer, 2e-3)
    for group, tensor in zip(optimizer.param_groups, held, strict=True):
        assert group["lr"] is tensor  # the object a recorded graph reads
        assert tensor.item() == pytest.approx(2e-3 * group["lr_scale"], rel=1e-6)


def test_checkpoint_stores_tensor_learning_rates_as_numbers_and_keeps_the_loaders_capturable():
    model = _mlp("stochastic")
    optimizer = make_optimizer(model, 1e-3)
    _train_eager(model, _batches(1), [1e-3], seed=0)  # (its own optimizer; this one gets state below)
    loss = square_hinge_loss(model(_batches(1)[0][0]), _batches(1)[0][1])
    loss.backward()
    optimizer.step()
    tensor_learning_rates(optimizer, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["capturable"] = True  # as GraphedStep leaves it on a GPU
    tensors, plain = optimizer_to_tensors(optimizer)
    json.dumps(plain)  # the checkpoint's JSON part: no tensors in it
    assert all(isinstance(g["lr"], float) for g in plain["param_groups"])
    fresh = make_optimizer(_mlp("stochastic"), 1e-3)
    optimizer_from_tensors(fresh, tensors, json.loads(json.dumps(plain)))
    assert [g["capturable"] for g in fresh.param_groups] == [False] * len(fresh.param_groups)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([g["lr"].item() for g in optimizer.param_groups])


def test_option_is_validated(tmp_path, capsys):
    with pytest.raises(ConfigError, match="cannot be nested"):
        recipe_config("mnist-float", cuda_graph=True, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="cuda_graph must be true or false"):
        recipe_config("mnist-float", cuda_graph="yes")
    assert recipe_config("mnist-float", cuda_graph=True, compile=True).cuda_graph is True
    # on the CPU: refused before any data is read (the data folder does not exist)
    with pytest.raises(ConfigError, match="needs a CUDA device; this run's device is cpu"):
        fit(small_config(cuda_graph=True, data_dir=str(tmp_path / "nowhere")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert_one_line_error(["train", "mnist-float", "--cuda-graph", "--device", "cpu", "--data-dir",
                           str(tmp_path / "nowhere"), "-o", str(tmp_path / "run")],
                          "--cuda-graph records the training step as CUDA graphs and needs a CUDA device", capsys)


class _GraphThatFailsWithTorch211sSecondError:
    """Stands in for ``torch.cuda.graph``: an error inside the recording comes out, as torch 2.11 reports it
    when recording ends, as another error raised while handling the first (chained as its context)."""

    def __init__(self, graph, stream=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if value is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\n"
                               "CUDA kernel errors might be asynchronously reported")
        return False


def test_a_failed_recording_names_what_pytorch_said_first_cause_included(monkeypatch):
    model = _mlp("deterministic")
    x, y = _batches(1)[0]
    fail = {"now": False}

    def loss_fn(x, y):
        if fail["now"]:
            raise RuntimeError("operation not permitted when stream is capturing\n(a second line)")
        return square_hinge_loss(model(x), y)

    step = GraphedStep(loss_fn, model, make_optimizer(model, 1e-3), x, y, capture=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", _GraphThatFailsWithTorch211sSecondError)
    fail["now"] = True
    with pytest.raises(CudaGraphError) as info:
        step._record()
    assert str(info.value) == (
        "recording the training step as CUDA graphs failed: RuntimeError: CUDA error: operation failed due to a "
        "previous error during capture; caused by RuntimeError: operation not permitted when stream is capturing")
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback of PyTorch's error stays reachable


def test_a_run_whose_recording_fails_says_how_to_go_on_and_that_works(tmp_path, monkeypatch, capsys, data_root):
    """The command line: one line naming the failure and the intact checkpoint, and the command it gives
    (resume without --cuda-graph) trains the run to its end."""
    from binaryconnect import train

    def failing_step(*args, **kwargs):
        raise CudaGraphError("recording the training step as CUDA graphs failed: RuntimeError: (stand-in)")

    monkeypatch.setattr(train, "GraphedStep", failing_step)
    monkeypatch.setattr(train, "_check_cuda_graph", lambda config, device: None)
    run = tmp_path / "run"
    small = ["--train-subset", "500", "--hidden", "16", "--depth", "1", "--epochs", "1", "--device", "cpu",
             "--no-progress", "--data-dir", str(data_root)]
    assert_one_line_error(["train", "mnist-stochastic", *small, "--cuda-graph", "-o", str(run)],
                          f"recording the training step as CUDA graphs failed: RuntimeError: (stand-in). "
                          f"{run / 'checkpoint.safetensors'} (epoch 1, step 0) is intact: `binaryconnect train "
                          f"--resume {run} --no-cuda-graph` trains the run without CUDA graphs", capsys)
    assert not (run / "summary.json").exists()
    from binaryconnect.cli import main

    assert main(["train", "--resume", str(run), "--no-cuda-graph", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    # a resume that asks for more epochs: those are not in the checkpoint, so the advice is to repeat the resume
    assert_one_line_error(["train", "--resume", str(run), "--epochs", "2", "--cuda-graph", "--no-progress"],
                          "(epoch 2, step 0) is intact: the same resume again with --no-cuda-graph (and the other "
                          "options given to this one) trains the run without CUDA graphs", capsys)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-cuda-graph", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


# --- on a GPU ---

@cuda
@pytest.mark.parametrize("binarization", ["deterministic", "stochastic"])
def test_recorded_step_trains_as_the_eager_step_on_a_gpu(binarization):
    # The registered generator makes replay i draw what eager call i draws (same offsets), so the
    # stochastic runs see the same binary weights and end with the same generator state; cuBLAS may differ
    # in the last bits between the two, hence a tolerance on the values.
    batches = _batches(20, "cuda", features=64, batch=32)
    lrs = [1e-2] * 10 + [1e-3] * 10
    eager, graphed = _mlp(binarization, "cuda", 64), _mlp(binarization, "cuda", 64)
    opt_e, gen_e, losses_e = _train_eager(eager, batches, lrs, seed=7, device="cuda")
    opt_g, gen_g, losses_g = _train_graphed(graphed, batches, lrs, seed=7, capture=True, device="cuda")
    assert losses_g == pytest.approx(losses_e, rel=1e-4, abs=1e-6)
    assert_same_training_state(eager, graphed, opt_e, opt_g, exact=False, atol=1e-4)
    assert torch.equal(gen_e.get_state(), gen_g.get_state())


@cuda
@pytest.mark.parametrize("binarization", ["deterministic", "stochastic"])
def test_groups_recorded_side_by_side_train_bit_identically_to_groups_recorded_in_turn(binarization):
    # the same kernels on other streams: parallel branches of the graph change no value
    batches = _batches(12, "cuda", features=64, batch=32)
    lrs = [5e-2] * 6 + [1e-3] * 6  # large enough at first that latent weights reach the clip
    runs = {}
    for concurrent in (True, False):
        model = _mlp(binarization, "cuda", 64)
        runs[concurrent] = (model, *_train_graphed(model, batches, lrs, seed=7, capture=True, device="cuda",
                                                   concurrent_groups=concurrent))
    (a, opt_a, gen_a, losses_a), (b, opt_b, gen_b, losses_b) = runs[True], runs[False]
    assert losses_a == losses_b
    assert_same_training_state(a, b, opt_a, opt_b)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    assert any(bool((m.weight.abs() == m.H).any()) for m in a.modules() if getattr(m, "is_binary", False))


@cuda
def test_each_replay_draws_fresh_stochastic_weights():
    # same batch, a learning rate too small to move the weights: the loss changes between replays only
    # because the binary weights are resampled (a graph that froze its random numbers repeats its loss)
    x, y = _batches(1, "cuda", features=64, batch=32)[0]
    losses = {}
    for binarization in ("stochastic", "deterministic"):
        model = _mlp(binarization, "cuda", 64)
        optimizer = make_optimizer(model, 1e-30)
        generator = torch.Generator(device="cuda").manual_seed(0)
        set_generator(model, generator)
        model.train()
        step = GraphedStep(lambda a, b, m=model: square_hinge_loss(m(a), b), model, optimizer, x, y,
                           generators=[generator])
        states = []
        losses[binarization] = []
        for _ in range(8):
            states.append(generator.get_state())
            losses[binarization].append(step.forward_backward().item())
            step.step()
        if binarization == "stochastic":
            assert all(not torch.equal(a, b) for a, b in zip(states[:-1], states[1:], strict=True))  # it advances
    assert len(set(losses["stochastic"])) == 8
    assert max(losses["deterministic"]) - min(losses["deterministic"]) < 1e-4


def _speed_step_losses(model, forward, batches, capture, optimizer=None):
    """Losses of training ``model`` through ``forward`` (speed.training_forward) on ``batches``, eagerly or
    recorded, with ``optimizer`` (default: a new one); PyTorch's global generators seeded first (compiled
    stochastic layers draw from them)."""
    torch.manual_seed(11)
    optimizer = optimizer or make_optimizer(model, 1e-2)
    model.train()
    if capture is None:
        losses = []
        for x, y in batches:
            loss = square_hinge_loss(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    step = GraphedStep(lambda a, b: square_hinge_loss(forward(a), b), model, optimizer, *batches[0], capture=capture)
    losses = []
    for x, y in batches:
        step.load(x, y)
        losses.append(step.forward_backward().item())
        step.step()
    return losses


@cuda
def test_compiled_stochastic_forward_records_and_draws_fresh_numbers():
    # torch.compile's kernels draw from PyTorch's default CUDA generator (Inductor's seeds), which PyTorch
    # registers with every graph: the recorded step follows the compiled eager one
    from binaryconnect.speed import training_forward

    batches = _batches(10, "cuda", features=64, batch=32)
    runs = {}
    for mode in (None, True):
        model = _mlp("stochastic", "cuda", 64)
        forward = training_forward(model, compile=True, autocast_cache=mode is None)
        runs[mode] = _speed_step_losses(model, forward, batches, mode)
    assert runs[True] == pytest.approx(runs[None], rel=1e-3)
    assert len(set(runs[True])) == len(runs[True])


@cuda
def test_bf16_channels_last_convnet_records_as_it_runs_eagerly():
    from binaryconnect.speed import training_forward

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda())
               for _ in range(6)]
    runs = {}
    for mode in (None, True):
        torch.manual_seed(4)
        model = create_model("convnet", channels=(8, 16, 32), hidden=32, binarization="deterministic").cuda()
        forward = training_forward(model, amp="bf16", channels_last=True, autocast_cache=mode is None)
        runs[mode] = _speed_step_losses(model, forward, batches, mode)
    assert runs[True] == pytest.approx(runs[None], rel=1e-2)


@cuda
@pytest.mark.parametrize("binarization", ["deterministic", "stochastic"])
def test_fit_with_cuda_graphs_matches_fit_without(tmp_path, mnist, binarization):
    base = dict(device="cuda", epochs=2, train_subset=2000, binarization=binarization)
    fit(small_config(**base), tmp_path / "plain", data=mnist, log=quiet)
    fit(small_config(**base, cuda_graph=True), tmp_path / "graph", data=mnist, log=quiet)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("plain", "graph")}
    assert [r["train_loss"] for r in rows["graph"]] == pytest.approx([r["train_loss"] for r in rows["plain"]],
                                                                      rel=1e-3)
    assert [r["test_error"] for r in rows["graph"]] == pytest.approx([r["test_error"] for r in rows["plain"]],
                                                                      abs=0.005)
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["config"]["cuda_graph"] is True


def test_training_loop_with_the_step_machinery_trains_and_resumes_as_the_plain_loop(tmp_path, mnist, one_thread,
                                                                                     monkeypatch):
    # train.py's --cuda-graph path (batch gathered into the static inputs, the two steps, checkpoints of
    # tensor learning rates, a resume that rebuilds the step after restoring) run without recording on the
    # CPU: the same metrics and the same model, bit for bit, as the plain loop
    from binaryconnect import train
    from binaryconnect.checkpoint import load_tensors

    monkeypatch.setattr(train, "GraphedStep", functools.partial(GraphedStep, capture=False))
    monkeypatch.setattr(train, "_check_cuda_graph", lambda config, device: None)

    def results(run):
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        model = load_tensors(run / "model.safetensors")[0]
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics], model

    options = dict(binarization="stochastic", epochs=2, checkpoint_every=7)
    fit(small_config(**options), tmp_path / "plain", data=mnist, log=quiet)
    fit(small_config(**options, cuda_graph=True), tmp_path / "graph", data=mnist, log=quiet)

    def stop_after_epoch_1(line):  # raised after the epoch's log line: the last checkpoint is mid-epoch 1
        if line.startswith("epoch    1/"):
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        fit(small_config(**options, cuda_graph=True), tmp_path / "resumed", data=mnist, log=stop_after_epoch_1)
    resume(tmp_path / "resumed", data=mnist, log=quiet)

    plain_metrics, plain_model = results(tmp_path / "plain")
    for run in ("graph", "resumed"):
        metrics, model = results(tmp_path / run)
        assert metrics == plain_metrics, run
        assert model.keys() == plain_model.keys()
        assert all(torch.equal(model[k], plain_model[k]) for k in model), run


def test_gather_runs_an_augmentation_eagerly_into_the_static_inputs():
    model = _mlp("deterministic")
    x, y = _batches(1)[0]
    step = GraphedStep(lambda a, b: square_hinge_loss(model(a), b), model, make_optimizer(model, 1e-3), x, y,
                       capture=False)
    data_x, data_y = torch.randn(40, 20), torch.randint(0, 10, (40,))
    index = torch.arange(16) * 2
    step.gather(data_x, data_y, index, lambda a, g: -a, None)
    assert torch.equal(step.x, -data_x[index]) and torch.equal(step.y, data_y[index])
    step.gather(data_x, data_y, index + 1)
    assert torch.equal(step.x, data_x[index + 1]) and torch.equal(step.y, data_y[index + 1])


def test_warm_up_gives_back_pytorchs_global_generator(one_thread):
    # dropout before the binary MLP draws its masks from PyTorch's global generator: the warm-up's draws are
    # taken back with the other generators, so the graphed steps see the masks the eager steps see, and
    # both runs leave the global generator in the same state
    batches = _batches(4)
    runs = {}
    for capture in (None, False):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Dropout(0.3), _mlp("deterministic"))
        optimizer = make_optimizer(model, 1e-2)
        losses = _speed_step_losses(model, model, batches, capture, optimizer)
        runs[capture] = losses, model, optimizer, torch.get_rng_state()
    (losses_e, eager, opt_e, rng_e), (losses_g, graphed, opt_g, rng_g) = runs[None], runs[False]
    assert losses_g == losses_e
    assert_same_training_state(eager, graphed, opt_e, opt_g)
    assert torch.equal(rng_g, rng_e)
