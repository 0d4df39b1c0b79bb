"""Step cache: skip the DiT's layers on steps where they would change little.

A first-block cache, of the family of ParaAttention's and diffusers'
``FirstBlockCache``: on every DiT forward the first layer runs, and the
relative L1 change of its residual (output minus input) from the previous
forward's is added up over the forwards since the last fully computed one.
While that sum stays under ``threshold``, layers 1 .. N-1 are not run:
their output is the first layer's output plus the residual they added at
the last fully computed forward (kept from then).

Why this and not TeaCache or MagCache: those decide from a curve fitted
per model on real weights and real prompts (TeaCache: polynomial rescale
coefficients; MagCache: the magnitude ratios of the residual over the
steps).  SCAIL's DiT is Wan2.1-14B fine-tuned for pose control, with extra
reference and pose tokens; Wan's published coefficients are not its own
and we have not calibrated any on SCAIL's weights.  The first-block
residual is measured on every forward of this model itself, so it needs
no calibration.

Rules that bound the error: the step-to-step changes are added up since
the last full forward (TeaCache's rule; the sum is at least the direct
distance to that forward, so at one threshold a forward skipped here would
also be skipped by comparing with the last full forward, which is what
ParaAttention's cache does); the first ``warmup`` steps and the last step
are always computed; after ``max_skips`` skipped forwards in a row one is
computed.

Place in the hook chain: outermost (its rank in
:mod:`scail_win.placement.registry`).  It wraps the ``layer_forward`` the model
has (upstream's, lean layers, a BlockSwap's trigger), so a skipped layer
does not enter the block swap and its weights are not streamed in.  The
swap then sees, at the next forward, layer 0 again -- the group it entered
last and still holds, with layer 1 prefetched -- so its learned order and
prefetch window stay as they were.
The registry keeps that order whatever the order of installation.

Each DiT forward within a step is one branch (a CFG batch of 2 is one;
split CFG halves, called one after the other, are branches 0 and 1), with
its own cached tensors, so CFG halves never mix.  The sampler calls
:meth:`StepCache.begin_step` before each step.

Cost per branch (one "width" = tokens x hidden in the model dtype per
sample, ~0.47 GiB at 512x896x81): two widths kept between forwards (the
first-block residual and the rest's residual) in ``storage`` (``"device"``,
or ``"cpu"``: pinned host memory next to a CUDA device, with a third width
for the layer input), one width on the device while the first layer runs
with ``"device"`` storage (its input, which lean layers overwrite in
place), and a few (2048 x hidden) float32 chunks for the comparison.  One
host sync per forward (the change, read to decide).  Nothing is kept after
the last step.  With several processes (sequence parallel), the change is
summed over all of them, so they all skip the same forwards.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

from ..placement.registry import LAYER_FORWARD, HookRegistry

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_WARMUP = 5
DEFAULT_MAX_SKIPS = 3
STORAGES = ("device", "cpu")
# Rows (tokens x batch) per chunk of the residual arithmetic: a float32
# chunk of 2048 x 5120 is 40 MiB, and a few are live at once.
CHUNK_ROWS = 2048
# Denominator floor for a residual that is exactly zero.
_TINY = 1e-30


def step_cache_threshold(args) -> Optional[float]:
    """The run's ``--step-cache`` threshold (:mod:`scail_win.run_config`), or None when the cache is off."""
    from ..run_config import of

    return of(args).numerics.step_cache or None


@dataclass
class BranchStats:
    """DiT forwards of one branch: fully computed and skipped."""

    computed: int = 0
    skipped: int = 0


@dataclass
class Decision:
    """What one forward did: ``change`` is the relative L1 change of the first-block residual
    (None when there was nothing to compare with), ``reason`` why it was computed or skipped."""

    step: int
    branch: int
    change: Optional[float]
    skipped: bool
    reason: str


@dataclass
class _Branch:
    key: tuple  # (shape, dtype, device) of the hidden states the tensors below belong to
    first: Optional["torch.Tensor"] = None  # first-block residual of the last forward
    rest: Optional["torch.Tensor"] = None  # layers 1..N-1's residual at the last full forward
    rest_valid: bool = False
    staging: Optional["torch.Tensor"] = None  # the first layer's input, with cpu storage
    accumulated: float = 0.0
    in_a_row: int = 0


def _distributed_world() -> int:
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size()


def _rows(t: "torch.Tensor") -> "torch.Tensor":
    return t.view(-1, t.shape[-1])


def _spans(rows: int):
    return [(a, min(a + CHUNK_ROWS, rows)) for a in range(0, rows, CHUNK_ROWS)]


