"""The denoiser, the DDIM sampler with guidance on x̂₀, partial noising, the Fréchet distance and diversity (tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import linalg
from torch import nn

from eightgen.config import DenoiserConfig, DiffusionConfig
from eightgen.diffusion.callbacks import WeightAverage
from eightgen.diffusion.sampler import (
    Guide,
    cosine_schedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_loss,
    gaussian_from_uniform,
    linear_schedule,
    make_schedule,
    noised_start,
    start_noise,
    start_timestep,
)
from eightgen.diffusion.unet import UNet
from eightgen.errors import EightgenError
from eightgen.judge.frechet import diversity, frechet_distance, penultimate
from eightgen.models.detector import SmallCNN

TINY = (4, 8, 8)


@pytest.fixture
def unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(TINY, emb_dim=16).eval()
    for p in model.out[-1].parameters():  # a zero output layer predicts no noise: give it some
        nn.init.normal_(p, std=0.05)
    return model


def brightness_detector(sign: float = 1.0) -> nn.Module:
    """A fixed two-class detector whose target logit grows with the brightness of the centre of the image."""
    lin = nn.Linear(784, 2)
    with torch.no_grad():
        w = torch.zeros(2, 28, 28)
        w[1, 8:20, 8:20] = sign * 0.5
        lin.weight.copy_(w.reshape(2, 784))
        lin.bias.copy_(torch.tensor([20.0, 0.0]))
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_unet_predicts_noise_of_the_input_shape(unet: UNet) -> None:
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])
    assert unet(x, t).shape == (3, 1, 28, 28)
    with pytest.raises(EightgenError, match="three positive widths"):
        UNet((4, 8))


def test_ddim_takes_the_asked_number_of_steps(unet: UNet) -> None:
    sched = linear_schedule(1000)
    assert ddim_timesteps(999, 50)[0] == 999 and ddim_timesteps(999, 50)[-1] == 0 and len(ddim_timesteps(999, 50)) == 50
    assert len(ddim_timesteps(599, 30)) == 30
    assert ddim_timesteps(3, 50) == [3, 2, 1, 0]  # never more steps than timesteps
    x = torch.randn(2, 1, 28, 28)
    out = ddim_sample(unet, x, 999, sched, steps=7, watch=brightness_detector(), record_every=3)
    assert len(out.timesteps) == 7
    assert out.p_target.shape == (2, 8)  # the start, then one x̂₀ per step
    assert list(out.snapshot_steps) == [0, 3, 6, 7]
    assert out.snapshots.shape == (2, 4, 1, 28, 28) and out.snapshots.dtype == torch.float16
    assert out.x_final.shape == (2, 1, 28, 28) and 0.0 <= float(out.x_final.min()) and float(out.x_final.max()) <= 1.0


def test_sampling_is_deterministic_and_per_image(unet: UNet) -> None:
    sched = linear_schedule(100)
    x = torch.randn(4, 1, 28, 28)
    guide = Guide(brightness_detector(), 1.0)
    a = ddim_sample(unet, x, 99, sched, steps=5, guide=guide)
    b = ddim_sample(unet, x, 99, sched, steps=5, guide=guide)
    one = ddim_sample(unet, x[1:2], 99, sched, steps=5, guide=guide)
    assert torch.equal(a.x_final, b.x_final)
    torch.testing.assert_close(a.x_final[1:2], one.x_final, atol=1e-5, rtol=0)


def test_guidance_raises_the_target_probability(unet: UNet) -> None:
    sched = linear_schedule(100)
    det = brightness_detector()
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    plain = ddim_sample(unet, x, 99, sched, steps=10, watch=det)
    guided = ddim_sample(unet, x, 99, sched, steps=10, guide=Guide(det, 3.0))
    away = ddim_sample(unet, x, 99, sched, steps=10, guide=Guide(brightness_detector(-1.0), 3.0), watch=det)
    assert bool((guided.p_target[:, -1] > plain.p_target[:, -1]).all())
    assert float(away.p_target[:, -1].mean()) < float(plain.p_target[:, -1].mean())
    # scale 0 is no guidance at all
    zero = ddim_sample(unet, x, 99, sched, steps=10, guide=Guide(det, 0.0))
    assert torch.equal(zero.x_final, plain.x_final)


def test_the_cosine_schedule_keeps_signal_longer_than_the_linear_one() -> None:
    cos, lin = cosine_schedule(1000).alpha_bar, linear_schedule(1000).alpha_bar
    assert bool((cos.diff() < 0).all()) and 0.9999 < float(cos[0]) < 1.0 and float(cos[-1]) < 1e-6
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal 2021, eq. 17
    assert float(cos[499]) == pytest.approx(f(500) / f(0), rel=1e-9)
    assert float(cos[599]) > 10 * float(lin[599])
    assert torch.equal(make_schedule("cosine", 50).alpha_bar, cosine_schedule(50).alpha_bar)
    with pytest.raises(EightgenError, match="unknown noise schedule"):
        make_schedule("sigmoid", 50)


def test_the_weight_average_follows_the_trained_weights() -> None:
    from types import SimpleNamespace

    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    avg = WeightAverage(0.9)
    avg.learn = SimpleNamespace(model=model)
    avg.before_fit()
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg.after_step()  # warm-up: decay min(0.9, 2/11)
    assert float(avg.shadow["weight"][0, 0]) == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        avg.after_step()
    avg.before_validate()  # validation sees the average, training the live weights again after it
    assert float(model.weight[0, 0]) == pytest.approx(1.0, abs=1e-6) and float(avg.shadow["weight"][0, 0]) == 1.0
    avg.after_validate()
    with torch.no_grad():
        model.weight.fill_(3.0)
    avg.after_step()
    avg.after_fit()
    assert float(model.weight[0, 0]) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)


def test_partial_noising() -> None:
    sched = linear_schedule(1000)
    x0 = torch.rand(2, 1, 28, 28)
    noise = torch.stack([start_noise("d2-s0000"), start_noise("d2-s0001")])
    same, t = noised_start(x0, noise, 0.0, sched)
    assert t == -1 and torch.equal(same, x0)
    out = ddim_sample(nn.Identity(), same, t, sched, steps=50)  # nothing to denoise: the start comes back
    assert torch.equal(out.x_final, x0) and out.timesteps == []
    noisy, t = noised_start(x0, noise, 0.6, sched)
    assert t == start_timestep(0.6, sched) == 599
    expected = sched.alpha_bar[599].sqrt() * (x0 * 2 - 1) + (1 - sched.alpha_bar[599]).sqrt() * noise
    torch.testing.assert_close(noisy, expected.float())
    assert start_timestep(1.0, sched) == 999
    assert torch.equal(start_noise("d2-s0000"), start_noise("d2-s0000")) and not torch.equal(noise[0], noise[1])
    with pytest.raises(EightgenError, match="noise level"):
        start_timestep(1.5, sched)


def test_noise_starts_map_uniform_pixels_to_gaussian_noise() -> None:
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    z = gaussian_from_uniform(u)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03
    assert float(gaussian_from_uniform(torch.tensor([0.5]))) == pytest.approx(0.0, abs=1e-6)
    order = torch.argsort(u)
    assert bool((z[order].diff() >= 0).all())  # monotone: the same image, brighter pixels stay brighter


def test_ddpm_loss_is_the_noise_prediction_error() -> None:
    sched = linear_schedule(10)
    x0 = torch.rand(8, 1, 28, 28)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  predicting no noise: the loss is the noise's mean square
    loss = ddpm_loss(zero, x0, sched, generator=torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(1.0, abs=0.05)


def test_frechet_distance_of_identical_and_shifted_sets() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))
    wide = rng.normal(size=(10, 50))  # more features than images: the n x n route
    assert frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(wide, wide + 0.5) == pytest.approx(50 * 0.25, rel=1e-6)
    shift = rng.normal(size=6)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # against the textbook d x d formula on two different sets
    b = rng.normal(size=(60, 6)) * 2.0 + 1.0
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * np.real(linalg.sqrtm(sa @ sb)))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(closed, rel=1e-6)
    with pytest.raises(EightgenError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_diversity_and_features() -> None:
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[1] += 1.0  # L2 28 from the zeros
    assert diversity(x, np.array([0, 0, 1, 1])) == pytest.approx(14.0)  # pairs: (0,1) 28, (2,3) 0
    assert diversity(x[:1], np.array([0])) != diversity(x[:1], np.array([0]))  # nan: no pair
    feats = penultimate(SmallCNN(1, 10).eval(), torch.rand(3, 1, 28, 28))
    assert feats.shape == (3, 64 * 7 * 7)


def test_the_denoiser_trains_with_fastai_and_loads_back(dataset_dir: Path, tmp_path: Path) -> None:
    from eightgen.diffusion.denoiser import load_denoiser, read_denoiser_info, train_denoiser

    cfg = DenoiserConfig(widths=TINY, emb_dim=16, timesteps=50, epochs=1, max_train=256, valid_images=64, batch_size=64, device="cpu", ema_decay=0.9)
    lines: list[str] = []
    train_denoiser(cfg, dataset_dir, tmp_path / "den", torch.device("cpu"), progress=lines.append)
    info = read_denoiser_info(tmp_path / "den")
    assert info["n_train"] == 256 and info["parameters"] > 0 and len(info["history"]) == 1 and info["train_seconds"] > 0
    assert lines and "denoiser epoch 1/1" in lines[0]
    model, sched = load_denoiser(tmp_path / "den", torch.device("cpu"))
    assert sched.timesteps == 50 and not model.training and torch.equal(sched.alpha_bar, cosine_schedule(50).alpha_bar)
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).shape == (2, 1, 28, 28)


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="distinct"):
        DiffusionConfig(guidance=("robust", "robust"))
    with pytest.raises(ValidationError):
        DiffusionConfig(start_level=0.0)
    cfg = DiffusionConfig()
    assert cfg.denoiser_dataset.max_train is None and cfg.aligned.dataset.max_train == 8000
    assert cfg.run_label.startswith("diffusion-") and cfg.run_label != DiffusionConfig(guidance_scale=3.0).run_label


def test_the_default_starts_tell_every_share_to_within_six_points() -> None:
    from scipy.stats import binomtest

    from tasks.denoise import n_samples

    cfg = DiffusionConfig()
    attack = cfg.aligned.attack
    noise, digits = attack.seeds, len(attack.start_digits) * attack.per_digit
    assert noise >= 320 and cfg.unguided_seeds >= 320 and n_samples(attack) == noise + digits
    stated = {noise, digits, cfg.unguided_seeds, cfg.check_per_class}  # every count a share of the report is taken over

    def widest(n: int) -> float:
        return max((lambda ci: (ci.high - ci.low) / 2)(binomtest(k, n).proportion_ci(method="exact")) for k in range(n + 1))

    assert max(widest(n) for n in stated) <= 0.06
    # the denoiser's settings are its cache key: a different schedule or average is a different denoiser
    assert DenoiserConfig().schedule == "cosine" and DenoiserConfig().ema_decay > 0
    assert DiffusionConfig(denoiser=DenoiserConfig(schedule="linear")).run_label != cfg.run_label


TINY_OPTIONS = [
    "--pool-per-digit", "3", "--valid-fraction", "0.01", "--referee-fraction", "0.05", "--max-train", "500", "--epochs", "1",
    "--adv-eps", "1", "--adv-steps", "2", "--referee-epochs", "1", "--referee-eps", "2", "--budget", "3", "--seeds", "3",
    "--steps", "6", "--starts-per-digit", "3", "--unguided-seeds", "30", "--check-per-class", "4", "--digits", "1,3", "--grid-seeds", "1", "--device", "cpu", "--denoiser-epochs", "1", "--denoiser-widths",
    "4,8,8", "--denoiser-max-train", "256", "--timesteps", "50", "--ddim-steps", "5", "--chunk-size", "5",
]


def test_the_diffusion_flow_judges_three_ways_and_comes_back_cached(prefect_harness, mnist_dir: Path, bucket: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The whole experiment (detectors, referees, denoiser, samples, judged runs, reports) with its cache, runs and result
    records in an S3-compatible store (moto's server): written there, read back from there, and Cached the second time."""
    import json

    import pandas as pd
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    from cli.diffusion import build_diffusion_config, summary_lines
    from cli.main import parser
    from eightgen.store import SCRATCH_ENV
    from flows.diffusion import diffusion_flow
    from prefect_api.records import task_run_states, wait_for_records
    from runtime.environment import STORAGE_BLOCK, records_block, save_records_block

    args = parser().parse_args(["diffusion", *TINY_OPTIONS, "--mnist-dir", str(mnist_dir), "--runs-root", f"{bucket}/runs", "--cache-dir", f"{bucket}/cache"])
    cfg = build_diffusion_config(args)
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    monkeypatch.setenv(STORAGE_BLOCK, records_block(cfg.aligned.cache_dir))
    save_records_block(cfg.aligned.cache_dir)
    states = []
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: records_block(cfg.aligned.cache_dir)}):
        for _ in range(2):
            state = diffusion_flow(cfg, return_state=True)
            assert state.is_completed(), state
            wait_for_records(state.state_details.flow_run_id)
            states.append(task_run_states(state.state_details.flow_run_id))
    html = cfg.run_dir / "diffusion.html"
    assert str(state.result()) == str(html) and str(html).startswith(f"{bucket}/runs/")
    records = (cfg.aligned.cache_dir / "prefect-results").fs.ls(f"{bucket[5:]}/cache/prefect-results")
    assert any("judge-three-ways-" in r for r in records) and any("train-denoiser-" in r for r in records)
    assert not (tmp_path / "cache").exists() and not Path("runs", cfg.run_dir.name).exists()
    page = html.read_text()  # read from the store
    for anchor in ("three-answer", "targets-table", "paths-table", "three-grid", "grid-noise", "grid-1", "grid-3", "fig-diffusion-p", "three-method"):
        assert f'id="{anchor}"' in page, anchor
    assert "http://" not in page and "https://" not in page
    summary = json.loads((cfg.run_dir / "diffusion.json").read_text())
    assert [t["key"] for t in summary["targets"]] == ["knn_guided", "frechet_guided", "unguided_tenth", "unguided_classes"]
    f = summary["frechet"]  # every row at one n: 3 noise starts allow 3; a floor and a ceiling on the same features
    assert f["n"] == 3 and len(f["reference_images"]["index"]) == len(f["floor_images"]["index"]) == len(f["ceiling_images"]["index"]) == 3
    assert not set(f["reference_images"]["index"]) & set(f["floor_images"]["index"]) and 0 <= f["floor"] < f["ceiling"] * 10
    assert {k: len(v) for k, v in f["starts"].items()} == {"noise": 3, "digit": 3}
    j = summary["judge_check"]
    assert set(j["variants"]) == {"as is", "blurred", "round trip"} and j["per_class"] == 4 and j["judge"] in ("knn", "robust", "cnn")
    assert all(r["recall"][c]["n"] == 4 for v in j["variants"].values() for r in v.values() for c in range(10))
    for anchor in ("judges-table", "frechet-reading"):
        assert f'id="{anchor}"' in page, anchor
    results = pd.read_parquet(str(cfg.run_dir / "results.parquet"))
    # 3 noise + 2 digits x 3 seeds = 9 starts, on each of five paths, every one judged
    assert results.groupby("path").size().to_dict() == {p: 9 for p in ("standard-gradient", "robust-gradient", "diffusion-none", "diffusion-standard", "diffusion-robust")}
    assert results["knn10_is_target"].notna().all() and results.loc[results.start_kind == "digit", "knn2_is_target"].notna().all()
    assert summary["sanity"]["n"] == 30  # ten unguided samples per noise start
    assert len(summary_lines(summary)) == 1 + 10 + 1 + 1 + 1 + 1 + 4
    # `eightgen runs` lists the bucket's experiments from this host's copy
    from cli.main import main

    assert main(["runs", "--runs-root", f"{bucket}/runs"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert listed == {cfg.run_dir.name: "diffusion", cfg.aligned.root_dir.name: "aligned"}, listed
    first, second = states
    assert len(first["sample-chunk"]) == 6  # 9 starts in chunks of 5, for each of three paths
    assert len(first["sample-noise-chunk"]) == 6  # 30 sanity samples in chunks of 5
    for name in ("train-denoiser", "sample-chunk", "sample-noise-chunk", "judge-three-ways"):
        assert set(second[name]) == {"Cached"}, (name, second[name])


def test_the_served_experiment_takes_the_served_data_and_folders(tmp_path: Path) -> None:
    from cli.serve import three_ways
    from eightgen.config import DatasetConfig, ExperimentConfig

    served = ExperimentConfig(dataset=DatasetConfig(source="idx", mnist_dir=tmp_path / "mnist"), runs_root=tmp_path / "runs", cache_dir=tmp_path / "cache")
    cfg = three_ways(served)
    assert (cfg.aligned.dataset.source, cfg.aligned.dataset.mnist_dir) == ("idx", tmp_path / "mnist")
    assert (cfg.aligned.runs_root, cfg.aligned.cache_dir) == (tmp_path / "runs", tmp_path / "cache")
    assert cfg.run_dir.parent == tmp_path / "runs" and cfg.denoiser == DiffusionConfig().denoiser


@pytest.mark.parametrize(
    "option, message",
    [
        (["--guidance", "robust,robust"], "guidance must name distinct detectors"),
        (["--guidance", "magic"], "guidance"),
        (["--start-level", "0"], "start_level"),
        (["--ddim-steps", "0"], "ddim_steps"),
        (["--denoiser-widths", "4,8"], "denoiser.widths"),
        (["--grid-seeds", "40"], "grid_seeds (40) exceeds"),
        (["--frechet-n", "1000"], "frechet_n (1000) exceeds"),
        (["--schedule", "sigmoid"], "schedule"),
    ],
)
def test_bad_settings_stop_the_command_in_one_line_before_any_work(option: list[str], message: str, capsys, tmp_path: Path) -> None:
    from cli.main import main

    rc = main(["diffusion", *option, "--cache-dir", str(tmp_path / "cache"), "--runs-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("eightgen: error:") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_frechet_samples_are_n_each_and_the_two_real_target_samples_disjoint() -> None:
    from eightgen.judge.threeways import frechet_samples

    kinds = np.array(["noise"] * 10 + ["digit"] * 12)
    y = np.array([8] * 9 + [1, 2, 3] * 5)
    plan = frechet_samples(kinds, y, 8)
    assert plan.n == 4  # half the 9 real targets
    assert not set(plan.reference) & set(plan.floor) and (y[plan.reference] == 8).all() and (y[plan.floor] == 8).all()
    assert (y[plan.ceiling] != 8).all() and len(plan.ceiling) == 4
    assert set(plan.starts["noise"]) <= set(range(10)) and set(plan.starts["digit"]) <= set(range(10, 22))
    again = frechet_samples(kinds, y, 8)
    assert np.array_equal(again.floor, plan.floor) and np.array_equal(again.starts["digit"], plan.starts["digit"])
    assert frechet_samples(kinds, y, 8, n=3).n == 3
    with pytest.raises(EightgenError, match="allow n ≤ 4"):
        frechet_samples(kinds, y, 8, n=5)


def test_knn_classes_is_the_majority_class_and_agrees_with_the_target_vote() -> None:
    from eightgen.judge.judgecheck import knn_classes
    from eightgen.judge.referees import knn_vote

    ref_y = torch.tensor([8, 8, 8, 1, 2, 3])
    ref_x = torch.zeros(6, 784)
    ref_x[:3] = 0.1  # near the faint image: three 8s
    ref_x[3:] = 0.9  # near the bright one: a 1, a 2 and a 3
    x = torch.stack([torch.full((1, 28, 28), 0.1), torch.full((1, 28, 28), 0.9)])
    assert knn_classes(x, ref_x, ref_y, k=3).tolist() == [8, -1]  # the bright image has no majority class
    _, is8 = knn_vote(x, np.array([-1, -1]), ref_x, ref_y, target=8, k=3)
    assert is8.tolist() == [True, False]


def test_the_judge_check_moves_the_one_in_ten_target_only_to_a_judge_that_passes() -> None:
    from reports.diffusion import judge_check

    y = np.repeat(np.arange(10), 100)
    good = y.copy()
    under = np.where(y == 8, 3, y)  # calls every real 8 a 3
    check = lambda knn, robust, cnn: {"y": y, "level": 0.5, "blur": 1.0, "images": {}, "calls": {v: {"knn": knn, "robust": robust, "cnn": cnn} for v in ("as is", "blurred", "round trip")}}  # noqa: E731
    j = judge_check(check(under, good, good), 8)
    assert j["passes"] == {"knn": False, "robust": True, "cnn": True} and j["judge"] == "robust"
    assert j["variants"]["round trip"]["knn"]["target_called"]["classes"][3] == 100 and j["variants"]["round trip"]["knn"]["recall"][8]["k"] == 0
    assert judge_check(check(good, good, good), 8)["judge"] == "knn"
    assert judge_check(check(under, under, good), 8)["judge"] == "cnn"
    assert judge_check(check(under, under, under), 8)["judge"] == "knn"  # none passes: the target stays with k-NN
