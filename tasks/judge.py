"""Stage task of the aligned experiment: one (detector, budget) run directory, every result judged by the referees.

torch and the referees (fastai) load inside the task body: a cached run never pays for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from eightgen.artifacts import Artifact, verified
from eightgen.chunks import Chunk
from eightgen.config import ExperimentConfig
from eightgen.rundir import AlignedRecord, RefereeRecord, check_target, write_run
from tasks.caching import STAGE_KEY, CachedStage
from tasks.collect import collected

JUDGE = CachedStage(None)


@task(name="collect-judged-results", **JUDGE.options)
def collect_judged_results(
    experiment: ExperimentConfig,
    chunks: list[Artifact],
    model: Artifact,
    dataset: Artifact,
    referees: Artifact,
    run_dir: Path,
    run_name: str,
    aligned: AlignedRecord,
    overwrite: bool = False,
    force: bool = False,
) -> Artifact:
    """Collect the chunks as collect-results does, add every referee's verdict, and write the run directory once."""
    import torch

    from eightgen.devices import pick_device
    from eightgen.judge.referees import load_referees, read_info, referee_columns

    check_target(run_dir, experiment, overwrite)
    _, key = JUDGE.here()
    referees_dir = verified(referees)
    refs = load_referees(referees_dir, pick_device(experiment.attack.device))

    def judge(chunk: Chunk, frame: pd.DataFrame) -> pd.DataFrame:
        start = frame["start_digit"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
        x_final, x0 = torch.from_numpy(chunk.trajectory.x_final), torch.from_numpy(chunk.x0)
        return referee_columns(refs, x_final, x0, start, experiment.dataset.target)

    run = collected(experiment, chunks, model, dataset, run_name, judge)
    record = run.record.model_copy(
        update={
            "referees": RefereeRecord(path=referees.path, sha256=referees.sha256, info=read_info(referees_dir)),
            "aligned": aligned,
        }
    )
    stamp = {STAGE_KEY: key, "referees": referees.sha256}
    return write_run(run_dir, record, run.results, run.shards, stamp)
