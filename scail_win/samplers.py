"""Flow-matching ODE solvers for SCAIL's sampler: Euler, UniPC (bh2) and DPM++ 2M.

The DiT predicts a velocity ``v = eps - x0`` on the path
``x_sigma = (1 - sigma) x0 + sigma eps``; sigmas run from 1 to 0. Every
solver takes one network evaluation per step:

* ``euler``: upstream's ``RFSampler`` update, bit for bit.
* ``dpmpp_2m``: DPM-Solver++(2M), data prediction, with ``alpha = 1 - sigma``
  and ``lambda = log(alpha / sigma)``; first order on the first step and on
  the step to sigma = 0.
* ``unipc``: UniPC-2 with the B(h) = expm1(-h) ("bh2") weights, predicting
  x0, with the UniC corrector after every evaluation and first order on the
  first and the final step -- Wan2.1's ``FlowUniPCMultistepScheduler`` /
  diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True)``. Its predictor
  is the DPM++ 2M update; the corrector re-uses the new evaluation.

Upstream's schedule starts at sigma = 1 exactly, where lambda = -inf (Wan's
own schedules stop just short of 1). Taking the limit of the formulas there,
a history point at sigma = 1 adds nothing to the step after it: that step is
first order, and the corrector keeps only its term in the new evaluation.

Each step is a linear combination of the current sample, the current x0
prediction and one kept tensor; the weights are computed once, in float64,
from the float32 sigmas, so a step costs a few fused multiply-adds on the
latents' own device and no host sync.
"""
from __future__ import annotations

