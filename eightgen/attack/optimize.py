"""The pixel-optimisation loop: every start follows the gradient of its own loss; every step is recorded."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from eightgen.attack.execution import cached_plan
from eightgen.attack.losses import LOSS_NAMES, per_sample_loss
from eightgen.attack.methods import Method, make_method
from eightgen.attack.methods import loss_name as loss_of
from eightgen.config import AttackConfig
from eightgen.errors import EightgenError
from eightgen.trajectory import Trajectory

TARGET = 1  # class index of the target digit in the classifier's two logits

Forward = Callable[[Tensor], Tensor]
# Early-stopped starts leave the batch at steps 1, 2, 3, 4, 6, 8, 12, 16, 23, ... (each about sqrt(2) times the
# last): the host reads one count at each, so O(log steps) reads a chunk, and a start frozen at step s is carried,
# masked, for at most ~0.41 s more steps (a run that stops most starts early keeps most of the gain).
COMPACT_RATIO = math.sqrt(2)


def snapshot_steps(steps: int, record_every: int) -> list[int]:
    """0, record_every, 2*record_every, ... and always `steps`."""
    return sorted(set(range(0, steps + 1, record_every)) | {steps})


def compaction_steps(steps: int) -> set[int]:
    """The steps at which the loop counts the starts still moving, to drop frozen ones from the batch."""
    found, k = set(), 0
    while (step := math.ceil(COMPACT_RATIO**k - 1e-9)) < steps:
        found.add(step)
        k += 1
    return found


class HostCount:
    """The number of True entries of a mask, brought to the host without making it wait for the device.

    On CUDA the count is copied into pinned memory behind an event, and read only once the event has passed;
    elsewhere it is there at once.
    """

    def __init__(self, mask: Tensor) -> None:
        count = mask.sum()
        self.event = None
        if count.is_cuda:
            self.host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self.host.copy_(count, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = count

    def ready(self) -> bool:
        """Whether the count can be read without waiting."""
        return self.event is None or self.event.query()

    def read(self) -> int:
        """The count (once ready)."""
        return int(self.host)


def _per_start(mask: Tensor) -> Tensor:
    """A per-start [m] tensor shaped for broadcasting over images."""
    return mask.reshape(-1, 1, 1, 1)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; the model's own settings come back afterwards."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _evaluate(forward: Forward, x: Tensor, loss_name: str, bf16: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Logits [m, 2], per-start loss [m] and its input gradient [m, C, 28, 28] at x."""
    x = x.detach().requires_grad_(True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        logits = forward(x)
    if logits.shape != (len(x), 2):
        raise EightgenError(f"the model maps {len(x)} images to logits {list(logits.shape)}, expected [{len(x)}, 2]")
    logits = logits.float()
    loss = per_sample_loss(loss_name, logits, TARGET)
    grad = None
    if loss.requires_grad:
        # Summed, never averaged: each start's gradient is that of its own loss, whatever the batch.
        (dz,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
        up = _upscale(dz)
        (grad,) = torch.autograd.grad(logits, x, grad_outputs=dz * up[:, None], allow_unused=True)
        if grad is not None:
            grad = grad.mul_(up.reciprocal().reshape(-1, *[1] * (grad.ndim - 1)))
    if grad is None:
        grad = torch.zeros_like(x)
    return logits.detach(), loss.detach(), grad


def _upscale(dz: Tensor) -> Tensor:
    """Per start, the power of two that lifts the largest |d loss / d logit| into [1/2, 1) (1 if it is there or above).

    A saturated softmax gives gradients of 1e-30 and less, whose backward pass through the network runs on
    subnormal floats, many times slower on CPUs. Scaling a start's backward by 2^k and its input gradient by
    2^-k is exact in floating point, so the gradient is the same bits wherever the unscaled pass stayed
    normal (and more precise where it did not).
    """
    _, exponent = torch.frexp(dz.abs().amax(dim=1))
    # 2^126 is the largest power of two a float32 holds with room: it still lifts any subnormal into range.
    return torch.ldexp(torch.ones_like(dz[:, 0]), (-exponent).clamp(0, 126))


def grad_norms(grad: Tensor) -> Tensor:
    """Per-start L2 norm [m] of the gradient, accumulated in float64: finite exactly when every entry is."""
    return torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float64)


class Recorder:
    """Preallocated device buffers for everything recorded; copied to the CPU once, by finish()."""

    def __init__(self, x0: Tensor, steps: int, record_every: int) -> None:
        n, dev = len(x0), x0.device
        self.x0, self.steps = x0, steps
        self.snapshot_steps = snapshot_steps(steps, record_every)
        self._slot = {s: j for j, s in enumerate(self.snapshot_steps)}
        self.logits = torch.zeros(n, steps + 1, 2, device=dev)
        self.loss = torch.zeros(n, steps + 1, device=dev)
        self.snapshots = torch.zeros(n, len(self.snapshot_steps), *x0.shape[1:], device=dev)
        self.flip_step = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.flip_x = torch.zeros_like(x0)
        self.grad_norm = torch.zeros(n, device=dev)
        self.stopped_step = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.nonfinite = torch.zeros(steps + 1, dtype=torch.long, device=dev)
        self.last_step = -1

    def add(
        self, t: int, rows: Tensor | None, x: Tensor, logits: Tensor, loss: Tensor, gnorm: Tensor, live: Tensor | None = None
    ) -> None:
        """Record step t of the starts `rows` (None: all), whose images are x and gradient norms gnorm (float64).

        live: which of them still move (None: all); frozen ones keep their gradient norm, and their logits and
        losses are replaced by those of their stop step in fill_frozen.
        """
        sel = slice(None) if rows is None else rows
        self.logits[sel, t] = logits
        self.loss[sel, t] = loss
        gn = gnorm.float()
        self.grad_norm[sel] = gn if live is None else torch.where(live, gn, self.grad_norm[sel])
        # A float64 norm of float32 entries cannot overflow: it is finite exactly when the whole gradient is.
        bad = ~(torch.isfinite(logits).all(dim=1) & torch.isfinite(gnorm))
        self.nonfinite[t] = (bad if live is None else bad & live).sum()
        first = (logits.argmax(dim=1) == TARGET) & (self.flip_step[sel] < 0)
        if rows is None:
            self.flip_step.masked_fill_(first, t)
            torch.where(_per_start(first), x, self.flip_x, out=self.flip_x)
        else:
            self.flip_step[rows] = torch.where(first, t, self.flip_step[rows])
            self.flip_x[rows] = torch.where(_per_start(first), x, self.flip_x[rows])
        self.last_step = t

    def snapshot(self, t: int, x_all: Tensor) -> None:
        """Keep x_t of every start (frozen starts hold their frozen image) if t is a snapshot step."""
        if t in self._slot:
            self.snapshots[:, self._slot[t]] = x_all

    def freeze(self, t: int, rows: Tensor | None, stop: Tensor) -> None:
        """Mark the starts `rows` (None: all) where stop is True as stopped at step t: their later steps become copies of step t."""
        sel = slice(None) if rows is None else rows
        self.stopped_step[sel] = torch.where(stop, t, self.stopped_step[sel])

    def raise_if_nonfinite(self) -> None:
        """EightgenError naming the first step whose model output or input gradient was NaN/inf."""
        bad = self.nonfinite.nonzero()
        if len(bad):
            t = int(bad[0])
            raise EightgenError(
                f"step {t}: non-finite model output or input gradient for {int(self.nonfinite[t])} of "
                f"{len(self.x0)} starts"
            )

    def fill_frozen(self, x_all: Tensor) -> None:
        """Steps after a start was frozen (or after the loop ended early) repeat its frozen state."""
        for s, j in self._slot.items():
            if s > self.last_step:
                self.snapshots[:, j] = x_all
        stopped = self.stopped_step[:, None]
        ts = torch.arange(self.steps + 1, device=stopped.device)[None]
        source = torch.where((stopped >= 0) & (ts > stopped), stopped, ts)
        self.logits = self.logits.gather(1, source[..., None].expand(-1, -1, 2))
        self.loss = self.loss.gather(1, source)

    def replace_final(self, rows: Tensor, x: Tensor, logits: Tensor, loss: Tensor, grad: Tensor) -> None:
        """Overwrite the last step of `rows` with a different output image (min_l2's best flipping iterate)."""
        self.logits[rows, self.steps] = logits
        self.loss[rows, self.steps] = loss
        self.grad_norm[rows] = grad_norms(grad).float()
        self.snapshots[rows, -1] = x

    def finish(self, x_final: Tensor) -> Trajectory:
        """The recorded trajectory as numpy arrays (float16 images), moved to the CPU in one go."""
        flipped = self.flip_step >= 0
        l2_flip = (self.flip_x - self.x0).flatten(1).norm(dim=1)
        cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
        logits = self.logits.cpu()
        return Trajectory(
            snapshot_steps=torch.tensor(self.snapshot_steps, dtype=torch.int32).numpy(),
            snapshots=cpu(self.snapshots.half()),
            p_target=logits.softmax(dim=-1)[..., TARGET].numpy(),
            loss=cpu(self.loss),
            logits=logits.numpy(),
            flip_step=cpu(self.flip_step.int()),
            flip_snapshot=cpu(self.flip_x.half()),
            l2_at_flip=cpu(torch.where(flipped, l2_flip, torch.full_like(l2_flip, float("nan")))),
            x_final=cpu(x_final.float()),
            grad_norm_final=cpu(self.grad_norm),
            stopped_step=cpu(self.stopped_step.int()),
        )


def _check_inputs(model: nn.Module, x0: Tensor, cfg: AttackConfig) -> None:
    """EightgenError for a start batch or config the loop cannot run."""
    if not isinstance(x0, Tensor) or x0.ndim != 4 or x0.shape[2:] != (28, 28) or x0.dtype != torch.float32:
        got = f"{x0.dtype} {list(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise EightgenError(f"starts must be a float32 tensor [n, C, 28, 28], got {got}")
    if len(x0) == 0:
        raise EightgenError("no starts to optimise (empty batch)")
    if loss_of(cfg) not in LOSS_NAMES:
        raise EightgenError(f"unknown loss {loss_of(cfg)!r} (expected one of {', '.join(LOSS_NAMES)})")
    devices = {p.device for p in model.parameters()}
    if devices and devices != {x0.device}:
        raise EightgenError(f"model is on {sorted(map(str, devices))} but the starts are on {x0.device}")


def execution_model(model: nn.Module, x0: Tensor, cfg: AttackConfig) -> Forward:
    """The model as the loop runs it (eightgen.attack.execution's plan for x0's device), compiled when asked on CUDA."""
    return cached_plan(model, x0[:1], compile=cfg.compile and x0.device.type == "cuda")


def _input_std(model: nn.Module, device: torch.device) -> Tensor | float:
    """The model's input std (pixel units per normalised unit), 1 for models without one."""
    std = getattr(model, "std", None)
    return 1.0 if std is None else torch.as_tensor(std).detach().to(device=device, dtype=torch.float32)


def optimize(
    model: nn.Module, x0: Tensor, cfg: AttackConfig, progress: Callable[[int], None] | None = None
) -> Trajectory:
    """Push every start in x0 toward class 1 with cfg.method for cfg.steps steps; record steps 0..steps.

    All of x0 is one batch on x0's device (callers chunk). `progress(t)` is called with the number of
    steps done. With cfg.early_stop = k a start classified target for k recorded steps in a row is frozen
    (no more model calls; later steps repeat its state). For min_l2 the last step is the method's output:
    the smallest flipping iterate, if the model still calls it target, else the last iterate.
    """
    rec = Recorder(x0, cfg.steps, cfg.record_every)
    return rec.finish(_checked_run(model, x0, cfg, progress, rec))


def final_images(model: nn.Module, x0: Tensor, cfg: AttackConfig) -> Tensor:
    """x_steps of every start from the loop optimize runs, with nothing recorded and nothing checked.

    The images equal optimize's x_final; this exists to measure what recording costs.
    """
    return _checked_run(model, x0, cfg, None, None)


def _checked_run(
    model: nn.Module, x0: Tensor, cfg: AttackConfig, progress: Callable[[int], None] | None, rec: Recorder | None
) -> Tensor:
    """Check the inputs, then run the loop on the frozen model's execution plan; the output images."""
    _check_inputs(model, x0, cfg)
    method = make_method(cfg, _input_std(model, x0.device))
    with frozen_eval(model):
        forward = execution_model(model, x0, cfg)
        bf16 = cfg.autocast_bf16 and x0.device.type == "cuda"
        return _run(forward, method, x0.detach().clone(), cfg, bf16, progress, rec)


def _run(
    forward: Forward,
    method: Method,
    x0: Tensor,
    cfg: AttackConfig,
    bf16: bool,
    progress: Callable[[int], None] | None,
    rec: Recorder | None,
) -> Tensor:
    """The fixed loop: evaluate, record, (early-stop,) step, project. Returns the output images.

    Nothing in it waits for the device: flips and stops are masks. With early stopping, frozen starts stay in the
    batch (masked: their images, budgets and records do not move) until a compaction step, where the host reads
    how many still move, once the device has got there, and the batch keeps only those.
    """
    n, steps, loss_name = len(x0), cfg.steps, loss_of(cfg)
    x = x0.clone()
    radius = method.radius(x0)
    best_x = x0.clone() if method.keeps_best else None
    best_l2 = torch.full((n,), float("inf"), device=x0.device)
    streak = torch.zeros(n, dtype=torch.long, device=x0.device)
    rows: Tensor | None = None  # the starts in the batch; None = all (no gather/scatter)
    live: Tensor | None = None  # which starts of the batch still move (early stopping only)
    checks = compaction_steps(steps) if cfg.early_stop is not None else set()
    pending: HostCount | None = None
    last = -1

    for t in range(steps + 1):
        sel = slice(None) if rows is None else rows
        xa, x0a = x[sel], x0[sel]  # with rows None, xa is x itself: the step below updates x in place
        logits, loss, grad = _evaluate(forward, xa, loss_name, bf16)
        gnorm = grad_norms(grad) if rec is not None or method.uses_grad_norm else None
        if rec is not None:
            rec.add(t, rows, xa, logits, loss, gnorm, live)
            rec.snapshot(t, x)
        last = t
        is_target = logits.argmax(dim=1) == TARGET
        if best_x is not None:
            l2 = (xa - x0a).flatten(1).norm(dim=1)
            better = is_target & (l2 < best_l2[sel])
            better = better if live is None else better & live
            best_l2[sel] = torch.where(better, l2, best_l2[sel])
            best_x[sel] = torch.where(_per_start(better), xa, best_x[sel])
        if t == steps:
            break
        if cfg.early_stop is not None:
            live = torch.ones_like(is_target) if live is None else live
            streak[sel] = torch.where(is_target, streak[sel] + 1, 0)
            stop = live & (streak[sel] >= cfg.early_stop)
            if rec is not None:
                rec.freeze(t, rows, stop)
            live = live & ~stop
            if t in checks and pending is None:
                pending = HostCount(live)
            if pending is not None and pending.ready():
                moving = pending.read()
                pending = None
                if moving == 0:
                    break
                # The first `moving` rows in stable order of "frozen": every start still moving, in order (a count
                # taken some steps ago may also keep a few that froze since; they stay masked).
                keep = torch.argsort((~live).to(torch.uint8), stable=True)[:moving]
                index = torch.arange(n, device=x.device) if rows is None else rows
                rows, xa, x0a, grad, is_target, live = index[keep], xa[keep], x0a[keep], grad[keep], is_target[keep], live[keep]
                gnorm = None if gnorm is None else gnorm[keep]
                sel = rows
        ra = None
        if radius is not None:
            ra = method.adapt(radius[sel], is_target)
            ra = ra if live is None else torch.where(live, ra, radius[sel])
            radius[sel] = ra
        held = None if live is None else xa.clone()
        moved = method.project(method.step(xa, grad, t, gnorm), x0a, ra)
        if held is not None:
            moved = torch.where(_per_start(live), moved, held, out=moved)
        if rows is not None:
            x[rows] = moved
        if progress is not None:
            progress(t + 1)

    if rec is not None:
        rec.raise_if_nonfinite()
        rec.fill_frozen(x)
    if best_x is not None:
        _select_best(forward, rec, x, best_x, best_l2, loss_name, bf16)
    if progress is not None and last < steps:
        progress(steps)  # every start stopped early: the rest of the budget is done
    return x


def _select_best(
    forward: Forward, rec: Recorder | None, x: Tensor, best_x: Tensor, best_l2: Tensor, loss_name: str, bf16: bool
) -> None:
    """Make the smallest flipping iterate the output, where the model, asked again, still calls it target."""
    differs = torch.isfinite(best_l2) & (best_x != x).flatten(1).any(dim=1)
    rows = differs.nonzero().flatten()
    if len(rows) == 0:
        return
    logits, loss, grad = _evaluate(forward, best_x[rows], loss_name, bf16)
    # The recheck: an image that sits on the boundary may not flip in a batch of another size.
    ok = logits.argmax(dim=1) == TARGET
    rows, logits, loss, grad = rows[ok], logits[ok], loss[ok], grad[ok]
    x[rows] = best_x[rows]
    if rec is not None:
        rec.replace_final(rows, x[rows], logits, loss, grad)
