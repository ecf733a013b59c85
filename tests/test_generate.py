"""The text-to-image task (mmfast.tasks.generate): the GAN losses against their formulas (also at
saturated logits), the routing of each loss's gradient to its own network, the networks' shapes,
a few training steps, evaluation's metrics and the PNG grid. Tiny models only: fast on a CPU."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from mmfast.data import Shapes, Tokenizer
from mmfast.models import CLIPModel, ModelConfig
from mmfast.tasks import task_class
from mmfast.tasks.generate import (Discriminator, Generate, Generator, discriminator_loss, generator_loss,
                                   no_param_grad, save_grid)
from mmfast.train import TrainConfig

OPTIONS = {"width": 16, "noise_dim": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These ops are tiny: one thread is as fast on a quiet machine, and on a busy one (other
    processes on the cores) avoids OpenMP's threads waiting on each other (~50× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return TrainConfig(train_size=64, eval_size=12, out_dir=str(tmp_path_factory.mktemp("generate")))


@pytest.fixture(scope="module")
def setup(config):
    torch.manual_seed(0)
    tokenizer = Tokenizer(Shapes.vocabulary())
    model = CLIPModel(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()  # eval: no dropout
    task = Generate(model, tokenizer, config, torch.device("cpu"), options=OPTIONS)
    return model, tokenizer, task


def batch_of(task, n=8):
    data = task.train_data()
    return task.collate([data[i] for i in range(n)])


# ---- the losses ------------------------------------------------------------------------------------
def naive_d(real, fake):
    return -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()


def naive_g(logits, fake, real, lam):
    return -torch.log(torch.sigmoid(logits)).mean() + lam * (fake - real).abs().mean()


def stable_softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^−|x|): exact at any magnitude (another form than F.softplus)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def test_losses_match_their_formulas_float64():
    g = torch.Generator().manual_seed(1)
    real = 3 * torch.randn(37, generator=g, dtype=torch.float64)
    fake = 3 * torch.randn(29, generator=g, dtype=torch.float64)
    torch.testing.assert_close(discriminator_loss(real, fake), naive_d(real, fake), rtol=1e-12, atol=1e-12)
    images = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64)
    target = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64)
    for lam in (0.0, 1.0, 10.0):
        torch.testing.assert_close(generator_loss(fake, images, target, lam), naive_g(fake, images, target, lam),
                                   rtol=1e-12, atol=1e-12)
    # the L1 term alone: λ · mean |fake − real|
    l1 = generator_loss(torch.full((3,), 1e4, dtype=torch.float64), images, target, 2.0)
    torch.testing.assert_close(l1, 2.0 * (images - target).abs().mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_losses_and_gradients_at_saturated_logits(dtype):
    logits = torch.tensor([50.0, -50.0, 1000.0, -1000.0, 0.0, 30.0, -30.0], dtype=dtype)
    n = len(logits)
    real = logits.clone().requires_grad_()
    fake = logits.flip(0).clone().requires_grad_()
    d = discriminator_loss(real, fake)
    gr, gf = torch.autograd.grad(d, (real, fake))
    ref = (stable_softplus(-logits.double()).mean() + stable_softplus(logits.flip(0).double()).mean())
    assert torch.isfinite(d) and torch.isfinite(gr).all() and torch.isfinite(gf).all()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.double(), ref, **tol)
    # ∂/∂x softplus(−x) = −σ(−x), ∂/∂x softplus(x) = σ(x), each over the mean's n
    torch.testing.assert_close(gr, -torch.sigmoid(-logits) / n, **tol)
    torch.testing.assert_close(gf, torch.sigmoid(logits.flip(0)) / n, **tol)

    fake_logits = logits.clone().requires_grad_()
    images = torch.zeros(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    target = torch.ones(2, 3, 4, 4, dtype=dtype)
    g = generator_loss(fake_logits, images, target, 10.0)
    gl, gi = torch.autograd.grad(g, (fake_logits, images))
    assert torch.isfinite(g) and torch.isfinite(gl).all() and torch.isfinite(gi).all()
    torch.testing.assert_close(g.double(), stable_softplus(-logits.double()).mean() + 10.0, **tol)
    torch.testing.assert_close(gl, -torch.sigmoid(-logits) / n, **tol)
    torch.testing.assert_close(gi, torch.full_like(images, -10.0 / images.numel()), **tol)
    # the naive log-of-sigmoid form is what these avoid: it is infinite here
    assert not torch.isfinite(naive_d(logits.double(), logits.flip(0).double()))


# ---- the networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 48, 16])
def test_network_shapes_and_range(size):
    torch.manual_seed(0)
    gen, disc = Generator(20, 8, size, width=16), Discriminator(20, size, width=16)
    text, noise = torch.nn.functional.normalize(torch.randn(5, 20), dim=-1), 3 * torch.randn(5, 8)
    images = gen(text, noise)
    assert images.shape == (5, 3, size, size)
    assert images.min() >= 0 and images.max() <= 1
    assert disc(images, text).shape == (5,)


def test_no_param_grad_restores_flags():
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    with no_param_grad(layer):
        assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.requires_grad and not layer.bias.requires_grad


# ---- the task --------------------------------------------------------------------------------------
def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_each_loss_reaches_only_its_own_network(setup):
    model, _, task = setup
    model.requires_grad_(True)  # not frozen here: the task itself must keep gradients off the model
    try:
        batch = batch_of(task)
        d_params, g_params = list(task.discriminator.parameters()), list(task.generator.parameters())

        def backward(parts):
            task.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)  # the same noise each time
            out = task.losses(model, batch)
            assert set(out) == {"d", "g"} and all(v.dim() == 0 for v in out.values())
            sum(out[p] for p in parts).backward()
            assert all(p.grad is None for p in model.parameters())  # the frozen CLIP model: no gradient
            assert all(p.requires_grad for p in d_params)  # restored after the generator's pass
            return grads(d_params), grads(g_params)

        both_d, both_g = backward(["d", "g"])
        only_d, none_g = backward(["d"])
        none_d, only_g = backward(["g"])
        assert all(g is None for g in none_g) and all(g is None for g in none_d)
        for a, b in zip(both_d, only_d):
            torch.testing.assert_close(a, b)
        for a, b in zip(both_g, only_g):
            torch.testing.assert_close(a, b)
        assert all(g is not None and g.abs().sum() > 0 for g in both_d + both_g)
    finally:
        model.requires_grad_(False)
        task.zero_grad(set_to_none=True)


def test_losses_under_bf16_autocast_are_float32_and_finite(setup, config):
    model, tokenizer, _ = setup
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (what the Trainer passes on a GPU)
    task = Generate(model, tokenizer, config, torch.device("cpu"), autocast, options=OPTIONS)
    with autocast():
        out = task.losses(model, batch_of(task))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters())
    images = task.generate(model, ["a small red circle"])
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_a_few_steps_reduce_the_reconstruction_loss(setup, config):
    model, tokenizer, _ = setup
    torch.manual_seed(0)
    task = Generate(model, tokenizer, config, torch.device("cpu"), options=OPTIONS)
    batch = batch_of(task, 16)
    text = task._text(model, batch["ids"], batch["mask"])
    noise = torch.randn(16, OPTIONS["noise_dim"])

    def l1():
        with torch.no_grad():
            return (task.generator(text, noise) - batch["images"]).abs().mean().item()

    opt = torch.optim.Adam(task.parameters(), lr=2e-3, betas=(0.5, 0.999))
    before = l1()
    for _ in range(25):
        out = task.losses(model, batch)
        opt.zero_grad()
        (out["d"] + out["g"]).backward()
        opt.step()
        assert all(torch.isfinite(v) for v in out.values())
    assert l1() < 0.7 * before


def test_evaluate_baseline_chance_and_generate(setup, tmp_path):
    model, _, task = setup
    chance = task.chance()
    assert chance == pytest.approx({"generate_colour_accuracy": 1 / 6, "generate_shape_accuracy": 1 / 3,
                                    "generate_class_accuracy": 1 / 18})
    state = torch.get_rng_state()
    metrics = task.evaluate(model)
    base = task.baseline(model)
    assert torch.equal(state, torch.get_rng_state())  # fixed seeds, the global RNG untouched
    assert task.headline in metrics and set(chance) <= set(metrics) and set(chance) <= set(base)
    assert {"shuffled_colour_accuracy", "real_colour_accuracy"} <= set(metrics) | set(base)
    assert all(0 <= v <= 1 for v in list(metrics.values()) + list(base.values()))
    assert metrics == task.evaluate(model)  # deterministic
    prompts = ["a large red triangle", "a small cyan square"]
    a = task.generate(model, prompts, seed=5)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, task.generate(model, prompts, seed=5))
    # the evaluation captions are single-object test captions: held-out pairs only
    assert all(len(objs) == 1 for objs in task.eval_data().objects)
    assert len(task.held_out_captions()) <= 12
    if importlib.util.find_spec("matplotlib"):  # evaluate's picture (an optional extra)
        with open(f"{task.config.out_dir}/held_out.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_grid_png(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model, _, task = setup
    path = task.write_grid(model, str(tmp_path / "sub" / "grid.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    gray = save_grid(torch.rand(3, 1, 16, 16), ["a", "b", "c"], str(tmp_path / "g.png"), columns=2)
    assert open(gray, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="one title per image"):
        save_grid(torch.rand(2, 3, 8, 8), ["a"], str(tmp_path / "x.png"))


def test_grid_without_matplotlib_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_grid(torch.rand(1, 3, 8, 8), ["a"], str(tmp_path / "x.png"))


def test_registered_and_options_checked(setup, config):
    model, tokenizer, _ = setup
    assert task_class("generate") is Generate
    assert Generate.frozen_backbone and Generate.name == "generate"
    with pytest.raises(ValueError, match="unknown option"):
        Generate(model, tokenizer, config, torch.device("cpu"), options={"lambda": 1.0})
    with pytest.raises(ValueError, match="recon_weight"):
        Generate(model, tokenizer, config, torch.device("cpu"), options={"recon_weight": -1.0})