class StepCache:
    """The installed cache; see the module docstring.  Use :func:`install_step_cache`."""

    name = "step_cache"
    slot = LAYER_FORWARD

    def __init__(self, dit: "nn.Module", threshold: float, warmup: int = DEFAULT_WARMUP,
                 max_skips: int = DEFAULT_MAX_SKIPS, storage: str = "device"):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        for name, value, low in (("warmup", warmup, 0), ("max_skips", max_skips, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        hooks = getattr(dit, "hooks", None)
        layers = getattr(getattr(dit, "transformer", None), "layers", None)
        if not isinstance(hooks, dict) or not callable(hooks.get("layer_forward")) or layers is None:
            raise ValueError(f"{type(dit).__name__} is not a sat model with a layer_forward hook and "
                             "transformer.layers")
        if len(layers) < 2:
            raise ValueError("a step cache needs at least two layers (the first one decides, the rest are skipped)")
        self.dit = dit
        self.threshold = float(threshold)
        self.warmup = warmup
        self.max_skips = max_skips
        self.storage = storage
        self.num_layers = len(layers)
        self.decisions: List[Decision] = []
        self._branches: Dict[int, _Branch] = {}
        self._step: Optional[int] = None
        self._num_steps: Optional[int] = None
        self._branch = -1
        self._mode: Optional[str] = None  # "skip" or "full" for the forward under way
        self._inner = None
        self.installed = False
        HookRegistry.of(dit).add(self)

    # ------------------------------------------------------------------ control

    def on_add(self, dit) -> None:
        self.installed = True

    def wrap(self, inner):
        self._inner = inner
        return self

    def on_remove(self, dit) -> None:
        self._branches.clear()
        self.installed = False

    def remove(self) -> None:
        """Put the wrapped layer_forward back and drop the cached tensors."""
        if self.installed:
            HookRegistry.of(self.dit).remove(self.name)

    def reset(self) -> None:
        """Forget the cached tensors, the statistics and the decisions (a new video)."""
        self._branches.clear()
        self.decisions.clear()
        self._step = self._num_steps = None
        self._branch = -1
        self._mode = None

    def begin_step(self, step: int, num_steps: int) -> None:
        """Step ``step`` (0-based) of ``num_steps`` starts; the forwards that follow are its branches.

        A step that does not follow the previous one (a new video, a
        resumed job) starts afresh, as :meth:`reset`.
        """
        for name, value in (("step", step), ("num_steps", num_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 0 <= step < num_steps:
            raise ValueError(f"step {step} is outside 0..{num_steps - 1}")
        if self._step is not None and (num_steps != self._num_steps or step <= self._step):
            self.reset()
        self._step, self._num_steps = step, num_steps
        self._branch = -1
        self._mode = None

    # -------------------------------------------------------------------- stats

    def stats(self) -> Dict[int, BranchStats]:
        """Per branch (0, 1, ...), the forwards computed and skipped since the last reset."""
        counts: Dict[int, BranchStats] = {}
        for d in self.decisions:
            s = counts.setdefault(d.branch, BranchStats())
            if d.skipped:
                s.skipped += 1
            else:
                s.computed += 1
        return dict(sorted(counts.items()))

    @property
    def computed(self) -> int:
        return sum(not d.skipped for d in self.decisions)

    @property
    def skipped(self) -> int:
        return sum(d.skipped for d in self.decisions)

    def summary(self) -> str:
        """One line for the log at the end of a video."""
        total = len(self.decisions)
        parts = [f"branch {b}: {s.skipped} of {s.computed + s.skipped}" for b, s in self.stats().items()]
        detail = f" ({'; '.join(parts)})" if len(parts) > 1 else ""
        return (f"step cache (threshold {self.threshold:g}, warmup {self.warmup}, max skips {self.max_skips}): "
                f"skipped {self.skipped} of {total} DiT forwards{detail}")

    # --------------------------------------------------------------------- hook

    def __call__(self, hidden_states, mask, *args, **kwargs):
        if "layer_id" not in kwargs:
            return self._inner(hidden_states, mask, *args, **kwargs)
        layer_id = int(kwargs["layer_id"])
        if layer_id == 0:
            return self._first_layer(hidden_states, mask, args, kwargs)
        if self._mode == "skip":
            return hidden_states
        out = self._inner(hidden_states, mask, *args, **kwargs)
        if self._mode == "full" and layer_id == self.num_layers - 1:
            self._store_rest(out[0] if isinstance(out, tuple) else out)
        return out

    def _first_layer(self, hidden_states, mask, args, kwargs):
        import torch

        if self._step is None:
            raise RuntimeError("step cache: begin_step() was not called before the DiT forward")
        self._branch += 1
        self._mode = None
        step, branch = self._step, self._branch
        if step == self._num_steps - 1:
            # Always computed; nothing is kept after the last step.
            self._branches.pop(branch, None)
            self.decisions.append(Decision(step, branch, None, False, "last step"))
            return self._inner(hidden_states, mask, *args, **kwargs)
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        state = self._branches.get(branch)
        if state is None or state.key != key:
            state = self._branches[branch] = _Branch(key)
        with torch.no_grad():
            saved = self._save_input(state, hidden_states)
            out = self._inner(hidden_states, mask, *args, **kwargs)
            out_t = out[0] if isinstance(out, tuple) else out
            if not out_t.is_contiguous():
                out = out_t = out_t.contiguous()
            change = self._update_first_residual(state, saved, out_t)
            reason = self._reason_to_compute(state, step, change)
            if reason is None:
                state.accumulated += change
                state.in_a_row += 1
                rows, rest_rows = _rows(out_t), _rows(state.rest)
                for a, b in _spans(rows.shape[0]):
                    rows[a:b] += self._load(rest_rows, a, b, out_t.device)
                self._mode = "skip"
                self.decisions.append(Decision(step, branch, change, True, "change under threshold"))
                return out_t
            state.accumulated = 0.0
            state.in_a_row = 0
            # The rest's residual is its output minus this; see _store_rest.
            state.rest = self._store(state.rest, out_t)
            state.rest_valid = False
            self._mode = "full"
            self.decisions.append(Decision(step, branch, change, False, reason))
            return out

    def _reason_to_compute(self, state: _Branch, step: int, change: Optional[float]) -> Optional[str]:
        if step < self.warmup:
            return "warmup"
        if change is None or not state.rest_valid:
            return "nothing cached"
        if state.in_a_row >= self.max_skips:
            return "max skips in a row"
        if state.accumulated + change >= self.threshold:
            return "change over threshold"
        return None

    # ----------------------------------------------------------------- tensors

    def _save_input(self, state: _Branch, hidden_states):
        """The first layer's input, kept from being overwritten by an in-place layer."""
        if self.storage == "device":
            return self._store(None, hidden_states)
        state.staging = self._store(state.staging, hidden_states)
        return state.staging

    def _update_first_residual(self, state: _Branch, saved, out) -> Optional[float]:
        """Store this forward's first-block residual; return its relative L1 change (one host sync)."""
        import torch

        compare = state.first is not None
        if not compare:
            state.first = self._empty(out)
        out_rows, saved_rows, first_rows = _rows(out), _rows(saved), _rows(state.first)
        diff = torch.zeros((), dtype=torch.float32, device=out.device)
        ref = torch.zeros((), dtype=torch.float32, device=out.device)
        for a, b in _spans(out_rows.shape[0]):
            residual = out_rows[a:b].float() - self._load(saved_rows, a, b, out.device).float()
            if compare:
                previous = self._load(first_rows, a, b, out.device).float()
                ref += previous.abs().sum()
                diff += (residual - previous).abs_().sum()
            # Stream-ordered after the read above, also for pinned host memory.
            first_rows[a:b].copy_(residual.to(first_rows.dtype), non_blocking=True)
        if not compare:
            return None
        sums = torch.stack([diff, ref])
        if _distributed_world() > 1:
            # Each process holds a share of the tokens (sequence parallel):
            # decide on the sums over all of them, so that every process skips
            # the same forwards and their collectives stay matched.
            torch.distributed.all_reduce(sums)
        diff, ref = sums.tolist()  # the one host sync
        return diff / max(ref, _TINY)

    def _store_rest(self, out) -> None:
        """At the last layer of a full forward: rest = output - first layer's output (held in rest)."""
        import torch

        state = self._branches[self._branch]
        self._mode = None
        with torch.no_grad():
            out_rows, rest_rows = _rows(out.contiguous()), _rows(state.rest)
            for a, b in _spans(out_rows.shape[0]):
                first_out = self._load(rest_rows, a, b, out.device)
                rest_rows[a:b].copy_(out_rows[a:b] - first_out, non_blocking=True)
        state.rest_valid = True

    def _empty(self, like):
        import torch

        if self.storage == "device":
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        pin = like.device.type == "cuda"
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)

    def _store(self, buffer, tensor):
        """``tensor``'s values in ``buffer`` (made in ``storage`` when missing)."""
        if buffer is None:
            buffer = self._empty(tensor)
        buffer.copy_(tensor, non_blocking=True)
        return buffer

    @staticmethod
    def _load(rows, a: int, b: int, device):
        return rows[a:b].to(device, non_blocking=True)


def install_step_cache(dit: "nn.Module", threshold: float, warmup: int = DEFAULT_WARMUP,
                       max_skips: int = DEFAULT_MAX_SKIPS, storage: str = "device") -> StepCache:
    """Wrap ``dit``'s ``layer_forward`` hook in a :class:`StepCache` (outermost on it).

    ``threshold``: the accumulated relative L1 change of the first layer's
    residual under which a forward skips layers 1..N-1 (0: never skip).
    ``storage``: where cached residuals live, ``"device"`` or ``"cpu"``
    (pinned; for block-swapped runs on small cards).
    """
    cache = StepCache(dit, threshold, warmup=warmup, max_skips=max_skips, storage=storage)
    log.info("step cache: threshold %g, warmup %d steps, at most %d skips in a row, residuals on the %s",
             cache.threshold, warmup, max_skips, storage)
    return cache
