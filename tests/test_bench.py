"""The engine benchmark in its smallest mode, and the engine internals it relies on (folding, the unrecorded loop)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nets import bn_net
from torch import Tensor, nn

from benchmarks.bench import HEADLINE, TRUST_SPREAD, bench_starts, main, paired_ratio, seed_loop
from benchmarks.tolerance import METHODS as TOLERANCE_METHODS
from benchmarks.tolerance import VARIANTS, compare, tolerance
from eightgen.attack.execution import (
    ColumnConv2d,
    WholeImageConv,
    cached_plan,
    cpu_plan,
    cut_dead_taps,
    flatten_sequences,
    fold_batch_norms,
    pool_before_relu,
    single_plane,
)
from eightgen.attack.losses import per_sample_loss
from eightgen.attack.optimize import final_images, optimize
from eightgen.config import AttackConfig
from eightgen.models.detector import load_classifier

RATES = ("engine_rate", "engine_unrecorded_rate", "seed_loop_rate", "engine_pgd_rate", "torchattacks_pgd_rate")
FIELDS = {
    "arch", "device", "threads", "load_average_1m", "n", "steps", "repeats", *RATES, "recording_overhead",
    "seed_loop_n", "speedup_vs_seed_loop", "seed_loop_max_abs_diff", "seed_loop_same_class", "ratio_vs_torchattacks",
    "torchattacks_pgd_agree", "torchattacks_pgd_same_class", "torchattacks_self_agree",
    "flops_per_image_step", "matmul_flops_per_s", "roofline", "executed_flops_per_image_step", "executed_roofline",
    "full_budget_seconds", "early_stop_seconds",
    "early_stop_gain", "early_stop_flipped", "early_stop_same_flip_steps", "quality_steps", "min_l2_seconds",
    "min_l2_median_l2", "min_l2_success", "fmn_median_l2", "fmn_success", "ddn_median_l2", "ddn_success",
    "reference", "min_l2_vs_reference", "malloc_tuned",
    *(f"{k}_{suffix}" for k in HEADLINE for suffix in ("spread", "range", "trusted")),
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # small batches gain nothing from intra-op threads

@pytest.fixture(scope="module")
def model_dir(small_cnn) -> Path:
    """The session's small CNN, trained for one epoch on the small real-MNIST dataset."""
    return small_cnn.artifact.path


def test_quick_bench_reports_every_figure_consistently(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--quick", "--model-dir", str(model_dir), "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert set(r) == FIELDS
    assert r["arch"] == "small_cnn" and r["threads"] == 1 and r["device"] == "cpu" and r["repeats"] == 3
    assert all(r[k] > 0 for k in (*RATES, "flops_per_image_step", "matmul_flops_per_s"))
    for k in HEADLINE:
        low, high = r[f"{k}_range"]
        assert all(math.isfinite(v) for v in (r[k], r[f"{k}_spread"], low, high))
        assert low <= r[k] <= high and r[f"{k}_spread"] >= 0
        assert r[f"{k}_trusted"] is False  # three rounds are too few to trust a median
    assert err.startswith("benchmarks.bench: warning: not to be trusted") and all(k in err for k in HEADLINE)
    # Medians of per-round ratios, and medians of rates: a ratio of median rates lies within the rounds' range.
    within = lambda k, v: r[f"{k}_range"][0] * (1 - 1e-9) <= v <= r[f"{k}_range"][1] * (1 + 1e-9)  # noqa: E731
    assert within("speedup_vs_seed_loop", r["engine_rate"] / r["seed_loop_rate"])
    assert within("ratio_vs_torchattacks", r["engine_pgd_rate"] / r["torchattacks_pgd_rate"])
    assert within("roofline", r["flops_per_image_step"] * r["engine_rate"] / r["matmul_flops_per_s"])
    assert within("early_stop_gain", r["full_budget_seconds"] / r["early_stop_seconds"])
    low, high = r["recording_overhead_range"]
    assert low - 1e-9 <= r["engine_unrecorded_rate"] / r["engine_rate"] - 1 <= high + 1e-9
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9)  # noqa: E731
    assert close(r["executed_roofline"], r["roofline"] * r["executed_flops_per_image_step"] / r["flops_per_image_step"])
    # The small CNN's 28x28 and 14x14 maps leave no kernel tap dead: the plan executes every counted FLOP.
    assert r["executed_flops_per_image_step"] == r["flops_per_image_step"]
    assert r["reference"] in ("fmn", "ddn")
    ref = r[f"{r['reference']}_median_l2"]
    if r["min_l2_median_l2"] is not None and ref is not None:
        assert close(r["min_l2_vs_reference"], r["min_l2_median_l2"] / ref)
    else:
        assert r["min_l2_vs_reference"] is None  # a median over mostly failed attacks is infinite: no ratio
    assert r["torchattacks_pgd_agree"] >= 0.75 and r["torchattacks_pgd_same_class"] >= 0.85  # see test_crosscheck
    assert 0 <= r["torchattacks_self_agree"] <= 1
    assert all(0 <= r[k] <= 1 for k in ("min_l2_success", "fmn_success", "ddn_success", "early_stop_flipped", "seed_loop_same_class"))
    # The engine's seed method is the notebook's loop, batched: same images after the same steps.
    assert r["seed_loop_max_abs_diff"] < 1e-4 and r["seed_loop_same_class"] == 1.0


