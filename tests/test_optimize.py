"""The optimisation engine on fixed-seed tiny models: direction, independence, budgets, recording, errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from eightgen.attack.losses import per_sample_loss
from eightgen.attack.optimize import optimize, snapshot_steps
from eightgen.config import AttackConfig
from eightgen.errors import EightgenError
from eightgen.trajectory import Trajectory, concat, load_trajectory, save_trajectory


class Tiny(nn.Module):
    """A one-hidden-layer net built only from elementwise products and per-row sums.

    Unlike matmul / convolution kernels, whose CPU algorithm (and so the last bits of a row's result) can change
    with the batch size, these ops give every row the same bits in any batch: with this model the engine's own
    batch independence can be checked with torch.equal.
    """

    def __init__(self, channels: int = 1, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = channels * 28 * 28
        self.w1 = nn.Parameter(torch.randn(hidden, d, generator=g) * 3 / d**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(2, hidden, generator=g))
        self.b2 = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu((x.flatten(1)[:, None, :] * self.w1).sum(-1) + self.b1)
        return (h[:, None, :] * self.w2).sum(-1) + self.b2


class ConvNet(nn.Sequential):
    """A small conv / batch-norm / linear classifier, as trained models look."""

    def __init__(self, channels: int = 1, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__(
            nn.Conv2d(channels, 8, 5, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 12 * 12, 2),
        )
        with torch.no_grad():
            self[1].running_mean.fill_(0.1)
            self[1].running_var.fill_(0.5)


class Normalised(nn.Module):
    """Like PixelClassifier: forward(x) = net((x - mean) / std) with mean/std buffers [1, C, 1, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


class Counting(nn.Module):
    """Counts the images it is asked about, and can poison chosen rows of chosen calls with NaN."""

    def __init__(self, net: nn.Module, poison: dict[int, list[int]] | None = None) -> None:
        super().__init__()
        self.net, self.poison, self.calls, self.images = net, poison or {}, 0, 0

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        if self.calls in self.poison:
            bad = torch.zeros(len(x), 1)
            bad[self.poison[self.calls]] = float("nan")
            z = z + bad
        self.calls += 1
        self.images += len(x)
        return z


METHODS = {
    "seed": dict(method="seed"),
    "gd": dict(method="gd"),
    "gd_ce": dict(method="gd", loss="ce"),
    "gd_margin": dict(method="gd", loss="margin", lr=0.1),
    "pgd_linf": dict(method="pgd_linf", eps=0.1),
    "pgd_l2": dict(method="pgd_l2", eps=2.0),
    "min_l2": dict(method="min_l2"),
}


def cfg_of(name: str, **extra) -> AttackConfig:
    """An attack config of one of the METHODS cases."""
    return AttackConfig(**{**dict(steps=20, record_every=3), **METHODS[name], **extra})


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def x0() -> Tensor:
    """Twelve uniform-noise starts."""
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return Tiny()


def assert_same(a: Trajectory, b: Trajectory) -> None:
    """Every field of two trajectories is bit-identical (NaN where NaN)."""
    for f in fields(Trajectory):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name, strict=True)


def step_grad(model: nn.Module, x: Tensor, loss: str) -> Tensor:
    """The input gradient of the summed per-start loss, computed independently of the engine."""
    x = x.clone().requires_grad_(True)
    per_sample_loss(loss, model(x)).sum().backward()
    return x.grad


@pytest.mark.parametrize("name", list(METHODS))
def test_target_probability_rises(tiny: Tiny, x0: Tensor, name: str) -> None:
    traj = optimize(tiny, x0, cfg_of(name))
    assert traj.p_target[:, -1].mean() > traj.p_target[:, 0].mean()
    assert (traj.flip_step >= 0).any()


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_neighbours_do_not_matter(tiny: Tiny, x0: Tensor, name: str) -> None:
    whole = optimize(tiny, x0, cfg_of(name))
    for k in (1, 5):
        assert_same(whole.rows(slice(0, k)), optimize(tiny, x0[:k], cfg_of(name)))


def test_batch_neighbours_on_a_conv_net_agree_to_rounding(x0: Tensor) -> None:
    # Convolution and GEMM kernels may choose another algorithm for another batch size, so a row's result can
    # differ in its last bits; the engine itself couples no rows (see the Tiny model's exact test).
    model = ConvNet()
    whole = optimize(model, x0, cfg_of("gd_ce"))
    part = optimize(model, x0[:3], cfg_of("gd_ce"))
    np.testing.assert_allclose(part.logits, whole.logits[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(part.x_final, whole.x_final[:3], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(part.flip_step, whole.flip_step[:3])


@pytest.mark.parametrize("name", ["seed", "pgd_l2", "min_l2"])
def test_same_inputs_same_bits(x0: Tensor, name: str) -> None:
    assert_same(optimize(ConvNet(), x0, cfg_of(name)), optimize(ConvNet(), x0, cfg_of(name)))


@pytest.mark.parametrize("name", ["gd", "gd_ce", "pgd_linf", "pgd_l2", "min_l2"])
def test_clamped_methods_stay_in_the_unit_box(tiny: Tiny, name: str) -> None:
    # Starts on the box edges so that unclamped steps would leave it.
    x0 = (torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    traj = optimize(tiny, x0, cfg_of(name, lr=0.5 if name != "pgd_linf" else 0.05))
    for images in (traj.x_final, traj.snapshots, traj.flip_snapshot):
        assert images.min() >= 0 and images.max() <= 1


def test_seed_method_is_unclamped_and_scaled_by_std_squared() -> None:
    std = (0.229, 0.224, 0.225)
    model = Normalised(Tiny(channels=3), mean=(0.485, 0.456, 0.406), std=std)
    x0 = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    cfg = AttackConfig(method="seed", steps=1, lr=30.0)
    traj = optimize(model, x0, cfg)
    expected = x0 - 30.0 * model.std**2 * step_grad(model, x0, "l1_softmax")
    torch.testing.assert_close(torch.from_numpy(traj.x_final), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, x0 - 30.0 * step_grad(model, x0, "l1_softmax"))


@pytest.mark.parametrize("name", ["pgd_linf", "pgd_l2"])
def test_pgd_stays_within_eps(tiny: Tiny, x0: Tensor, name: str) -> None:
    cfg = cfg_of(name, lr=1.0, steps=10)  # a step far larger than eps: only the projection keeps the budget
    traj = optimize(tiny, x0, cfg)
    d = (traj.x_final - x0.numpy()).reshape(len(x0), -1)
    norms = np.abs(d).max(axis=1) if name == "pgd_linf" else np.sqrt((d.astype(np.float64) ** 2).sum(axis=1))
    assert norms.max() <= cfg.eps + 1e-5
    assert norms.max() > 0.5 * cfg.eps


def test_min_l2_never_reports_a_non_flipping_success(tiny: Tiny, x0: Tensor) -> None:
    traj = optimize(tiny, x0, cfg_of("min_l2", steps=30))
    success = traj.logits[:, -1].argmax(axis=1) == 1
    assert success.any() and not success.all()
    x_final = torch.from_numpy(traj.x_final)
    with torch.no_grad():
        together = tiny(x_final).argmax(dim=1).numpy()
        alone = np.array([int(tiny(x_final[i : i + 1]).argmax()) for i in range(len(x_final))])
    assert (together[success] == 1).all() and (alone[success] == 1).all()
    # The output is the smallest flipping iterate: never larger than the first flipping one.
    l2_final = np.sqrt(((traj.x_final - x0.numpy()).astype(np.float64) ** 2).reshape(len(x0), -1).sum(axis=1))
    assert (l2_final[success] <= traj.l2_at_flip[success] + 1e-5).all()
    # And the last recorded step describes that output image.
    np.testing.assert_allclose(traj.logits[:, -1], tiny(x_final).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_early_stopping_freezes_starts_without_moving_flip_steps(tiny: Tiny, x0: Tensor) -> None:
    full = optimize(tiny, x0, cfg_of("gd"))
    counting = Counting(tiny)
    early = optimize(counting, x0, cfg_of("gd", early_stop=3))
    np.testing.assert_array_equal(early.flip_step, full.flip_step)
    stopped = early.stopped_step >= 0
    assert stopped.any() and not stopped.all()
    assert (early.stopped_step[stopped] >= early.flip_step[stopped] + 2).all()
    assert counting.images < len(x0) * (early.steps + 1)  # frozen starts stop costing compute
    for i in np.flatnonzero(stopped):
        s = early.stopped_step[i]
        np.testing.assert_array_equal(early.p_target[i, : s + 1], full.p_target[i, : s + 1])
        assert (early.p_target[i, s:] == early.p_target[i, s]).all()
        assert (early.logits[i, s:] == early.logits[i, s]).all()
        later = early.snapshot_steps >= s
        assert (early.snapshots[i, later] == early.snapshots[i, later][-1]).all()
    never = ~stopped
    assert_same(early.rows(never), full.rows(never))


def test_early_stopping_of_every_start_still_fills_the_trajectory(tiny: Tiny, x0: Tensor) -> None:
    pushed = optimize(tiny, x0, cfg_of("gd", steps=5))
    best = int(pushed.p_target[:, -1].argmax())
    assert pushed.p_target[best, -1] > 0.5
    starts = torch.from_numpy(pushed.x_final[[best] * 3])  # already classified target
    traj = optimize(tiny, starts, cfg_of("gd", steps=12, early_stop=2))
    assert (traj.stopped_step == 1).all() and (traj.flip_step == 0).all()
    assert (traj.p_target[:, 1:] == traj.p_target[:, 1:2]).all()
    assert (traj.snapshots[:, 1:] == traj.snapshots[:, -1:]).all()


@pytest.mark.parametrize("name", ["seed", "min_l2"])
def test_flip_step_is_the_first_recorded_step_over_one_half(tiny: Tiny, x0: Tensor, name: str) -> None:
    traj = optimize(tiny, x0, cfg_of(name))
    over = traj.p_target > 0.5
    expected = np.where(over.any(axis=1), over.argmax(axis=1), -1)
    np.testing.assert_array_equal(traj.flip_step, expected)
    on = traj.logits.argmax(axis=-1) == 1
    np.testing.assert_array_equal(traj.flip_step, np.where(on.any(axis=1), on.argmax(axis=1), -1))


def test_recorded_values_match_an_independent_recomputation(tiny: Tiny, x0: Tensor) -> None:
    cfg = cfg_of("gd_ce")
    traj = optimize(tiny, x0, cfg)
    assert traj.snapshot_steps.tolist() == snapshot_steps(20, 3) == [0, 3, 6, 9, 12, 15, 18, 20]
    np.testing.assert_array_equal(traj.snapshots[:, 0], x0.numpy().astype(np.float16))
    np.testing.assert_array_equal(traj.snapshots[:, -1], traj.x_final.astype(np.float16))
    x_final = torch.from_numpy(traj.x_final)
    logits = tiny(x_final).detach()
    np.testing.assert_array_equal(traj.logits[:, -1], logits.numpy())
    np.testing.assert_array_equal(traj.p_target[:, -1], logits.softmax(1)[:, 1].numpy())
    np.testing.assert_array_equal(traj.loss[:, -1], per_sample_loss("ce", logits).numpy())
    grad_norm = step_grad(tiny, x_final, "ce").flatten(1).norm(dim=1)
    np.testing.assert_allclose(traj.grad_norm_final, grad_norm.numpy(), rtol=1e-6)
    flipped = traj.flip_step >= 0
    assert flipped.any() and not flipped.all()  # both kinds of start are checked below
    assert np.isnan(traj.l2_at_flip[~flipped]).all() and (traj.flip_snapshot[~flipped] == 0).all()
    l2 = np.linalg.norm((traj.flip_snapshot.astype(np.float32) - x0.numpy()).reshape(len(x0), -1), axis=1)
    np.testing.assert_allclose(traj.l2_at_flip[flipped], l2[flipped], atol=0.02)


def test_model_settings_are_restored_and_no_parameter_gradients_accumulate(x0: Tensor) -> None:
    model = ConvNet().train()
    model[0].weight.requires_grad_(False)
    traj = optimize(model, x0, cfg_of("gd"))
    assert model.training and not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # The model ran in eval mode: batch norm used its running statistics.
    model.eval()
    np.testing.assert_allclose(traj.logits[:, 0], model(x0).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_compile_and_bf16_are_cuda_options_that_leave_cpu_runs_unchanged(tiny: Tiny, x0: Tensor) -> None:
    plain = optimize(tiny, x0, cfg_of("pgd_l2"))
    assert_same(plain, optimize(tiny, x0, cfg_of("pgd_l2", compile=True, autocast_bf16=True)))


def test_progress_reports_every_step(tiny: Tiny, x0: Tensor) -> None:
    seen: list[int] = []
    optimize(tiny, x0, cfg_of("gd", steps=7), progress=seen.append)
    assert seen == list(range(1, 8))


@pytest.mark.parametrize(("poison", "message"), [({0: [1, 3]}, "step 0: .* 2 of 5"), ({4: [2]}, "step 4: .* 1 of 5")])
def test_nan_model_output_is_an_error_naming_the_step(tiny: Tiny, x0: Tensor, poison: dict, message: str) -> None:
    with pytest.raises(EightgenError, match=message):
        optimize(Counting(tiny, poison), x0[:5], cfg_of("gd"))


def test_unknown_loss_is_an_error(tiny: Tiny, x0: Tensor) -> None:
    with pytest.raises(EightgenError, match="unknown loss 'hinge'"):
        per_sample_loss("hinge", torch.zeros(3, 2))
    cfg = cfg_of("gd").model_copy(update={"loss": "hinge"})  # model_copy skips validation, as a stale object might
    with pytest.raises(EightgenError, match="unknown loss 'hinge'"):
        optimize(tiny, x0, cfg)


def test_bad_starts_and_models_are_errors(tiny: Tiny, x0: Tensor) -> None:
    with pytest.raises(EightgenError, match="float32 tensor"):
        optimize(tiny, x0.double(), cfg_of("gd"))
    with pytest.raises(EightgenError, match=r"no starts to optimise \(empty batch\)"):
        optimize(tiny, x0[:0], cfg_of("gd"))
    with pytest.raises(EightgenError, match=r"logits \[4, 3\]"):
        optimize(nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), x0[:4], cfg_of("gd"))


def test_losses_match_their_definitions() -> None:
    z = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 4.0]])
    p1 = z.softmax(1)[:, 1]
    torch.testing.assert_close(per_sample_loss("l1_softmax", z), 1 - p1)  # mean(|p0 - 0|, |p1 - 1|) = 1 - p1
    torch.testing.assert_close(per_sample_loss("ce", z), -p1.log())
    torch.testing.assert_close(per_sample_loss("margin", z), z[:, 0] - z[:, 1])


def test_trajectories_round_trip_through_npz(tiny: Tiny, x0: Tensor, tmp_path: Path) -> None:
    a = optimize(tiny, x0[:5], cfg_of("min_l2"))
    b = optimize(tiny, x0[5:], cfg_of("min_l2"))
    joined = concat([a, b])
    assert_same(joined, optimize(tiny, x0, cfg_of("min_l2")))
    ids = np.array([f"r{i}" for i in range(len(x0))])
    path = save_trajectory(joined, ids, tmp_path / "trajectories.npz")
    back, back_ids = load_trajectory(path)
    assert_same(back, joined)
    np.testing.assert_array_equal(back_ids, ids)
    with pytest.raises(EightgenError, match="different steps"):
        concat([a, optimize(tiny, x0[:2], cfg_of("min_l2", steps=4))])
    with pytest.raises(EightgenError, match="3 run ids"):
        save_trajectory(joined, ids[:3], tmp_path / "x.npz")


def test_missing_or_corrupt_trajectory_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(EightgenError, match="no such trajectory file"):
        load_trajectory(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(EightgenError, match="junk.npz: corrupt trajectory file"):
        load_trajectory(junk)
    other = tmp_path / "other.npz"
    np.savez_compressed(other, run_id=np.array(["a"]))
    with pytest.raises(EightgenError, match=r"other.npz: not a trajectory file \(missing .*snapshots"):
        load_trajectory(other)


def test_each_method_carries_its_defaults_and_the_config_names_every_method() -> None:
    from typing import get_args

    from eightgen.attack.methods import METHODS, loss_name, step_size
    from eightgen.config import Method as MethodName

    assert set(METHODS) == set(get_args(MethodName))
    for name, rule in METHODS.items():
        cfg = AttackConfig(method=name, eps=1.0)
        assert (step_size(cfg), loss_name(cfg)) == (rule.default_lr, rule.default_loss)
        given = AttackConfig(method=name, eps=1.0, lr=0.125, loss="margin")
        assert (step_size(given), loss_name(given)) == (0.125, "margin")


def test_min_l2_grows_its_radius_until_the_start_flips_then_shrinks_it() -> None:
    from eightgen.attack.methods import MinL2

    rule = MinL2(0.5, 10, 2.0)
    x0 = torch.tensor([0.0, 0.25, 1.0]).reshape(3, 1, 1, 1).expand(3, 1, 28, 28).contiguous()
    # its farthest box corner: 28 (all ones from zeros), 28 * 0.75, 28; capped at eps
    assert rule.radius(x0).tolist() == [2.0, 2.0, 2.0]
    assert MinL2(0.5, 10, 100.0).radius(x0).tolist() == pytest.approx([28.0, 21.0, 28.0])
    radius = torch.tensor([1.0, 2.0, 4.0])
    got = rule.adapt(radius, torch.tensor([True, False, True]))
    assert got.tolist() == pytest.approx([1.0 - rule.gamma, 2.0 * (1.0 + rule.gamma), 4.0 * (1.0 - rule.gamma)])


def test_the_update_rules_load_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, eightgen.attack.methods; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