import abc
import math
import operator
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from .errors import UserError

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Upstream's shifted flow schedule: ``steps + 1`` float32 sigmas from 1 to 0.

    Bit for bit ``make_flow_timesteps(0, steps, shift_scale=shift,
    mode='normal')``: numpy's linspace (i * (1/steps), last value 1), the
    shift in float64, rounded to float32, then ``1 - t`` in float32.
    """
    if isinstance(steps, bool):
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    try:
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}") from None
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    t = torch.arange(steps + 1, dtype=torch.float64) * (1.0 / steps)
    t[-1] = 1.0
    t = t / (shift + t - shift * t)
    return 1 - t.to(torch.float32)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (infinite at the ends)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _phi(z: float) -> tuple:
    """phi_1, phi_2, phi_3 at z (phi_k(z) = sum_n z^n / (n + k)!), accurate near 0."""
    if abs(z) < 1.0:
        # The closed forms cancel badly for small steps; the series does not.
        phis = []
        for k in (1, 2, 3):
            term, total = 1.0 / math.factorial(k), 0.0
            for n in range(40):
                total += term
                term *= z / (n + k + 1)
            phis.append(total)
        return tuple(phis)
    phi1 = math.expm1(z) / z
    phi2 = (phi1 - 1.0) / z
    return phi1, phi2, (phi2 - 0.5) / z


class _Weights(NamedTuple):
    """One step: ``x_next = a*x + b*m + c*m_prev``; UniPC's corrector base for the
    next step is ``base = ca*x + cb*m + cc*m_prev`` and the corrected next
    sample ``base + ck*m_next`` (m: x0 prediction)."""
    a: float
    b: float
    c: float
    ca: float = 0.0
    cb: float = 0.0
    cc: float = 0.0
    ck: float = 0.0


def _multistep_weights(s_prev: Optional[float], s: float, t: float, order: int) -> _Weights:
    """Predictor weights (DPM++ 2M = UniP-2 bh2) and UniC weights for a step s -> t."""
    a, g = t / s, (s - t) / s          # first-order (DDIM) step: a + g = 1, exact at t = 0
    if order == 1:
        # UniC-1 with its fixed rho = 1/2: trapezoid on the x0 prediction.
        return _Weights(a, g, 0.0, a, g / 2, 0.0, g / 2)
    h = _log_snr(t) - _log_snr(s)
    ratio = (_log_snr(s) - _log_snr(s_prev)) / h     # r' = h_prev / h; inf when s_prev = 1
    half = 0.5 / ratio
    predictor = (a, g * (1 + half), -g * half)
    # UniC-2: solve [[1, 1], [r, 1]] rho = [b1, b2] with r = -r' (diffusers'
    # R, b); rho0 weights the divided difference (m_prev - m) / r.
    phi1, phi2, phi3 = _phi(-h)
    b1, b2 = phi2 / phi1, 2 * phi3 / phi1
    rho0 = (b1 - b2) / (1 + ratio)
    rho1 = b1 - rho0
    q = -rho0 / ratio
    return _Weights(*predictor, a, g * (1 - q - rho1), g * q, g * rho1)


def _combine(x: torch.Tensor, a: float, m: torch.Tensor, b: float,
             m_prev: Optional[torch.Tensor] = None, c: float = 0.0) -> torch.Tensor:
    out = torch.mul(x, a)
    out.add_(m, alpha=b)
    if m_prev is not None and c != 0.0:
        out.add_(m_prev, alpha=c)
    return out


class Solver(abc.ABC):
    """One job's solver: ``x_next = step(i, x, velocity)`` for i = 0 .. num_steps-1."""

    name = ""

    def __init__(self, sigmas: torch.Tensor):
        if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError("sigmas must be a 1-D tensor of at least 2 values (see flow_sigmas)")
        self.sigmas = sigmas.detach().to("cpu", torch.float32)
        self._s: List[float] = self.sigmas.tolist()
        if not all(math.isfinite(v) for v in self._s):
            raise ValueError("sigmas must be finite")
        if self._s[0] > 1.0 or self._s[-1] < 0.0 or any(b >= a for a, b in zip(self._s, self._s[1:])):
            raise ValueError("sigmas must fall strictly from at most 1 to at least 0")
        self.num_steps = len(self._s) - 1

    def _check(self, i: int, x: torch.Tensor, velocity: torch.Tensor) -> None:
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step {i} is outside 0..{self.num_steps - 1}")
        if x.dtype != torch.float32 or velocity.dtype != torch.float32:
            raise ValueError(f"x and velocity must be float32, got {x.dtype} and {velocity.dtype}")
        if x.shape != velocity.shape:
            raise ValueError(f"x {tuple(x.shape)} and velocity {tuple(velocity.shape)} differ in shape")

    @abc.abstractmethod
    def step(self, i: int, x: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """The sample at sigma[i + 1] from the one at sigma[i] and its velocity (float32)."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)}")


class EulerSolver(Solver):
    """Upstream's update ``x + (sigma_next - sigma) * v``, same float32 ops."""

    name = "euler"

    def step(self, i, x, velocity):
        self._check(i, x, velocity)
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * velocity


class _MultistepSolver(Solver):
    """Keeps the previous x0 prediction (and what the subclass adds) between steps."""

    history_keys = ("x0_prev",)

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self._done = 0
        self._history: Dict[str, torch.Tensor] = {}
        self._weights = [self._step_weights(i) for i in range(self.num_steps)]

    @abc.abstractmethod
    def _order(self, i: int) -> int:
        """1 or 2: the order of step i."""

    def _step_weights(self, i: int) -> _Weights:
        order = self._order(i)
        return _multistep_weights(self._s[i - 1] if order == 2 else None, self._s[i], self._s[i + 1], order)

    def _expected_keys(self, done: int) -> set:
        return set() if done == 0 else {"x0_prev"}

    def _begin(self, i, x, velocity):
        self._check(i, x, velocity)
        if i != self._done:
            raise ValueError(f"{self.name}: step {i} asked for after {self._done} completed steps; "
                             f"a resumed run must load the solver's state_dict first")
        prev = {k: v.to(x.device) for k, v in self._history.items()}
        return x - self.sigmas[i] * velocity, prev

    def state_dict(self):
        state = {f"{self.name}.step": torch.tensor(self._done, dtype=torch.int64),
                 f"{self.name}.sigmas": self.sigmas.clone()}
        state.update({f"{self.name}.{k}": v for k, v in self._history.items()})
        return state

    def load_state_dict(self, state):
        prefix = f"{self.name}."
        step_key, sigmas_key = prefix + "step", prefix + "sigmas"
        if step_key not in state or sigmas_key not in state:
            raise ValueError(f"not a {self.name} solver state (keys: {sorted(state)})")
        if not torch.equal(state[sigmas_key].to("cpu", torch.float32), self.sigmas):
            raise ValueError(f"{self.name} state was saved for a different sigma schedule (steps or shift)")
        done = int(state[step_key])
        if not 0 <= done <= self.num_steps:
            raise ValueError(f"{self.name} state says {done} steps are done, of {self.num_steps}")
        history = {k[len(prefix):]: v for k, v in state.items() if k not in (step_key, sigmas_key)}
        if not all(k.startswith(prefix) for k in state) or set(history) != self._expected_keys(done):
            raise ValueError(f"{self.name} state after {done} steps needs "
                             f"{sorted(self._expected_keys(done))}, got {sorted(history)}")
        self._done, self._history = done, dict(history)


class DPMpp2MSolver(_MultistepSolver):
    """DPM-Solver++(2M); the step to sigma = 0 returns the x0 prediction."""

    name = "dpmpp_2m"

    def _order(self, i):
        return 1 if i == 0 or self._s[i + 1] == 0.0 else 2

    def step(self, i, x, velocity):
        m, prev = self._begin(i, x, velocity)
        w = self._weights[i]
        x_next = _combine(x, w.a, m, w.b, prev.get("x0_prev"), w.c)
        self._history = {"x0_prev": m}
        self._done = i + 1
        return x_next


class UniPCSolver(_MultistepSolver):
    """UniPC-2 bh2 (predict x0) with the UniC corrector; first order first and last."""

    name = "unipc"

    def _order(self, i):
        return 1 if i == 0 or i == self.num_steps - 1 else 2

    def _expected_keys(self, done):
        if done == 0:
            return set()
        return {"x0_prev", "corrector_base"} if done < self.num_steps else {"x0_prev"}

    def step(self, i, x, velocity):
        m, prev = self._begin(i, x, velocity)
        if i > 0:
            # UniC: the sample the network was run at is corrected with its own output.
            x = prev["corrector_base"] + self._weights[i - 1].ck * m
        w = self._weights[i]
        x_next = _combine(x, w.a, m, w.b, prev.get("x0_prev"), w.c)
        history = {"x0_prev": m}
        if i + 1 < self.num_steps:
            history["corrector_base"] = _combine(x, w.ca, m, w.cb, prev.get("x0_prev"), w.cc)
        self._history = history
        self._done = i + 1
        return x_next


SOLVERS = {cls.name: cls for cls in (EulerSolver, UniPCSolver, DPMpp2MSolver)}


def make_solver(name: str, sigmas: torch.Tensor) -> Solver:
    """A fresh solver for one job; ValueError naming the choices for an unknown name."""
    try:
        cls = SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SOLVERS)}") from None
    return cls(sigmas)


