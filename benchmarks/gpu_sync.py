"""Does a loop wait for the device? Host reads counted on any device, CUDA's own sync check where there is CUDA."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Tensor calls that hand a value to the host (on CUDA: wait for the device to get there).
READS = frozenset(
    {"item", "tolist", "numpy", "cpu", "nonzero", "argwhere", "masked_select", "__bool__", "__int__", "__float__", "__index__"}
)


def _has_mask(index: object) -> bool:
    """Whether an index holds a boolean tensor (indexing with one finds its True entries on the host)."""
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return isinstance(index, Tensor) and index.dtype == torch.bool


class HostReads(TorchFunctionMode):
    """Counts, by name, the tensor calls made under it that read tensor values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READS or (name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _has_mask(args[1:2])):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """All reads counted."""
        return sum(self.calls.values())


@contextmanager
def strict_steps(total: int) -> Iterator[Callable[..., None]]:
    """A progress callback under which CUDA raises at any synchronisation between the first step's report and the last.

    The loops report each step done (optimize: t; ddim_sample: i, n); from the first report to the one of `total`
    steps, torch.cuda.set_sync_debug_mode("error") is on, so the steps in between run with no host wait allowed.
    """

    def progress(done: int, *_: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if 0 < done < total else "default")

    try:
        yield progress
    finally:
        torch.cuda.set_sync_debug_mode("default")
