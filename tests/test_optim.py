"""Learning-rate scales, parameter groups, clipping after the step, the schedule."""

import math

import pytest
import torch
from torch import nn

from binaryconnect import optim
from binaryconnect.layers import BinaryConv2d, BinaryLinear, set_generator
from binaryconnect.optim import (
    clip_latent_,
    exponential_lr,
    fans,
    glorot_lr_scale,
    make_optimizer,
    param_groups,
    set_lr,
    step_groups_concurrently,
)
from helpers import assert_same_training_state, needs_cuda

cuda = needs_cuda


def test_glorot_scale_for_known_shapes():
    assert glorot_lr_scale(BinaryLinear(784, 1024)) == pytest.approx(1 / math.sqrt(1.5 / (784 + 1024)), rel=1e-12)
    conv = BinaryConv2d(128, 256, 3)
    assert fans(conv) == (128 * 9, 256 * 9)
    assert glorot_lr_scale(conv) == pytest.approx(math.sqrt((128 * 9 + 256 * 9) / 1.5), rel=1e-12)
    assert fans(BinaryConv2d(3, 8, (5, 3))) == (45, 120)


def _net(binarization="deterministic"):
    return nn.Sequential(BinaryLinear(20, 30, binarization=binarization), nn.BatchNorm1d(30), nn.ReLU(),
                         BinaryLinear(30, 5, bias=True, binarization=binarization), nn.BatchNorm1d(5))


def test_param_groups_scale_only_binarized_weights():
    net = _net()
    groups = param_groups(net, lr=0.01)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(net[0].weight)]["lr"] == pytest.approx(0.01 * glorot_lr_scale(net[0]))
    assert by_param[id(net[3].weight)]["lr"] == pytest.approx(0.01 * glorot_lr_scale(net[3]))
    for p in (net[3].bias, net[1].weight, net[1].bias, net[4].weight, net[4].bias):
        assert by_param[id(p)]["lr"] == 0.01 and by_param[id(p)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # float layers (the "no regularizer" baseline) use the plain learning rate
    assert all(g["lr_scale"] == 1.0 for g in param_groups(_net("none"), lr=0.01))


def test_lr_scale_none_and_unknown_names():
    groups = param_groups(_net(), lr=0.01, lr_scale="none")  # binarized weights unscaled
    assert all(g["lr"] == 0.01 and g["lr_scale"] == 1.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(_net().parameters()))
    with pytest.raises(ValueError, match="unknown lr_scale 'he'; choose one of glorot, none"):
        param_groups(_net(), lr=0.01, lr_scale="he")


def test_first_adam_step_moves_each_group_by_its_scaled_learning_rate():
    # Adam's first step is lr * g / (|g| + eps'): with the scale it must be lr * scale * sign(g) (to 1e-6).
    net = _net()
    opt = make_optimizer(net, lr=1e-4, eps=1e-12)
    before = net[0].weight.detach().clone()
    g = torch.randn_like(before)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net[0].weight.grad = g.clone()
    opt.step()
    step = net[0].weight.detach() - before
    inside = before.abs() < 1 - 1e-3  # away from the clip
    expected = -1e-4 * glorot_lr_scale(net[0]) * torch.sign(g)
    assert torch.allclose(step[inside], expected[inside], rtol=1e-4, atol=1e-7)


def test_step_clips_latent_weights_but_not_other_parameters():
    net = _net()
    opt = make_optimizer(net, lr=10.0)  # a huge step pushes everything far outside [-1, 1]
    for p in net.parameters():
        p.grad = -torch.ones_like(p)
    opt.step()
    for layer in (net[0], net[3]):
        assert layer.weight.max().item() == 1.0 and layer.weight.min().item() >= -1.0
    assert net[1].weight.max().item() > 1.0  # batch-norm gain is neither binarized nor clipped
    assert net[3].bias.max().item() > 1.0  # nor is a bias
    for p in net.parameters():  # and the other way: below -H, clipped to exactly -H
        p.grad = torch.ones_like(p)
    for _ in range(10):  # until Adam's momentum from the step above is overcome
        opt.step()
    for layer in (net[0], net[3]):
        assert layer.weight.min().item() == -1.0 and layer.weight.max().item() <= 1.0
    assert net[3].bias.min().item() < -1.0


def test_adam_is_pytorch_adam_with_its_defaults():
    """Without the learning-rate scale and away from the clip, make_optimizer's steps are torch.optim.Adam's
    with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay), the paper's Adam: compared over 5
    steps of random gradients, where betas and eps shape the update."""
    import copy

    torch.manual_seed(0)
    net = _net()
    with torch.no_grad():
        for layer in (net[0], net[3]):
            layer.weight.mul_(0.5)  # 5 steps of at most ~1e-3 each cannot reach the clip at +-1
    reference = copy.deepcopy(net)
    opt = make_optimizer(net, 1e-3, lr_scale="none")
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3, foreach=False)
    for step in range(5):
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            g = torch.randn_like(p) * 10 ** (step % 3 - 4)  # small gradients: eps matters at 1e-8, not 1e-4
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("foreach", [None, False, True])  # the device's choice (CPU: per weight), and each way
def test_clip_respects_H_and_skips_float_layers(foreach):
    def clip(model):  # the public function, or the private one made to go each way
        if foreach is None:
            return clip_latent_(model)
        return optim._clip_(optim._latent_weights_by_H(model), foreach)

    a = BinaryLinear(4, 4, H=0.5)
    b = BinaryLinear(4, 4, binarization="none")
    with torch.no_grad():
        a.weight.fill_(3.0)
        b.weight.fill_(3.0)
    clip(nn.Sequential(a, b))
    assert torch.all(a.weight == 0.5)
    assert torch.all(b.weight == 3.0)

    layers = [BinaryLinear(6, 5, H=h) for h in (0.5, 2.0, 0.5, 1.0)]  # H shared by some layers, not all
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, 3.0)
            layer.weight[0, :3] = torch.tensor([float("inf"), -float("inf"), -0.0])
    expected = [layer.weight.detach().clamp(-layer.H, layer.H) for layer in layers]
    clip(nn.Sequential(*layers))
    for layer, want in zip(layers, expected, strict=True):
        assert torch.equal(layer.weight, want)
        assert torch.equal(torch.signbit(layer.weight), torch.signbit(want))  # -0.0 stays -0.0, as clamp_ leaves it