def test_paired_ratios_take_the_median_of_each_rounds_ratio() -> None:
    # Nine rounds; in the last, a burst of load slows the numerator's run tenfold: the median ignores it.
    disturbed = paired_ratio(np.array([2.0] * 8 + [20.0]), np.ones(9))
    assert (disturbed.median, disturbed.spread, disturbed.low, disturbed.high) == (2.0, 0.0, 2.0, 20.0)
    assert disturbed.rounds == 9 and disturbed.trusted
    # Load that slows both runs of a round alike leaves its ratio as it is.
    both = paired_ratio(np.array([3.0, 30.0, 6.0, 3.0, 9.0]), np.array([1.0, 10.0, 2.0, 1.0, 3.0]), scale=0.5)
    assert (both.median, both.spread, both.trusted) == (1.5, 0.0, True)
    # Ratios 1..9: quartiles 3 and 7 around the median 5, an IQR of 0.8 of the median: too wide to trust.
    wide = paired_ratio(np.arange(1.0, 10.0), np.ones(9))
    assert (wide.median, wide.low, wide.high) == (5.0, 1.0, 9.0)
    assert math.isclose(wide.spread, 0.8) and wide.spread > TRUST_SPREAD and not wide.trusted
    assert not paired_ratio(np.ones(3), np.ones(3)).trusted  # too few rounds, however close


