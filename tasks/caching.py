"""Cache keys for stage tasks: config slice + upstream content hashes + code, tied to the output on disk."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.context import TaskRunContext
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH
from pydantic import BaseModel

from eightgen.artifacts import MANIFEST, Artifact, read_manifest
from eightgen.errors import EightgenError

def _canonical(value: Any) -> Any:
    """A JSON-able form of a task parameter; artifacts count by content hash, never by path."""
    if isinstance(value, Artifact):
        return {"artifact_sha256": value.sha256}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    return value


def code_hash(fn: Callable[..., Any], modules: tuple[str, ...]) -> str:
    """Hex sha256 of a task function's source and of the eightgen modules it depends on."""
    h = hashlib.sha256(inspect.getsource(fn).encode())
    for name in modules:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()


def stage_key(fn: Callable[..., Any], modules: tuple[str, ...], parameters: dict[str, Any]) -> str:
    """Hex key of a stage call: its code and its canonicalised parameters (minus `force`)."""
    params = {k: _canonical(v) for k, v in sorted(parameters.items()) if k != "force"}
    payload = json.dumps({"code": code_hash(fn, modules), "parameters": params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def output_is_valid(directory: Path, manifest: str = MANIFEST) -> bool:
    """Whether an artifact directory exists with a manifest whose files all match their sha256."""
    try:
        read_manifest(directory, name=manifest)
    except EightgenError:
        return False
    return True


@dataclass(frozen=True)
class CachedStage:
    """How one stage task is cached: where its output lives and which eightgen modules it runs.

    A persisted result only names a directory; if that directory was deleted or edited since,
    the cached value would hand downstream tasks a dangling artifact, so the key function removes
    the stale record and the task runs again. A `force=True` parameter always recomputes.
    """

    kind: str | None
    modules: tuple[str, ...] = ()
    manifest: str = MANIFEST

    def output_dir(self, fn: Callable[..., Any], parameters: dict[str, Any]) -> Path:
        """<cache_dir>/<kind>/<key prefix> for content-addressed stages, else the run directory."""
        if self.kind is None:
            return Path(parameters["run_dir"])
        return Path(parameters["cache_dir"]) / self.kind / stage_key(fn, self.modules, parameters)[:20]

    def key_fn(self, context: TaskRunContext, parameters: dict[str, Any]) -> str:
        """Prefect cache_key_fn: task name + stage key; drops the record of a vanished output."""
        task = context.task
        key = f"{task.name}-{stage_key(task.fn, self.modules, parameters)}"
        if parameters.get("force") or not output_is_valid(self.output_dir(task.fn, parameters), self.manifest):
            (Path(PREFECT_LOCAL_STORAGE_PATH.value()) / key).unlink(missing_ok=True)
        return key

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for @task."""
        return {"cache_key_fn": self.key_fn, "persist_result": True}

    def here(self) -> Path:
        """Inside the running task: the directory its output belongs in."""
        ctx = TaskRunContext.get()
        return self.output_dir(ctx.task.fn, dict(ctx.parameters))