def _mixed_net(device="cpu"):
    """Binary layers of two H (each a group of its own), a float layer and batch norms (the group "other")."""
    torch.manual_seed(11)
    return nn.Sequential(BinaryLinear(12, 16, H=0.5), nn.BatchNorm1d(16), nn.ReLU(),
                         BinaryLinear(16, 16, binarization="stochastic"), nn.BatchNorm1d(16), nn.ReLU(),
                         BinaryLinear(16, 8, binarization="none", bias=True),
                         BinaryLinear(8, 5, H=0.5, bias=True)).to(device)


def _train(net, stepper, device="cpu", steps=6, lr=0.3, delays=False):
    """A few steps at a learning rate large enough that Adam pushes latent weights past H (clipped).

    ``delays`` (CUDA): the backward pass queued behind a 10-million-cycle sleep of the current stream, and each
    group's step behind one on its own stream, with the weights copied on the current stream right after the
    step: a side stream that did not wait for the gradients, or a current stream that did not wait for the side
    streams, would read values not yet written."""
    opt = make_optimizer(net, lr=lr)
    set_generator(net, torch.Generator(device=device).manual_seed(4))
    if delays:
        opt.register_step_pre_hook(lambda o, args, kwargs: torch.cuda._sleep(10**7))
    g = torch.Generator().manual_seed(2)
    clipped, copies = 0, []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=g).to(device)
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=True)
        if delays:
            torch.cuda._sleep(10**7)
        loss.backward()
        stepper(opt)
        copies.append([p.detach().clone() for p in net.parameters()])  # on the current stream
        clipped += sum(int((m.weight.abs() == m.H).sum()) for m in net if getattr(m, "is_binary", False))
    opt.copies = copies
    return opt, clipped


