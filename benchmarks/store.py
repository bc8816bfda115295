"""One run on local disk and the same run in an S3-compatible store, side by side: wall time per stage and requests.

    python -m benchmarks.store --mnist-dir ../shared/datasets/mnist-full [--starts 10000] [--steps 100]

The store is moto's standalone S3 server on this machine (it stands in for S3: no network latency, so the numbers
show eightgen's own cost of the store, not a cloud's). Each cache gets its dataset and detector in a first, small run
outside the measurement; then the same N starts run once with --cache-dir and --runs-root on local disk and once in
the store, then twice more in the store, all Cached: with this host's copies kept (a warm host), and with them deleted
(a new host, which fetches what it checks). Requests are counted from the server's log, by method and by what they
touch. Stage times come from the Prefect database, as in benchmarks.scale.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pandas as pd

from benchmarks.scale import STAGES, grid, measured_run
from benchmarks.startup import prefect_env, stop_kept_server
from eightgen.config import PRESETS

BUCKET = "eightgen-bench"
REQUEST = re.compile(r'"(GET|PUT|HEAD|DELETE|POST) /([^ ]*) HTTP[^"]*" (\d{3})')
PLACES = ("attacks", "datasets", "models", "prefect-results", "runs")


def start_s3(folder: Path) -> tuple[subprocess.Popen, str, Path]:
    """moto's S3 server on a free local port, logging every request; the process, its endpoint and its log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "s3-requests.log"
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if not binary:
        sys.exit("benchmarks.store: moto_server is not installed (pip install 'moto[server]')")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint, log
        except OSError:
            time.sleep(0.1)
    sys.exit("benchmarks.store: moto_server did not start")


def requests(log: Path, since: int) -> tuple[Counter, Counter, int]:
    """Requests logged after byte `since`: by method, by what they touch (chunk, record, run, ...), and the new offset."""
    text = log.read_bytes()[since:].decode(errors="replace")
    methods, places = Counter(), Counter()
    for method, path, _ in REQUEST.findall(text):
        methods[method] += 1
        places[next((p for p in PLACES if re.search(rf"(^|[/=]|%2F){p}(/|%2F|&|$)", path)), "other")] += 1
    return methods, places, since + len(text.encode())


def main(argv: list[str] | None = None) -> int:
    """Measure the run on local disk and in the store; print the comparison."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", type=Path, required=True, help="MNIST IDX files with training and test splits")
    parser.add_argument("--starts", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=None, help="starts per chunk (default: the preset's)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="eightgen-store-"))
    home, scratch = tmp / "home", tmp / "scratch"
    server, endpoint, log = start_s3(tmp)
    env = prefect_env(home) | {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "EIGHTGEN_SCRATCH": str(scratch),
    }
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "EIGHTGEN_SCRATCH")})
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    seeds, per_digit = grid(args.starts)
    where = {
        "local disk": ["--cache-dir", str(tmp / "cache"), "--runs-root", str(tmp / "runs")],
        "S3 (moto)": ["--cache-dir", f"s3://{BUCKET}/cache", "--runs-root", f"s3://{BUCKET}/runs"],
    }
    base = ["--preset", "quick", "--mnist-dir", str(args.mnist_dir.resolve()), "--pool-per-digit", "all", "--steps", str(args.steps)]
    base += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    starts = ["--seeds", str(seeds), "--starts-per-digit", str(per_digit), "--run-name", f"n{args.starts}"]
    rows: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    try:
        for name, place in where.items():  # the dataset and detector of each cache, outside the measurement
            measured_run([*base, *place, "--seeds", "10", "--starts-per-digit", "1", "--run-name", "prepare"], env, home, tmp / "unused", tmp / "unused")
        offset = log.stat().st_size
        for name, place in where.items():
            rows[name] = measured_run([*base, *place, *starts], env, home, tmp / "unused", tmp / "unused")
            rows[name]["requests"], rows[name]["places"], offset = requests(log, offset)
            load.append(os.getloadavg()[0])
            print(f"{name}: {rows[name]['wall']:.1f} s", file=sys.stderr, flush=True)
        for name, wipe in (("S3, all Cached, warm host", False), ("S3, all Cached, new host", True)):
            if wipe:
                shutil.rmtree(scratch, ignore_errors=True)
            rows[name] = measured_run([*base, *where["S3 (moto)"], *starts], env, home, tmp / "unused", tmp / "unused")
            rows[name]["requests"], rows[name]["places"], offset = requests(log, offset)
            load.append(os.getloadavg()[0])
        local = pd.read_parquet(tmp / "runs" / f"n{args.starts}" / "results.parquet")
        stored = pd.read_parquet(scratch / "s3" / BUCKET / "runs" / f"n{args.starts}" / "results.parquet")
        chunks = -(-args.starts // (args.chunk_size or PRESETS["quick"].attack.chunk_size))
    finally:
        stop_kept_server(home)
        server.kill()
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"eightgen run --preset quick --steps {args.steps}, {args.starts:,} starts: local disk vs moto's S3 server on this machine "
          f"(load average {min(load):.1f}-{max(load):.1f}, {os.cpu_count()} cores)\n")
    names = list(rows)
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for stage in STAGES:
        cells = [f"{r['stages'][stage]['seconds']:.1f} s" if stage in r["stages"] else "—" for r in rows.values()]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("| whole run (wall) | " + " | ".join(f"{r['wall']:.1f} s" for r in rows.values()) + " |")
    print("| store requests | " + " | ".join(
        "—" if name == "local disk" else ", ".join(f"{m} {n:,}" for m, n in sorted(r["requests"].items())) for name, r in rows.items()) + " |")
    print("| ... by what they touch | " + " | ".join(
        "—" if name == "local disk" else ", ".join(f"{p} {n:,}" for p, n in sorted(r["places"].items())) for name, r in rows.items()) + " |")
    print(f"\nresults.parquet of the store run equal to the local run's: {local.equals(stored)} ({len(local):,} starts, {chunks} chunks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
