"""Cache keys for stage tasks: settings + upstream content hashes + the code the task imports, tied to the output on disk.

A stage is reused only when its key matches *and* the output on disk is the very output that key produced:
the persisted record holds the output's Artifact (path + sha256 of its manifest), and the manifest carries
the key. Anything else (deleted, edited, replaced, overwritten by another run, corrupt) drops the record,
so the task runs again. Keys never contain where the cache lives, so a cache can be moved or shared.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.context import TaskRunContext
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH
from pydantic import BaseModel

from eightgen.artifacts import MANIFEST, Artifact, read_manifest, sha256_file
from eightgen.codekey import code_digest
from eightgen.errors import EightgenError

# Parameters that never change what a stage computes: how hard to try, and where the cache lives.
NOT_IN_KEY = ("force", "overwrite", "cache_dir")
STAGE_KEY = "stage_key"  # manifest field naming the key that produced an output


def _canonical(value: Any) -> Any:
    """A JSON-able form of a task parameter; artifacts count by content hash, never by path."""
    if isinstance(value, Artifact):
        return {"artifact_sha256": value.sha256}
    if isinstance(value, BaseModel):
        return {k: v for k, v in value.model_dump(mode="json").items() if k not in NOT_IN_KEY}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    return value


def stage_key(fn: Callable[..., Any], parameters: dict[str, Any]) -> str:
    """Hex key of a stage call: the code its module imports (computed) and its canonicalised parameters."""
    params = {k: _canonical(v) for k, v in sorted(parameters.items()) if k not in NOT_IN_KEY}
    payload = json.dumps({"code": code_digest(fn.__module__), "parameters": params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def produced_by(directory: Path, key: str, manifest: str = MANIFEST) -> bool:
    """Whether a directory holds an intact output (every file matches its manifest) that this key produced."""
    try:
        return read_manifest(directory, name=manifest).get(STAGE_KEY) == key
    except EightgenError:
        return False


def _recorded(record_file: Path) -> Artifact | None:
    """The Artifact a persisted Prefect result record holds, or None if it is unreadable or something else."""
    from prefect._internal.result_records import ResultRecord

    try:
        value = ResultRecord.deserialize(record_file.read_bytes()).result
    except Exception:  # a corrupt or foreign record is simply not reusable
        return None
    return value if isinstance(value, Artifact) else None


def _same_place(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass(frozen=True)
class CachedStage:
    """How one stage task is cached: where its output lives and which manifest describes it.

    kind: the content-addressed store folder (<cache_dir>/<kind>/<key prefix>), or None when the output
    is the run directory named by the task's `run_dir` parameter.
    """

    kind: str | None
    manifest: str = MANIFEST

    def output_dir(self, parameters: dict[str, Any], key: str) -> Path:
        """Where the output of this call belongs."""
        if self.kind is None:
            return Path(parameters["run_dir"])
        return Path(parameters["cache_dir"]) / self.kind / key.rsplit("-", 1)[-1][:20]

    def key_of(self, name: str, fn: Callable[..., Any], parameters: dict[str, Any]) -> str:
        """The cache key of a call: task name + stage key."""
        return f"{name}-{stage_key(fn, parameters)}"

    def reusable(self, record: Artifact | None, out: Path, key: str) -> bool:
        """Whether a persisted record may be reused: it names `out`, whose manifest is intact, from this key,
        and hashes to what the record says."""
        if record is None or not _same_place(record.path, out) or not produced_by(out, key, self.manifest):
            return False
        return sha256_file(out / self.manifest) == record.sha256

    def key_fn(self, context: TaskRunContext, parameters: dict[str, Any]) -> str:
        """Prefect cache_key_fn: the key; drops a record whose output on disk is not the one it produced."""
        key = self.key_of(context.task.name, context.task.fn, parameters)
        record_file = Path(PREFECT_LOCAL_STORAGE_PATH.value()) / key
        if record_file.exists():
            out = self.output_dir(parameters, key)
            if parameters.get("force") or not self.reusable(_recorded(record_file), out, key):
                record_file.unlink(missing_ok=True)
        return key

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for @task."""
        return {"cache_key_fn": self.key_fn, "persist_result": True}

    def here(self) -> tuple[Path, str]:
        """Inside the running task: the directory its output belongs in, and the key it must carry."""
        ctx = TaskRunContext.get()
        parameters = dict(ctx.parameters)
        key = self.key_of(ctx.task.name, ctx.task.fn, parameters)
        return self.output_dir(parameters, key), key