def solve(solver_name: str, sigmas: torch.Tensor, x: torch.Tensor, velocity_fn: VelocityFn,
          start_step: int = 0, callback: Optional[Callable[[int, int, torch.Tensor, Solver], None]] = None,
          *, state: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Integrate from step ``start_step`` to the end; returns the final sample.

    ``velocity_fn(x, sigma)`` gets the float32 sigma of the step as a 0-dim
    CPU tensor; ``state`` is a solver ``state_dict()`` saved after
    ``start_step`` steps; ``callback(i, n, x, solver)`` runs after step i.
    """
    solver = make_solver(solver_name, sigmas)
    if state is not None:
        solver.load_state_dict(state)
    for i in range(start_step, solver.num_steps):
        x = solver.step(i, x, velocity_fn(x, solver.sigmas[i]))
        if callback is not None:
            callback(i, solver.num_steps, x, solver)
    return x


def sampler_options(args, default_shift: float) -> tuple:
    """(solver name, shift) of the run's ``--sampler`` and ``--shift`` (None: ``default_shift``)."""
    from .run_config import of

    sampling = of(args).sampling
    name = sampling.sampler
    shift = default_shift if sampling.shift is None else sampling.shift
    try:
        shift = float(shift)
    except (TypeError, ValueError):
        raise UserError(f"--shift {shift}: not a number; give a value > 0 (SCAIL's config uses 5)") from None
    if not math.isfinite(shift) or shift <= 0:
        raise UserError(f"--shift {shift}: must be > 0 (SCAIL's config uses 5)")
    return name, shift
