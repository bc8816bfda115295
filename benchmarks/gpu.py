"""The GPU check: agreement with the CPU, engine speed, scale and the denoiser, each part under its own time limit.

Every part (benchmarks/gpu_parts.py) runs in a process of its own, stopped at its limit; one that hangs or fails
is reported with its reason and the rest still run. Without CUDA the same parts run on the CPU at a tiny size.
Writes one JSON (--out) and prints a table, the goals beside what was measured.

    python -m benchmarks.gpu [--out gpu-check.json] [--size auto|tiny|full] [--device auto] [--parts a,b]
                             [--budget SECONDS] [--limit [PART=]SECONDS] [--mnist-dir DIR] [--inject PART=hang|raise]
                             [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PARTS = ("agreement", "syncs", "speed_small_cnn", "speed_resnet18", "speed_resnet34", "scale", "denoiser")
# Seconds each part may take on the GPU (full size); together with start-up they fit the 8-minute budget.
LIMITS = {"agreement": 75, "syncs": 40, "speed_small_cnn": 70, "speed_resnet18": 75, "speed_resnet34": 80, "scale": 80, "denoiser": 45}
TINY_LIMIT = 60.0
BUDGET = {"full": 470.0, "tiny": 240.0}
KILL_GRACE = 5.0  # seconds a stopped part's process group gets to go before it is killed
INJECT_ENV = "EIGHTGEN_GPU_INJECT"  # benchmarks.gpu_parts reads it (kept in step there)


@dataclass(frozen=True)
class Goal:
    """A figure the GPU should reach (on an H200), where it is found in the parts' results."""

    text: str
    target: str
    part: str
    key: str
    at_least: float | None = None
    below: float | None = None

    def measured(self, parts: dict) -> float | None:
        """The figure, None if its part did not give it."""
        result = (parts.get(self.part) or {}).get("result") or {}
        if self.key == "seconds_1e6x50":
            runs = [r for r in result.get("runs", []) if r["starts"] >= 1_000_000 and r["steps"] == 50]
            return runs[0]["seconds"] if runs else None
        return result.get(self.key)

    def verdict(self, value: float | None, judged: bool) -> str:
        """met / missed, or why it is not judged."""
        if not judged:
            return "not judged (not a full-size CUDA run)"
        if value is None:
            return "not measured"
        ok = (self.at_least is None or value >= self.at_least) and (self.below is None or value < self.below)
        return "met" if ok else "missed"


