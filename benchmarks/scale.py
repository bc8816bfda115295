"""How `eightgen run` scales with the number of starts: wall time and peak resident memory per stage.

    python -m benchmarks.scale --mnist-dir ../shared/datasets/mnist-full [--sizes 100,1000,10000] [--huge] [--dask 10000]

Every size is one real `eightgen run` subprocess (quick preset, `--steps`, every test image of a class held out as a
start), all sharing one cache, so the detector trains once (in a first, small run outside the measurement). The
starts of size N are N // 10 images of each start digit (at most the smallest class's test images) and noise for the
rest. Stage times come from the Prefect database afterwards (first start to last end of each stage's task runs);
peak memory is the largest resident set of the run's process (its Dask workers, with --dask) sampled every 50 ms
inside each stage's window. The local Prefect server is a separate process and is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.startup import prefect_env, stop_kept_server, when

STAGES = {  # stage -> the task whose runs make it up
    "assemble": "assemble-dataset",
    "train": "train-classifier",
    "optimise": "optimize-chunk",
    "collect": "collect-results",
    "report": "render-report",
}
PER_START = ("optimise", "collect", "report")  # the stages whose work grows with the starts
SMALLEST_TEST_CLASS = 892  # MNIST's 5s: the most starts every start digit can have
SAMPLE_SECONDS = 0.05
MIB = 1 << 20


def grid(n: int, per_class_cap: int = SMALLEST_TEST_CLASS) -> tuple[int, int]:
    """(noise seeds, starts per digit) that make n starts over 9 start digits: n // 10 per digit, noise for the rest."""
    if n < 10:
        raise ValueError(f"{n} starts: at least 10 (one per start digit and noise)")
    per_digit = min(n // 10, per_class_cap)
    return n - 9 * per_digit, per_digit


@dataclass
class Sampler:
    """Resident-set samples of a process tree: (time, role, bytes), role main or worker (the Prefect server left out)."""

    pid: int
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            now = time.time()
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    if proc.pid != self.pid and "runtime.prefect_server" in " ".join(proc.cmdline()):
                        continue
                    self.samples.append((now, "main" if proc.pid == self.pid else "worker", proc.memory_info().rss))
                except psutil.Error:
                    continue
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop.set()

    def peak(self, start: float, end: float) -> int:
        """The largest single-process resident set sampled in [start, end] (0 if none)."""
        return max((b for t, _, b in self.samples if start <= t <= end), default=0)


def stage_windows(db: Path, start: float, end: float) -> dict[str, tuple[float, float, str]]:
    """Per stage: (first start, last end, final state) of its task runs inside [start, end], from a Prefect sqlite db."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT name, start_time, end_time, state_name FROM task_run WHERE end_time IS NOT NULL").fetchall()
    out: dict[str, tuple[float, float, str]] = {}
    for stage, task in STAGES.items():
        spans = [
            (when(a or b), when(b), s) for name, a, b, s in rows
            if name.startswith(task) and start <= when(b) <= end + 1
        ]
        if spans:
            states = sorted({s for _, _, s in spans})
            out[stage] = (min(a for a, _, _ in spans), max(b for _, b, _ in spans), "/".join(states))
    return out


def folder_bytes(path: Path) -> int:
    """Bytes of every file under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measured_run(options: list[str], env: dict[str, str], home: Path, run_dir: Path, cache: Path) -> dict:
    """One `eightgen run` subprocess with its resident set sampled; per-stage seconds, peaks and states, bytes on disk."""
    attacks_before = folder_bytes(cache / "attacks")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    out, err = proc.communicate()
    ended = time.time()
    sampler.stop()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"benchmarks.scale: eightgen run failed:\n{err[-3000:]}")
    time.sleep(1.0)  # the kept server's last writes
    windows = stage_windows(home / "prefect.db", started, ended)
    stages = {
        stage: {"seconds": b - a, "peak_mib": sampler.peak(a, b) / MIB, "state": s} for stage, (a, b, s) in windows.items()
    }
    return {
        "wall": ended - started,
        "peak_mib": max((b for _, _, b in sampler.samples), default=0) / MIB,
        "stages": stages,
        "run_bytes": folder_bytes(run_dir),
        "chunk_bytes": folder_bytes(cache / "attacks") - attacks_before,
    }


