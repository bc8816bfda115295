"""The referee split, the referees (k-NN vote, 10-class classifiers), their results columns, and dead-unit collapse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_report import make_run_dir, rewrite_results
from test_metrics import hand_built  # the worked trajectory of the metrics tests
from torch import nn

from eightgen.attack.indicators import collapsed, last_linear
from eightgen.attack.metrics import results_frame
from eightgen.config import DatasetConfig, RefereeConfig
from eightgen.data.assembly import PARTS, assemble, load_assembled, save_assembled
from eightgen.data.sources import MnistData, load_mnist
from eightgen.errors import EightgenError
from eightgen.judge.referees import knn_vote, load_referees, referee_columns, train_referees
from eightgen.models.detector import PixelClassifier, SmallCNN
from reports.render import render_report

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(mnist_dir: Path) -> MnistData:
    return load_mnist(DatasetConfig(source="idx", mnist_dir=mnist_dir))


@pytest.fixture(scope="module")
def ref_cfg(mnist_dir: Path) -> DatasetConfig:
    return DatasetConfig(source="idx", mnist_dir=mnist_dir, pool_per_digit=8, referee_fraction=0.05, max_train=1500)


@pytest.fixture(scope="module")
def ref_dataset(data: MnistData, ref_cfg: DatasetConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refdata")
    save_assembled(assemble(data, ref_cfg), out)
    return out


@pytest.fixture(scope="module")
def referees_dir(ref_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("referees")
    train_referees(RefereeConfig(epochs=1, robust_steps=2, robust_eps=2.0, eval_images=40), load_assembled(ref_dataset), out, CPU)
    return out


def test_referee_split_is_disjoint_from_train_valid_and_pool(data: MnistData, ref_cfg: DatasetConfig) -> None:
    a = assemble(data, ref_cfg)
    assert a.parts == (*PARTS, "ref")
    ids = {part: set(zip(getattr(a, f"s_{part}"), getattr(a, f"i_{part}").tolist())) for part in a.parts}
    for part in PARTS:
        assert not ids["ref"] & ids[part], part
    assert len(ids["ref"]) == len(a.y_ref)
    assert set(np.unique(a.y_ref)) == set(range(10))
    assert np.array_equal(a.x_ref, data.images[a.i_ref])  # the IDX source indexes its own image array
    expected = sum(round((np.sum(data.labels == d) - 8) * 0.05) for d in range(10))
    assert len(a.y_ref) == expected


def test_referee_split_leaves_validation_and_pool_as_they_were(data: MnistData, ref_cfg: DatasetConfig) -> None:
    with_ref, without = assemble(data, ref_cfg), assemble(data, ref_cfg.model_copy(update={"referee_fraction": 0.0}))
    assert without.x_ref is None and without.parts == PARTS
    for part in ("valid", "pool"):
        assert np.array_equal(getattr(with_ref, f"i_{part}"), getattr(without, f"i_{part}"))
    assert len(with_ref.y_train) == len(without.y_train)  # both capped at max_train


def test_referee_split_round_trips(ref_dataset: Path) -> None:
    a = load_assembled(ref_dataset)
    assert a.x_ref is not None and a.x_ref.dtype == np.uint8 and len(a.x_ref) == len(a.y_ref) == len(a.i_ref) == len(a.s_ref)
    with np.load(ref_dataset / "dataset.npz") as npz:
        assert {"x_ref", "y_ref", "i_ref", "s_ref"} <= set(npz.files)


def _img(rows: slice, cols: slice) -> np.ndarray:
    x = np.zeros((28, 28), np.float32)
    x[rows, cols] = 1.0
    return x


def test_knn_vote_on_hand_made_images() -> None:
    eight, three, one = _img(slice(4, 24), slice(8, 20)), _img(slice(4, 24), slice(16, 20)), _img(slice(4, 24), slice(13, 15))
    refs = [(eight, 8)] * 5 + [(three, 3)] * 5 + [(one, 1)] * 5
    ref_x = torch.from_numpy(np.stack([r for r, _ in refs]).reshape(len(refs), -1))
    ref_y = torch.tensor([d for _, d in refs])
    near_eight = eight * 0.9
    near_one = one.copy()
    near_one[4:24, 12] = 1.0  # a thicker 1: nearest to the 1s, then the 3s, then the 8s
    queries = torch.from_numpy(np.stack([near_eight, three, near_one, near_one])[:, None])
    share, vote = knn_vote(queries, np.array([3, 3, 3, -1]), ref_x, ref_y, target=8, k=5)
    assert list(vote) == [True, False, False, False]
    assert share[0] == 1.0 and share[1] == 0.0
    assert share[2] == 0.0  # against 3s only: the 1s do not vote, the 3s are nearer than the 8s
    assert share[3] == 0.0  # noise-style vote among every digit: five 1s
    # Nearer the 8s than the 3s (squared distances 25.6 and 57.6): k = 8 takes all five 8s, then three 3s.
    mixed = torch.from_numpy((0.6 * eight + 0.4 * three)[None, None])
    share, vote = knn_vote(mixed, np.array([3]), ref_x, ref_y, target=8, k=8)
    assert share[0] == 5 / 8 and vote.tolist() == [True]
    share, vote = knn_vote(torch.from_numpy((0.4 * eight + 0.6 * three)[None, None]), np.array([3]), ref_x, ref_y, target=8, k=8)
    assert share[0] == 3 / 8 and vote.tolist() == [False]
    with pytest.raises(EightgenError, match="k = 16"):
        knn_vote(queries, np.array([3, 3, 3, -1]), ref_x, ref_y, target=8, k=16)


def test_referee_columns_are_present_and_consistent(referees_dir: Path, ref_dataset: Path) -> None:
    refs = load_referees(referees_dir, CPU)
    a = load_assembled(ref_dataset)
    pick = np.concatenate([np.flatnonzero(a.y_valid == d)[:4] for d in (1, 3, 8)])
    x = torch.from_numpy(a.x_valid[pick].astype(np.float32) / 255.0)[:, None]
    start = np.where(a.y_valid[pick] == 8, -1, a.y_valid[pick]).astype(np.int64)
    x_final = x.flip(-1)  # any other images will do
    cols = referee_columns(refs, x_final, x, start, target=8)
    assert len(cols) == len(pick)
    for name in ("cnn", "robust"):
        assert np.array_equal(cols[f"ref_{name}_is_target"], cols[f"ref_{name}_pred"] == 8)
        with torch.no_grad():
            p = getattr(refs, name)(x_final).softmax(dim=1).double().numpy()
        np.testing.assert_allclose(cols[f"ref_{name}_p_target"], p[:, 8], rtol=1e-5, atol=1e-7)
        assert np.array_equal(cols[f"ref_{name}_pred"], p.argmax(axis=1))
        assert not cols.loc[start < 0, f"ref_{name}_is_start"].any()
        assert np.array_equal(cols[f"ref_{name}_is_start_start"], (cols[f"ref_{name}_pred_start"] == start) & (start >= 0))
    assert np.array_equal(cols["knn_is_target"], cols["knn_share_target"] > 0.5)
    # Real 8s against real 3s and 1s: the k-NN vote on the untouched images is the true label almost always.
    truth = a.y_valid[pick] == 8
    assert np.mean(cols["knn_is_target_start"].to_numpy() == truth) >= 0.9
    mirrored = referee_columns(refs, x_final.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1), start, target=8)
    pd.testing.assert_frame_equal(mirrored, cols)  # three grey channels are judged as the one


def _dead_cnn() -> PixelClassifier:
    """A small CNN whose last conv block is silenced: BatchNorm shifts every unit far below zero before the ReLU."""
    torch.manual_seed(0)
    model = PixelClassifier(SmallCNN(1, 2, widths=(4, 8, 8)), (0.0,), (1.0,)).eval()
    last_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.bias.fill_(-1e4)
    return model


def test_collapse_is_seen_at_the_input_of_the_last_linear_layer() -> None:
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    dead = _dead_cnn()
    assert collapsed(dead, x, batch_size=2).all()
    with torch.no_grad():
        torch.testing.assert_close(dead(x), last_linear(dead).bias.expand(5, 2))  # logits are the bias alone
    torch.manual_seed(0)
    alive = PixelClassifier(SmallCNN(1, 2, widths=(4, 8, 8)), (0.0,), (1.0,)).eval()
    assert not collapsed(alive, x).any()
    # A layer that dies only for dark images: the flag follows the image.
    gate = nn.Sequential(nn.Flatten(), nn.Linear(784, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        gate[1].weight.fill_(1.0)
        gate[1].bias.fill_(-100.0)
    bright, dark = torch.full((1, 1, 28, 28), 0.5), torch.full((1, 1, 28, 28), 0.05)
    assert collapsed(gate, torch.cat([bright, dark])).tolist() == [False, True]
    with pytest.raises(EightgenError, match="no nn.Linear"):
        collapsed(nn.Sequential(nn.Flatten()), x)


def test_collapse_column_and_report_warning(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, "collapse", seeds=4, digits=(1, 2), dead_unit_share=0.0, rng_seed=3)
    results = pd.read_parquet(run_dir / "results.parquet")
    assert "warn-collapse" not in render_report([run_dir]).read_text()
    results["collapse_final"] = pd.array(results["success"].to_numpy(), dtype="boolean")
    rewrite_results(run_dir, results)
    html = render_report([run_dir]).read_text()
    assert 'id="warn-collapse"' in html
    n_success = int(results["success"].sum())
    assert f"{n_success} of the {n_success} successes" in html


def test_results_frame_records_collapse_or_null() -> None:
    traj, x0, meta = hand_built()
    unknown = results_frame(traj, x0, meta, model_name="m", method="gd", target=8)
    assert unknown["collapse_final"].isna().all()
    flags = np.arange(traj.n) % 2 == 0
    known = results_frame(traj, x0, meta, model_name="m", method="gd", target=8, collapse=flags)
    assert known["collapse_final"].tolist() == flags.tolist()
    with pytest.raises(EightgenError, match="collapse flags"):
        results_frame(traj, x0, meta, model_name="m", method="gd", target=8, collapse=flags[:-1])
