"""Shared fixtures: the real MNIST files and small artifacts built from them once per session."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from eightgen.config import DatasetConfig

if TYPE_CHECKING:
    from helpers import Trained

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# every command stops its own local Prefect server (tests/test_embedded.py checks the kept one)
os.environ.setdefault("EIGHTGEN_SERVER_IDLE_SECONDS", "0")
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda need a CUDA device: without one they are deselected, so no test of the suite is skipped."""
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda:
        return
    import torch

    if not torch.cuda.is_available():
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX files (read-only): $EIGHTGEN_MNIST_DIR or ../shared/datasets/mnist."""
    path = Path(os.environ.get("EIGHTGEN_MNIST_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
    assert (path / "t10k-images-idx3-ubyte.gz").is_file(), f"real MNIST not found at {path}"
    return path


@pytest.fixture(scope="session")
def small_dataset_cfg(mnist_dir: Path) -> DatasetConfig:
    """A small but real dataset config: 3,000 training images, 16 pool images per digit."""
    return DatasetConfig(source="idx", mnist_dir=mnist_dir, pool_per_digit=16, max_train=3000, seed=0)


@pytest.fixture(scope="session")
def dataset_dir(small_dataset_cfg: DatasetConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An assembled dataset artifact directory built from real MNIST."""
    from eightgen.data.assembly import assemble, save_assembled
    from eightgen.data.sources import load_mnist

    out = tmp_path_factory.mktemp("dataset")
    save_assembled(assemble(load_mnist(small_dataset_cfg), small_dataset_cfg), out)
    return out


@pytest.fixture(scope="session")
def small_cnn(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The session's one trained small CNN: one epoch on the real assembled fixture (batches of 32, seed 0)."""
    from helpers import Trained

    from eightgen.config import TrainConfig
    from eightgen.models.training import train

    # Batches of 32 give one epoch on the 3,000-image fixture enough optimiser steps to learn the task.
    cfg = TrainConfig(arch="small_cnn", epochs=1, batch_size=32, seed=0, device="cpu")
    out = tmp_path_factory.mktemp("models") / "small"
    lines: list[str] = []
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        artifact = train(cfg, dataset_dir, out, progress=lines.append)
    return Trained(cfg, artifact, lines, buffer.getvalue())


@pytest.fixture(scope="session")
def prefect_harness():
    """One throwaway Prefect API server (temporary database) for every flow-run test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models gain nothing from intra-op threads on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of this test session on a free local port (Debian's redis-server package)."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: apt-get install redis-server (the Redis lock tests run a real one)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    from redis import Redis

    client = Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except Exception:
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.kill()
    server.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server of this test session (moto's standalone server, standing in for S3) on a free local
    port, with the environment that points fsspec's S3 at it; its endpoint URL."""
    from benchmarks.store import start_s3

    server, endpoint, _ = start_s3(tmp_path_factory.mktemp("moto"))
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.kill()
    server.wait()


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A new empty bucket on the session's S3 server: its s3:// URL."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