def test_groups_stepped_one_by_one_train_bit_identically_to_one_step_and_are_clipped(one_thread):
    plain, grouped = _mixed_net(), _mixed_net()
    opt_p, clipped_p = _train(plain, lambda opt: opt.step())
    opt_g, clipped_g = _train(grouped, step_groups_concurrently)
    assert len(opt_g.param_groups) == 4  # three binarized weights, one group for the rest
    assert clipped_p > 100 and clipped_g == clipped_p  # the clip was reached, and applied group by group
    assert_same_training_state(plain, grouped, opt_p, opt_g)
    assert all(m.weight.abs().max() <= m.H for m in grouped if getattr(m, "is_binary", False))
    assert grouped[6].weight.abs().max() > 1.0  # the float layer is not clipped


def test_a_step_over_some_groups_clips_only_their_latent_weights():
    net = _mixed_net()
    opt = make_optimizer(net, lr=1e-3)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(5.0)
    groups = opt.param_groups
    first = next(g for g in groups if g["params"][0] is net[0].weight)
    opt.param_groups = [first]  # what step_groups_concurrently does for each group in turn
    opt.step()  # no gradients: Adam changes nothing, the hook clips
    opt.param_groups = groups
    assert torch.all(net[0].weight == 0.5)
    assert torch.all(net[3].weight == 5.0) and torch.all(net[7].weight == 5.0)  # other groups' weights untouched


def test_clipping_survives_loading_an_optimizer_state():
    # load_state_dict replaces the group dicts (and their list): the hook knows the latent weights by identity
    net = _mixed_net()
    opt = make_optimizer(net, lr=0.3)
    _train(_mixed_net(), lambda o: o.step())
    other = make_optimizer(_mixed_net(), lr=0.3)
    opt.load_state_dict(other.state_dict())
    with torch.no_grad():
        net[3].weight.fill_(7.0)
    for stepper in (lambda o: o.step(), step_groups_concurrently):
        stepper(opt)
        assert torch.all(net[3].weight == 1.0)
        with torch.no_grad():
            net[3].weight.fill_(7.0)


def test_one_group_is_one_plain_step():
    net = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    before = net[0].weight.detach().clone()
    step_groups_concurrently(opt)
    assert not torch.equal(net[0].weight, before)


@cuda
def test_groups_on_side_streams_train_bit_identically_on_a_gpu():
    plain, grouped = _mixed_net("cuda"), _mixed_net("cuda")
    opt_p, clipped_p = _train(plain, lambda opt: opt.step(), "cuda")
    opt_g, clipped_g = _train(grouped, step_groups_concurrently, "cuda", delays=True)
    assert clipped_p > 100 and clipped_g == clipped_p
    assert_same_training_state(plain, grouped, opt_p, opt_g)
    for after_p, after_g in zip(opt_p.copies, opt_g.copies, strict=True):  # what the next step reads, each step
        assert all(torch.equal(a, b) for a, b in zip(after_p, after_g, strict=True))


def test_exponential_schedule():
    lrs = [exponential_lr(e, 11, 1e-3, 1e-5) for e in range(11)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    ratios = [lrs[i + 1] / lrs[i] for i in range(10)]
    assert all(r == pytest.approx(10 ** -0.2) for r in ratios)  # a constant factor per epoch
    assert exponential_lr(0, 1, 1e-3, 1e-5) == 1e-3


def test_set_lr_keeps_the_scale():
    net = _net()
    opt = make_optimizer(net, lr=1e-3)
    set_lr(opt, 2e-5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-5 * g["lr_scale"])


def test_invalid_learning_rate():
    with pytest.raises(ValueError, match="positive"):
        make_optimizer(_net(), lr=-1.0)