GOALS = (
    Goal("small CNN engine, image-steps/s", ">= 1e7", "speed_small_cnn", "best_rate", at_least=1e7),
    Goal("resnet18 engine, share of the bf16 matmul rate", ">= 50%", "speed_resnet18", "best_roofline_bf16", at_least=0.5),
    Goal("10^6 starts x 50 steps (small CNN), seconds", "< 60", "scale", "seconds_1e6x50", below=60.0),
)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_part(name: str, args: argparse.Namespace, size: str, limit: float, folder: Path) -> dict:
    """Run one part in its own process group, stopped after `limit` seconds: its status, time, reason and result."""
    out = folder / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_parts", name, "--size", size, "--device", args.device,
           "--limit", f"{limit:.1f}", "--out", str(out)]  # fmt: skip
    if args.mnist_dir is not None:
        cmd += ["--mnist-dir", str(args.mnist_dir)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else "failed"
        reason = None if status == "ok" else _last_line(err) or f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        status, reason = "timeout", f"stopped at its limit of {limit:.0f} s"
    try:
        result = json.loads(out.read_text())["result"]
    except (OSError, ValueError, KeyError):
        result = None
    if status != "ok" and err.strip():
        sys.stderr.write(f"--- {name} ({status}), the end of its stderr:\n{err[-2000:]}\n")
    return {"status": status, "seconds": round(time.perf_counter() - started, 2), "limit_seconds": limit, "reason": reason, "result": result}


def environment(size: str, device: str) -> dict:
    """The machine the check ran on."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "size": size,
        "device": device if device != "auto" else ("cuda" if cuda else "cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_count": os.cpu_count(),
    }


def table(report: dict) -> str:
    """The report as the text the check prints."""
    env = report["environment"]
    lines = [f"GPU check: size {env['size']}, device {env['device']} ({env['gpu'] or 'no GPU'}), torch {env['torch']}, "
             f"{report['wall_seconds']:.0f} s of {report['budget_seconds']:.0f}"]  # fmt: skip
    for name, part in report["parts"].items():
        passed = (part["result"] or {}).get("passed")
        check = "" if passed is None else (" passed" if passed else " FAILED its check")
        lines.append(f"\n[{name}] {part['status']}{check}, {part['seconds']:.1f} s (limit {part['limit_seconds']:.0f} s)"
                     + (f": {part['reason']}" if part["reason"] else ""))  # fmt: skip
        lines += [f"    {row}" for row in (part["result"] or {}).get("table", [])]
    lines.append("\ngoals (an H200, full size):")
    for goal in report["goals"]:
        value = goal["measured"]
        lines.append(f"    {goal['goal']}: target {goal['target']}, measured {'n/a' if value is None else f'{value:.3g}'} -> {goal['verdict']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON report (gpu-check.json)")
    p.add_argument("--size", choices=("auto", "tiny", "full"), default="auto", help="auto: full with CUDA, else tiny")
    p.add_argument("--device", default="auto", help="auto: cuda if there is one, else cpu")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts together (full 470, tiny 240)")
    p.add_argument("--limit", action="append", default=[], metavar="[PART=]SECONDS",
                   help="seconds every part (or PART) may take, instead of its own limit")  # fmt: skip
    p.add_argument("--mnist-dir", type=Path, default=None, help="MNIST IDX files (default $EIGHTGEN_MNIST_DIR; else noise)")
    p.add_argument("--jobs", type=int, default=None, help="parts at once (default: 1 on the GPU, one per core at the tiny size)")
    p.add_argument("--inject", action="append", default=[], metavar="PART=hang|raise",
                   help="make a part hang or fail, to see the rest still run")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the parts; write the JSON report; print the table. Exit 1 if a part failed, timed out or failed its check."""
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.stderr.write(f"benchmarks.gpu: error: unknown parts {', '.join(unknown)} (have {', '.join(PARTS)})\n")
        return 2
    try:
        limits = {part: float(seconds) for part, _, seconds in (item.rpartition("=") for item in args.limit)}
    except ValueError:
        sys.stderr.write(f"benchmarks.gpu: error: --limit takes SECONDS or PART=SECONDS, got {args.limit}\n")
        return 2
    if args.mnist_dir is None and os.environ.get("EIGHTGEN_MNIST_DIR"):
        args.mnist_dir = Path(os.environ["EIGHTGEN_MNIST_DIR"])
    if args.inject:
        os.environ[INJECT_ENV] = ",".join(args.inject)
    started = time.perf_counter()
    env = environment("tiny", args.device)
    size = args.size if args.size != "auto" else ("full" if env["device"].startswith("cuda") else "tiny")
    env["size"] = size
    budget = args.budget if args.budget is not None else BUDGET[size]
    report: dict = {"environment": env, "budget_seconds": budget, "parts": {}}
    # One part at a time on the GPU (they would compete for it); tiny CPU parts use one thread each, so as many at
    # once as there are cores.
    jobs = args.jobs or (1 if size == "full" else min(len(parts), os.cpu_count() or 1))

    def part(name: str, folder: Path) -> dict:
        left = budget - (time.perf_counter() - started)
        limit = min(limits.get(name, limits.get("", LIMITS[name] if size == "full" else TINY_LIMIT)), left)
        if limit < 1.0:
            return {"status": "skipped", "seconds": 0.0, "limit_seconds": 0.0, "reason": "no time left in the budget", "result": None}
        done = run_part(name, args, size, limit, folder)
        print(f"benchmarks.gpu: {name} {done['status']} in {done['seconds']:.1f} s", file=sys.stderr, flush=True)
        return done

    with tempfile.TemporaryDirectory(prefix="eightgen-gpu-") as folder, ThreadPoolExecutor(jobs) as pool:
        running = {name: pool.submit(part, name, Path(folder)) for name in parts}
        report["parts"] = {name: future.result() for name, future in running.items()}
    judged = size == "full" and env["device"].startswith("cuda")
    report["goals"] = [
        {"goal": g.text, "target": g.target, "measured": g.measured(report["parts"]), "verdict": g.verdict(g.measured(report["parts"]), judged)}
        for g in GOALS
    ]
    report["wall_seconds"] = round(time.perf_counter() - started, 2)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    bad = [n for n, p in report["parts"].items() if p["status"] != "ok" or (p["result"] or {}).get("passed") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
