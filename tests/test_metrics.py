"""Per-start results from trajectories: a hand-built case with known answers, and a real optimisation run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from eightgen.attack.metrics import results_frame
from eightgen.attack.optimize import optimize
from eightgen.config import AttackConfig
from eightgen.data.starts import make_starts
from eightgen.errors import EightgenError
from eightgen.trajectory import Trajectory

CONTRACT_COLUMNS = [
    "run_id", "model", "method", "start_kind", "start_digit", "source_index", "seed", "target", "steps",
    "p_target_start", "p_target_final", "success", "flip_step", "stays_flipped", "n_reflips", "step_p50",
    "step_p90", "censored", "early_stopped", "l2_final", "l2_at_flip", "linf_final", "grad_norm_final",
    "frac_outside_01", "grad_zero_final", "saturated_start",
]  # fmt: skip
INT64 = ["start_digit", "source_index", "flip_step", "step_p50", "step_p90", "stopped_step"]

# Logit margins z1 - z0 per step (7 recorded steps), one row per start:
MARGINS = np.array(
    [
        [-3, -1, 0.5, 1, 2.5, 2.5, 2.5],  # flips at 2 and holds (frozen at step 4); p>=0.9 from step 4
        [-1, 1, -1, 1, 1, -1, 1],  # flips at 1, leaves the target twice, ends on it
        [-20, -5, -4, -3, -2, -2, -2],  # never flips; saturated start (p ~ 2e-9)
        [15, 15, 3, 3, 1, -1, -1],  # starts flipped (saturated at p ~ 1 - 3e-7), leaves once, ends off
        [-1, 0, 0, -1, -1, -1, -1],  # p = 0.5 exactly at step 1 but the argmax (first max) stays 0
    ],
    dtype=np.float32,
)


def hand_built() -> tuple[Trajectory, np.ndarray, pd.DataFrame]:
    """A trajectory of five 3-channel starts whose every result can be worked out by hand."""
    n, c = MARGINS.shape[0], 3
    logits = np.stack([np.zeros_like(MARGINS), MARGINS], axis=-1)
    p = torch.from_numpy(logits).softmax(-1)[..., 1].numpy()
    x0 = np.full((n, c, 28, 28), 0.5, dtype=np.float32)
    x = x0.copy()
    x[0, :, 0, 0] += 0.5  # three pixels (one per channel) +0.5, plus one more:
    x[0, 0, 5, 5] += 0.5  # L2 = sqrt(4 * 0.25) = 1, Linf = 0.5
    x[1, 1, 3, 3] = 1.5  # +1.0 and -0.75, both outside [0, 1]: L2 = sqrt(1 + 0.5625) = 1.25
    x[1, 2, 7, 7] = -0.25
    x[3] += 0.25  # every pixel: L2 = 0.25 * sqrt(3 * 784), Linf = 0.25
    x[4, 2, 27, 27] -= 0.3
    traj = Trajectory(
        snapshot_steps=np.array([0, 3, 6], dtype=np.int32),
        snapshots=np.zeros((n, 3, c, 28, 28), dtype=np.float16),
        p_target=p,
        loss=(1 - p).astype(np.float32),
        logits=logits,
        flip_step=np.array([2, 1, -1, 0, -1], dtype=np.int32),
        flip_snapshot=np.zeros((n, c, 28, 28), dtype=np.float16),
        l2_at_flip=np.array([0.8, 0.9, np.nan, 0.0, np.nan], dtype=np.float32),
        x_final=x,
        grad_norm_final=np.array([0.5, 0.0, 1.0, 2.0, 0.0], dtype=np.float32),
        stopped_step=np.array([4, -1, -1, -1, -1], dtype=np.int32),
    )
    meta = pd.DataFrame(
        dict(
            run_id=["noise-s0000", "d2-s0000", "d2-s0001", "d8-s0000", "d3-s0000"],
            start_kind=["noise", "digit", "digit", "digit", "digit"],
            start_digit=pd.array([None, 2, 2, 8, 3], dtype="Int64"),
            source_index=pd.array([None, 10, 42, 7, 99], dtype="Int64"),
            seed=[0, 0, 1, 0, 0],
        )
    )
    return traj, x0, meta


def nullable(values: list[int | None]) -> list:
    """A column as a list with pd.NA for nulls, to compare with Int64 columns."""
    return [pd.NA if v is None else v for v in values]


def as_list(column: pd.Series) -> list:
    return [pd.NA if pd.isna(v) else v for v in column.tolist()]


def test_hand_built_trajectory_gives_the_worked_out_results() -> None:
    traj, x0, meta = hand_built()
    df = results_frame(traj, x0, meta, model_name="cnn", method="gd", target=8)
    assert set(CONTRACT_COLUMNS) <= set(df.columns)
    assert len(df) == 5 and df.run_id.tolist() == meta.run_id.tolist()
    assert (df.model == "cnn").all() and (df.method == "gd").all() and (df.target == 8).all() and (df.steps == 6).all()
    for column in INT64:
        assert str(df[column].dtype) == "Int64", column
    assert as_list(df.flip_step) == nullable([2, 1, None, 0, None])
    assert df.success.tolist() == [True, True, False, False, False]
    assert df.stays_flipped.tolist() == [True, False, False, False, False]
    assert df.n_reflips.tolist() == [0, 2, 0, 1, 0]
    assert df.censored.tolist() == [False, False, True, False, True]
    # sigmoid(0.5) = 0.62, sigmoid(2.5) = 0.92, sigmoid(1) = 0.73, sigmoid(3) = 0.95, sigmoid(0) = 0.5
    assert as_list(df.step_p50) == nullable([2, 1, None, 0, 1])
    assert as_list(df.step_p90) == nullable([4, None, None, 0, None])
    assert df.early_stopped.tolist() == [True, False, False, False, False]
    assert as_list(df.stopped_step) == nullable([4, None, None, None, None])
    assert df.steps_run.tolist() == [4, 6, 6, 6, 6]
    np.testing.assert_allclose(df.l2_final, [1.0, 1.25, 0.0, 0.25 * np.sqrt(3 * 784), 0.3], rtol=1e-6)
    np.testing.assert_allclose(df.linf_final, [0.5, 1.0, 0.0, 0.25, 0.3], rtol=1e-6)
    np.testing.assert_allclose(df.frac_outside_01, [0, 2 / (3 * 784), 0, 0, 0])
    np.testing.assert_allclose(df.l2_at_flip, [0.8, 0.9, np.nan, 0.0, np.nan], rtol=1e-6)
    assert df.grad_zero_final.tolist() == [False, True, False, False, True]
    assert df.saturated_start.tolist() == [False, False, True, True, False]
    np.testing.assert_allclose(df.p_target_start, 1 / (1 + np.exp(-MARGINS[:, 0].astype(np.float64))), rtol=1e-6)
    np.testing.assert_allclose(df.p_target_final, 1 / (1 + np.exp(-MARGINS[:, -1].astype(np.float64))), rtol=1e-6)
    assert as_list(df.start_digit) == nullable([None, 2, 2, 8, 3])
    assert as_list(df.source_index) == nullable([None, 10, 42, 7, 99])


def test_frame_survives_parquet(tmp_path: Path) -> None:
    traj, x0, meta = hand_built()
    df = results_frame(traj, x0, meta, model_name="cnn", method="gd", target=8)
    df.to_parquet(tmp_path / "results.parquet")
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert back.columns.tolist() == df.columns.tolist()
    assert as_list(back.flip_step) == as_list(df.flip_step) and str(back.flip_step.dtype) == "Int64"


def test_mismatched_inputs_are_errors() -> None:
    traj, x0, meta = hand_built()
    with pytest.raises(EightgenError, match="4 metadata rows"):
        results_frame(traj, x0, meta.iloc[:4], model_name="m", method="gd", target=8)
    with pytest.raises(EightgenError, match="starts have shape"):
        results_frame(traj, x0[:, :1], meta, model_name="m", method="gd", target=8)
    with pytest.raises(EightgenError, match="lacks columns"):
        results_frame(traj, x0, meta.drop(columns="seed"), model_name="m", method="gd", target=8)


class Tiny(nn.Module):
    """A fixed-seed one-hidden-layer net on pixels."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(8, 784, generator=g) * 3 / 28)
        self.w2 = nn.Parameter(torch.randn(2, 8, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x.flatten(1) @ self.w1.T) @ self.w2.T


def test_results_of_a_real_run_agree_with_its_trajectory() -> None:
    rng = np.random.default_rng(0)
    pool_y = np.repeat(np.arange(10, dtype=np.uint8), 3)
    pool_x = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    cfg = AttackConfig(method="pgd_l2", eps=0.3, steps=15, seeds=3, start_digits=(2, 5))
    starts = make_starts(cfg, pool_x, pool_y, np.arange(30), 1, torch.zeros(1), torch.ones(1))
    traj = optimize(Tiny(), starts.x0, cfg)
    df = results_frame(traj, starts.x0.numpy(), starts.meta, model_name="tiny", method=cfg.method, target=8)
    flipped = traj.flip_step >= 0
    assert flipped.any() and not flipped.all()  # both kinds of start are kept
    assert as_list(df.flip_step) == [int(f) if f >= 0 else pd.NA for f in traj.flip_step]
    assert df.censored.tolist() == (~flipped).tolist()
    assert df.l2_at_flip[~flipped].isna().all() and df.l2_at_flip[flipped].notna().all()
    assert (df.success == (traj.p_target[:, -1] > 0.5)).all()
    np.testing.assert_allclose(
        df.l2_final, np.linalg.norm((traj.x_final - starts.x0.numpy()).reshape(len(df), -1), axis=1), rtol=1e-5
    )
    assert (df.l2_final <= cfg.eps + 1e-5).all()
    assert df.early_stopped.sum() == 0 and df.stopped_step.isna().all()