def test_bad_settings_exit_with_a_one_line_error(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--quick", "--model-dir", str(model_dir), "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "benchmarks.bench: error: --n must be positive, got 0"
    assert main(["--quick", "--model-dir", str(model_dir), "--n", "100000"]) == 2
    assert "pool of" in capsys.readouterr().err


def test_starts_are_real_non_targets_in_turn(dataset_dir: Path) -> None:
    from eightgen.data.assembly import load_assembled

    x0 = bench_starts(dataset_dir, 18, 1)
    data = load_assembled(dataset_dir)
    pool = torch.from_numpy(data.x_pool.astype(np.float32) / 255)
    digits = [int(data.y_pool[(pool == x[0]).flatten(1).all(1)][0]) for x in x0]
    assert digits == [0, 1, 2, 3, 4, 5, 6, 7, 9] * 2


def test_seed_loop_is_the_engine_seed_method_one_image_at_a_time(model_dir: Path, dataset_dir: Path) -> None:
    model, _ = load_classifier(model_dir, torch.device("cpu"))
    x0 = bench_starts(dataset_dir, 4, 1)
    traj = optimize(model, x0, AttackConfig(method="seed", steps=4))
    torch.testing.assert_close(seed_loop(model, x0, 4), torch.from_numpy(traj.x_final), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_folding_batch_norms_keeps_the_function_and_the_original(arch: str) -> None:
    net = bn_net(arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norms(net)
    assert folded is not net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_nothing_to_fold_means_the_same_model() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()
    assert fold_batch_norms(net) is net  # the batch norm follows a ReLU, not the convolution
    train_mode = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert fold_batch_norms(train_mode) is train_mode  # batch statistics, not running ones


@pytest.mark.parametrize(
    "extra",
    [dict(method="seed"), dict(method="pgd_l2", eps=2.0), dict(method="min_l2"), dict(method="gd", loss="ce", early_stop=2)],
)
def test_the_unrecorded_loop_moves_the_pixels_exactly_as_the_recorded_one(extra: dict) -> None:
    net = bn_net("small_cnn")
    x0 = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cfg = AttackConfig(steps=8, record_every=3, **extra)
    np.testing.assert_array_equal(final_images(net, x0, cfg).numpy(), optimize(net, x0, cfg).x_final)


def biased_mlp(bias: float) -> nn.Module:
    """A two-layer perceptron whose logits are pushed toward (bias, -bias): p(8) ~ exp(-2 bias)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 2)).eval().requires_grad_(False)
    with torch.no_grad():
        mlp[3].bias.copy_(torch.tensor([bias, -bias]))
    return mlp


def test_input_gradients_are_those_of_plain_autograd() -> None:
    mlp = biased_mlp(2.0)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    traj = optimize(mlp, x0, AttackConfig(method="gd", steps=1))
    x = torch.from_numpy(traj.x_final).requires_grad_(True)
    (grad,) = torch.autograd.grad(per_sample_loss("l1_softmax", mlp(x)).sum(), x)
    norm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float64).float()
    np.testing.assert_array_equal(traj.grad_norm_final, norm.numpy())


def test_backward_passes_of_saturated_starts_run_on_normal_floats() -> None:
    # p(8) ~ 1e-40: unscaled, every gradient in the backward pass would be subnormal (slow on CPUs, fewer bits).
    mlp = biased_mlp(46.0)
    seen: list[Tensor] = []
    for layer in (mlp[1], mlp[3]):
        layer.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_out[0].detach().abs()))
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    traj = optimize(mlp, x0, AttackConfig(method="gd", steps=1))
    assert (traj.p_target < 1e-38).all()
    values = torch.cat([g.flatten() for g in seen])
    assert values[values > 0].min() >= torch.finfo(torch.float32).tiny
    # The input gradient itself is that of float64 arithmetic from the same d loss / d logits, to float32 precision.
    x = torch.from_numpy(traj.x_final)
    z = mlp(x).requires_grad_(True)
    (dz,) = torch.autograd.grad(per_sample_loss("l1_softmax", z).sum(), z)
    x64 = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(copy.deepcopy(mlp).double()(x64), x64, dz.double())
    np.testing.assert_allclose(traj.grad_norm_final, grad.flatten(1).norm(dim=1).numpy(), rtol=1e-4)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_the_engines_execution_plan_computes_the_models_function_and_gradient(arch: str) -> None:
    # Batch norms folded, then channels-last (small CNN) or unfold + matmul single-plane convolutions (resnet).
    net = bn_net(arch)
    x0 = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    traj = optimize(net, x0, AttackConfig(method="gd", loss="ce", steps=1))
    np.testing.assert_allclose(traj.logits[:, 0], net(x0).numpy(), rtol=1e-4, atol=1e-4)
    x = torch.from_numpy(traj.x_final).requires_grad_(True)
    (grad,) = torch.autograd.grad(per_sample_loss("ce", net(x)).sum(), x)
    np.testing.assert_allclose(traj.grad_norm_final, grad.flatten(1).norm(dim=1).numpy(), rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding", "bias"), [(7, 2, 3, False), (3, 1, 1, True), (5, 2, 0, True), ((3, 5), (1, 2), (2, 1), True)])
def test_single_plane_convolutions_as_one_matrix_product(kernel, stride, padding, bias: bool, channels_last: bool) -> None:
    conv = nn.Conv2d(1, 8, kernel, stride=stride, padding=padding, bias=bias).requires_grad_(False)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out, columns = conv(x), ColumnConv2d(conv, channels_last=channels_last)(x)
    if conv.stride != (1, 1):  # strided kernels are computed here, in the layout asked for; stride 1 by oneDNN
        assert columns.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(columns, out, rtol=1e-5, atol=1e-5)
    for g in (torch.rand_like(out), torch.rand_like(out).contiguous(memory_format=torch.channels_last)):
        expected = torch.autograd.grad(out, x, g, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(columns, x, g, retain_graph=True)[0], expected, rtol=1e-5, atol=1e-5)


def test_a_relu_in_place_after_the_matrix_product_costs_no_copy() -> None:
    conv = nn.Conv2d(1, 8, 3, padding=1).requires_grad_(False)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    for channels_last in (False, True):
        out = torch.relu_(ColumnConv2d(conv, channels_last=channels_last)(x))
        assert type(out.grad_fn).__name__ == "ReluBackward0"  # not CopySlices: the output is no view


def test_pooling_moves_before_the_relu_and_the_gradient_stays() -> None:
    torch.manual_seed(0)
    block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())  # noqa: E731
    net = nn.Sequential(block(1, 4), nn.MaxPool2d(2), block(4, 4), nn.MaxPool2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    out = net(x)
    flat = flatten_sequences(copy.deepcopy(net))
    assert pool_before_relu(flat) == 2
    kinds = [type(m).__name__ for m in flat]
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear"]
    g = torch.randn_like(out)
    torch.testing.assert_close(flat(x), out, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(flat(x), x, g)[0], torch.autograd.grad(out, x, g)[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_the_cpu_plan_runs_single_planes_as_products_and_leaves_the_model_alone(arch: str) -> None:
    net = bn_net(arch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(4), requires_grad=True)
    plan = cpu_plan(net, x[:1])
    assert any(isinstance(m, ColumnConv2d) for m in plan.modules())
    assert not any(single_plane(m) for m in plan.modules())
    g = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plan(x), net(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(plan(x), x, g)[0], torch.autograd.grad(net(x), x, g)[0], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_the_plan_is_reused_until_the_model_changes() -> None:
    net = bn_net("small_cnn")
    x = torch.rand(1, 1, 28, 28)
    plan = cached_plan(net, x)
    assert cached_plan(net, x) is plan
    with torch.no_grad():
        next(net.parameters()).mul_(2.0)  # an in-place change of the weights
    changed = cached_plan(net, x)
    assert changed is not plan
    torch.testing.assert_close(changed(x), net(x), rtol=1e-4, atol=1e-5)


def test_dead_taps_are_cut_only_where_they_only_read_padding() -> None:
    net = bn_net("resnet18")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):  # non-trivial statistics for the head's batch norms too
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(6), requires_grad=True)
    plan = cpu_plan(net, x[:1])
    # The last stage's maps are 1x1: its strided 3x3 on a 2x2 map keeps its lower-right 2x2 taps, its three 3x3
    # convolutions their centre taps, and its strided 1x1 shortcut one pixel: all five are linear layers.
    assert sorted(m.weight.shape[1] for m in plan.modules() if isinstance(m, WholeImageConv)) == [256, 512, 512, 512, 1024]
    # The head's global pools see one pixel, and its batch norms fold into the linear layers after them.
    assert not any(isinstance(m, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d)) for m in plan.modules())
    g = torch.randn(4, 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(plan(x), net(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(plan(x), x, g)[0], torch.autograd.grad(net(x), x, g)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("size", "kernel", "stride", "padding"), [(1, 3, 1, 1), (2, 3, 2, 1), (2, 3, 1, 1), (3, 5, 2, 2), (1, 7, 2, 3), (4, 3, 3, 1)])
def test_cutting_dead_taps_keeps_every_output(size: int, kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(size * 100 + kernel * 10 + stride)
    net = nn.Sequential(nn.Conv2d(3, 4, kernel, stride=stride, padding=padding)).requires_grad_(False)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    plan = copy.deepcopy(net)
    cut_dead_taps(plan, x[:1])
    out = net(x)
    torch.testing.assert_close(plan(x), out, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(plan(x), x, g)[0], torch.autograd.grad(out, x, g)[0], rtol=1e-5, atol=1e-6)


def test_tolerance_compares_success_and_flip_steps() -> None:
    from types import SimpleNamespace

    base = SimpleNamespace(flip_step=np.array([3, -1, 7, 2, -1]))
    other = SimpleNamespace(flip_step=np.array([3, 4, 9, -1, -1]))
    r = compare(base, other)
    assert r["starts"] == 5 and r["success_base"] == 0.6 and r["success_variant"] == 0.6
    assert r["success_changed"] == 0.4  # start 1 flipped only in the variant, start 3 only in the base
    assert r["flip_step_changed"] == 0.5 and r["flip_step_max_shift"] == 2  # of starts 0 and 2, flipped in both


def test_tolerance_runs_every_method_and_variant_and_cpu_variants_change_nothing(model_dir: Path, dataset_dir: Path) -> None:
    rows = tolerance(model_dir, dataset_dir, seeds=2, steps=4, device=torch.device("cpu"))
    assert {(r["method"], r["variant"]) for r in rows} == {(m, v) for m in TOLERANCE_METHODS for v in VARIANTS}
    assert all(r["starts"] == 20 for r in rows)  # 2 noise starts and 2 of each of the 9 other digits
    assert all(r["success_changed"] == 0 and r["flip_step_changed"] == 0 for r in rows)


def test_tolerance_command_needs_cuda(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.tolerance import main as tolerance_main

    assert tolerance_main(["--device", "cpu"]) == 2
    assert "CUDA options" in capsys.readouterr().err