def exponent(x: list[float], y: list[float]) -> float:
    """The slope of a least-squares line through (log x, log y)."""
    if len(x) < 2 or min(y) <= 0:
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def table(rows: dict[int, dict], steps: int, title: str) -> str:
    """The measured sizes side by side: per stage seconds and peak MiB, throughput, bytes per start, and the fits."""
    sizes = sorted(rows)
    lines = [title, f"{'starts':<34}" + "".join(f"{n:>14,}" for n in sizes)]

    def line(label: str, values: list[str]) -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>14}" for v in values))

    for stage in STAGES:
        if not any(stage in rows[n]["stages"] for n in sizes):
            continue
        line(f"{stage}: seconds", [f"{rows[n]['stages'][stage]['seconds']:.1f}" if stage in rows[n]["stages"] else "—" for n in sizes])
        line(f"{stage}: peak RSS MiB", [f"{rows[n]['stages'][stage]['peak_mib']:.0f}" if stage in rows[n]["stages"] else "—" for n in sizes])
    line("whole run: wall seconds", [f"{rows[n]['wall']:.1f}" for n in sizes])
    line("whole run: peak RSS MiB", [f"{rows[n]['peak_mib']:.0f}" for n in sizes])
    rate = {n: n * steps / rows[n]["stages"]["optimise"]["seconds"] for n in sizes if "optimise" in rows[n]["stages"]}
    line("image-steps/s (optimise)", [f"{rate[n]:,.0f}" if n in rate else "—" for n in sizes])
    line("run dir bytes per start", [f"{rows[n]['run_bytes'] / n:,.0f}" for n in sizes])
    line("chunk cache bytes per start", [f"{rows[n]['chunk_bytes'] / n:,.0f}" for n in sizes])
    if len(sizes) < 2:
        lines.append(json.dumps({str(n): rows[n] for n in sizes}))
        return "\n".join(lines)
    lines.append("log-log exponent against starts (time ≈ 1, memory ≈ 0 are linear time and flat memory):")
    for stage in PER_START:
        have = [n for n in sizes if stage in rows[n]["stages"]]
        t = exponent(have, [rows[n]["stages"][stage]["seconds"] for n in have])
        m = exponent(have, [rows[n]["stages"][stage]["peak_mib"] for n in have])
        lines.append(f"  {stage:<10} time {t:5.2f}   peak memory {m:5.2f}")
    lines.append(f"  {'whole run':<10} time {exponent(sizes, [rows[n]['wall'] for n in sizes]):5.2f}   "
                 f"peak memory {exponent(sizes, [rows[n]['peak_mib'] for n in sizes]):5.2f}")
    lines.append(json.dumps({str(n): rows[n] for n in sizes}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the sizes asked for (threads, and optionally the largest on a 2-worker Dask cluster); print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", type=Path, required=True, help="MNIST IDX files with training and test splits")
    parser.add_argument("--sizes", default="100,1000,10000", help="numbers of starts (comma-separated)")
    parser.add_argument("--huge", action="store_true", help="add 100,000 starts")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dask", type=int, metavar="N", help="also run N of the sizes' starts on a 2-worker Dask LocalCluster and compare results")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder, removed)")
    args, extra = parser.parse_known_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")} | ({100_000} if args.huge else set()))
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="eightgen-scale-"))
    cache, runs, home = tmp / "cache", tmp / "runs", tmp / "home"
    base = ["--preset", "quick", "--mnist-dir", str(args.mnist_dir.resolve()), "--pool-per-digit", "all",
            "--steps", str(args.steps), "--cache-dir", str(cache), "--runs-root", str(runs), *extra]
    env = prefect_env(home)
    load = [os.getloadavg()[0]]
    rows: dict[int, dict] = {}
    try:
        # the dataset and detector, once, outside the measurement
        measured_run([*base, "--seeds", "10", "--starts-per-digit", "1", "--run-name", "prepare"], env, home, runs / "prepare", cache)
        for n in sizes:
            seeds, per_digit = grid(n)
            name = f"n{n}"
            rows[n] = measured_run([*base, "--seeds", str(seeds), "--starts-per-digit", str(per_digit), "--run-name", name], env, home, runs / name, cache)
            load.append(os.getloadavg()[0])
            print(f"{n:,} starts: {rows[n]['wall']:.1f} s, peak {rows[n]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
        title = (f"eightgen run --preset quick --steps {args.steps}, threads  (load average {min(load):.1f}-{max(load):.1f}, "
                 f"{os.cpu_count()} cores)")
        print(table(rows, args.steps, title))
        if args.dask:
            n = args.dask
            if n not in rows:
                sys.exit(f"benchmarks.scale: --dask {n} is not one of the sizes {sizes}")
            seeds, per_digit = grid(n)
            opts = [*base, "--seeds", str(seeds), "--starts-per-digit", str(per_digit), "--run-name", f"n{n}-dask", "--task-runner", "dask", "--force"]
            dask = measured_run(opts, env, home, runs / f"n{n}-dask", cache)
            a = pd.read_parquet(runs / f"n{n}" / "results.parquet")
            b = pd.read_parquet(runs / f"n{n}-dask" / "results.parquet")
            equal = a.equals(b)
            print(table({n: dask}, args.steps, f"the same {n:,} starts on a 2-worker Dask LocalCluster (--force: every chunk recomputed)"))
            print(f"results.parquet equal to the thread runner's: {equal}")
            if not equal:
                numbers = a.select_dtypes("number").columns
                diff = (a[numbers] - b[numbers]).abs().max().max()
                print(f"  largest difference in a number column {diff:.3g}; success differs on {(a.success != b.success).sum()} starts")
    finally:
        stop_kept_server(home)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
