"""Flow-matching solvers: schedule, convergence order, upstream's Euler, resume."""
import argparse
import ast
import math
import os
from pathlib import Path

import pytest
import torch

from scail_win import samplers
from scail_win.io import resume
from scail_win.errors import UserError

STEP_COUNTS = (8, 16, 32, 64)


class GaussianFlow:
    """Data x0 ~ N(mu, s^2) per element on the path (1 - sigma) x0 + sigma eps.

    The marginal at sigma is N(m, sd^2) with m = (1 - sigma) mu and
    sd = sqrt((1 - sigma)^2 s^2 + sigma^2); the ODE keeps z = (x - m) / sd
    fixed, so v = m' + sd' z and the exact endpoint from x_1 = eps is
    mu + s eps.
    """

    def __init__(self, n=4096, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        self.s = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        self.eps = torch.randn(n, generator=g, dtype=torch.float64)
        self.exact = self.mu + self.s * self.eps

    def velocity(self, x, sigma):
        sigma = float(sigma)
        sd = torch.sqrt((1 - sigma) ** 2 * self.s ** 2 + sigma ** 2)
        d_sd = (sigma - (1 - sigma) * self.s ** 2) / sd
        return (-self.mu + d_sd * (x.double() - (1 - sigma) * self.mu) / sd).float()

    def error(self, name, steps, shift):
        x = samplers.solve(name, samplers.flow_sigmas(steps, shift), self.eps.float(), self.velocity)
        return (x.double() - self.exact).pow(2).mean().sqrt().item()


def fitted_order(steps, errors):
    """Minus the least-squares slope of log(error) against log(steps)."""
    xs, ys = [math.log(n) for n in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


@pytest.fixture(scope="module")
def flow():
    return GaussianFlow()


# Measured here: shift 5 -> euler 0.95, dpmpp_2m 1.71, unipc 2.07;
# shift 1 -> 0.97, 1.64, 2.02. DPM++ 2M's global error goes as log(N)/N^2 on
# this problem (its lambda steps near sigma = 0 and 1 do not shrink with N).
@pytest.mark.parametrize("shift", [5.0, 1.0])
@pytest.mark.parametrize("name, low, high", [("euler", 0.85, 1.15), ("dpmpp_2m", 1.5, 2.5),
                                             ("unipc", 1.8, 2.6)])
def test_order_of_convergence(flow, name, low, high, shift):
    order = fitted_order(STEP_COUNTS, [flow.error(name, n, shift) for n in STEP_COUNTS])
    assert low <= order <= high, f"{name} at shift {shift}: measured order {order:.2f}"


@pytest.mark.parametrize("shift", [5.0, 1.0])
@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m"])
def test_twenty_steps_beat_euler_at_fifty(flow, name, shift):
    assert flow.error(name, 20, shift) < flow.error("euler", 50, shift)


def lam(sigma):
    return -math.inf if sigma >= 1 else math.inf if sigma <= 0 else math.log((1 - sigma) / sigma)


def reference_unipc(sigmas, x, velocity):
    """UniPC bh2, predict x0, order 2, lower order final, as diffusers lays it out (float64)."""
    sig = sigmas.tolist()
    n = len(sig) - 1
    x, outputs, last, last_order = x.double(), [None, None], None, 0

    def weights(order, rks, hh):
        r_rows, b = [], []
        h_phi_k, factorial, b_h = math.expm1(hh) / hh - 1, 1, math.expm1(hh)
        for k in range(1, order + 1):
            r_rows.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(r_rows), torch.tensor(b, dtype=torch.float64)

    for i in range(n):
        m = x - sig[i] * velocity(x.float(), sigmas[i]).double()
        if i > 0:
            t, s0, m0 = sig[i], sig[i - 1], outputs[-1]
            h = lam(t) - lam(s0)
            rks, d1s = [], []
            if last_order == 2:
                rk = (lam(sig[i - 2]) - lam(s0)) / h
                rks, d1s = [rk], [(outputs[-2] - m0) / rk]
            r_mat, b = weights(last_order, torch.tensor(rks + [1.0], dtype=torch.float64), -h)
            rhos = torch.tensor([0.5], dtype=torch.float64) if last_order == 1 else torch.linalg.solve(r_mat, b)
            corr = rhos[0] * d1s[0] if d1s else 0
            x = t / s0 * last - (1 - t) * math.expm1(-h) * m0 - (1 - t) * math.expm1(-h) * (corr + rhos[-1] * (m - m0))
        outputs = [outputs[1], m]
        last_order = min(2, n - i, i + 1)
        last = x
        t, s0 = sig[i + 1], sig[i]
        h = lam(t) - lam(s0)
        x = t / s0 * x - (1 - t) * math.expm1(-h) * m
        if last_order == 2:
            rk = (lam(sig[i - 1]) - lam(s0)) / h
            x = x - (1 - t) * math.expm1(-h) * 0.5 * (outputs[0] - m) / rk
    return x


def reference_dpmpp_2m(sigmas, x, velocity):
    """k-diffusion's DPM-Solver++(2M) in the flow parametrisation (float64)."""
    sig = sigmas.tolist()
    x, old = x.double(), None
    for i in range(len(sig) - 1):
        m = x - sig[i] * velocity(x.float(), sigmas[i]).double()
        s, t = sig[i], sig[i + 1]
        if t == 0:
            x = m
        else:
            h = lam(t) - lam(s)
            d = m
            if old is not None:
                r = (lam(s) - lam(sig[i - 1])) / h
                d = (1 + 1 / (2 * r)) * m - (1 / (2 * r)) * old
            x = t / s * x - (1 - t) * math.expm1(-h) * d
        old = m
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 50])
@pytest.mark.parametrize("wan_start", [False, True], ids=["sigma1", "wan_sigma_max"])
@pytest.mark.parametrize("name, reference", [("unipc", reference_unipc), ("dpmpp_2m", reference_dpmpp_2m)])
def test_matches_the_textbook_algorithm(name, reference, steps, wan_start):
    """Our float32 weights against the published layout in float64, from sigma = 1 (SCAIL)
    and from Wan's sigma_max < 1 (where lambda stays finite)."""
    flow = GaussianFlow(n=512, seed=1)
    sigmas = samplers.flow_sigmas(steps, 5.0)
    if wan_start:
        sigmas[0] = 0.9998
    ours = samplers.solve(name, sigmas, flow.eps.float(), flow.velocity).double()
    theirs = reference(sigmas, flow.eps, flow.velocity)
    assert not torch.equal(ours, flow.eps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def upstream_sampler_step(x, velocity, sigma, next_sigma):
    """RFSampler.sampler_step's update as upstream writes it (s_in, append_dims)."""
    s_in = x.new_ones([x.shape[0]])
    delta = s_in * next_sigma - s_in * sigma
    return x + delta.reshape(-1, *([1] * (x.ndim - 1))) * velocity


def random_run(steps, seed=3, device="cpu", shape=(1, 5, 4, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    velocities = [torch.randn(shape, generator=g).to(device) for _ in range(steps)]
    return x, velocities


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_euler_is_upstreams_update_bit_for_bit(device):
    sigmas = samplers.flow_sigmas(50, 5)
    solver = samplers.make_solver("euler", sigmas)
    x, velocities = random_run(50, device=device)
    ours = theirs = x
    for i, v in enumerate(velocities):
        ours = solver.step(i, ours, v)
        theirs = upstream_sampler_step(theirs, v, sigmas[i], sigmas[i + 1])
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), f"step {i}"


def upstream_tree_functions():
    """make_flow_timesteps and RFSampler.sampler_step compiled from the SCAIL tree's file
    (importing sgm pulls in pytorch_lightning and more)."""
    import numpy as np

    root = Path(os.environ["SCAIL_ROOT"])
    path = root / "sgm" / "modules" / "diffusionmodules" / "sampling.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = {"make_flow_timesteps", "RFSampler"}
    body = [node for node in tree.body if getattr(node, "name", None) in wanted]
    assert {node.name for node in body} == wanted, f"{path} no longer defines {wanted}"
    util = ast.parse((root / "sgm" / "util.py").read_text(encoding="utf-8"))
    body += [node for node in util.body if getattr(node, "name", None) == "append_dims"]
    namespace = dict(torch=torch, np=np, BaseDiffusionSampler=object)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@pytest.mark.scail
@pytest.mark.parametrize("steps, shift", [(50, 5), (50, 5.0), (1, 5), (2, 1), (7, 3.0), (20, 7), (100, 5), (33, 0.5)])
def test_flow_sigmas_equal_upstream_bit_for_bit(steps, shift):
    upstream = upstream_tree_functions()["make_flow_timesteps"]
    expected = upstream(0, steps, verbose=False, shift_scale=shift, mode="normal")
    assert expected.dtype == torch.float32 and torch.equal(samplers.flow_sigmas(steps, shift), expected)


@pytest.mark.scail
def test_euler_equals_upstream_rfsampler_step():
    ns = upstream_tree_functions()
    sampler = object.__new__(ns["RFSampler"])
    sigmas = ns["make_flow_timesteps"](0, 50, verbose=False, shift_scale=5, mode="normal")
    x, velocities = random_run(50, seed=4)
    solver = samplers.make_solver("euler", samplers.flow_sigmas(50, 5))
    ours = theirs = x
    s_in = x.new_ones([x.shape[0]])
    for i, v in enumerate(velocities):
        sampler.denoise = lambda *args, v=v, **kwargs: v
        theirs = sampler.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], None, theirs, None)
        ours = solver.step(i, ours, v)
        assert torch.equal(ours, theirs), f"step {i}"


@pytest.mark.parametrize("steps, shift", [(50, 5), (1, 5.0), (2, 1), (7, 3.0), (100, 5), (33, 0.5)])
def test_flow_sigmas_schedule(steps, shift):
    sigmas = samplers.flow_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    # Wan's form of the same shift, u = 1 - i/steps: shift*u / (1 + (shift-1)*u).
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    formula = shift * u / (1 + (shift - 1) * u)
    assert (sigmas.double() - formula).abs().max() <= 2 ** -24


def test_flow_sigmas_follow_numpy_linspace_bit_for_bit():
    np = pytest.importorskip("numpy")
    for steps in (1, 3, 49, 50, 64, 1000):
        t = np.linspace(0, 1.0, steps + 1, endpoint=True)
        t = t / (5 + t - 5 * t)
        assert torch.equal(samplers.flow_sigmas(steps, 5), 1 - torch.tensor(t, dtype=torch.float32)), steps


@pytest.mark.parametrize("steps, shift, match", [(0, 5, "steps must be >= 1"), (-3, 5, "steps must be >= 1"),
                                                 (2.5, 5, "whole number"), (True, 5, "whole number"),
                                                 (10, 0, "shift"), (10, -1, "shift"), (10, float("nan"), "shift")])
def test_flow_sigmas_rejects_bad_settings(steps, shift, match):
    with pytest.raises(ValueError, match=match):
        samplers.flow_sigmas(steps, shift)


def test_unknown_solver_names_the_choices():
    with pytest.raises(ValueError, match="'heun'.*euler, unipc, dpmpp_2m"):
        samplers.make_solver("heun", samplers.flow_sigmas(4, 5))


@pytest.mark.parametrize("sigmas", [torch.tensor([1.0]), torch.tensor([1.0, 0.5, 0.5, 0.0]),
                                    torch.tensor([1.5, 0.0]), torch.tensor([1.0, -0.1]),
                                    torch.tensor([[1.0, 0.0]]), torch.tensor([1.0, float("nan"), 0.0])])
def test_bad_sigmas_are_refused(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        samplers.make_solver("unipc", sigmas)


def test_step_checks_its_inputs():
    solver = samplers.make_solver("dpmpp_2m", samplers.flow_sigmas(4, 5))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="float32"):
        solver.step(0, x.double(), x.double())
    with pytest.raises(ValueError, match="shape"):
        solver.step(0, x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="outside 0..3"):
        solver.step(4, x, x)
    with pytest.raises(ValueError, match="load the solver's state_dict"):
        solver.step(2, x, x)


def run_with_resume(name, steps, stop_after, tmp_path, device="cpu"):
    """Latents after ``steps`` steps, saved after ``stop_after`` of them through resume's file."""
    flow = GaussianFlow(n=96, seed=2)
    x = flow.eps.float().reshape(1, 2, 3, 4, 4).to(device)

    def velocity(x, sigma):
        return flow.velocity(x.cpu().reshape(-1), sigma).reshape(x.shape).to(x.device)

    sigmas = samplers.flow_sigmas(steps, 5)
    solver = samplers.make_solver(name, sigmas)
    for i in range(stop_after):
        x = solver.step(i, x, velocity(x, sigmas[i]))
    path = tmp_path / f"{name}-{stop_after}.resume.safetensors"
    resume.save_state(path, resume.ResumeState(stop_after, steps, x, torch.get_rng_state(), "fp",
                                               solver.state_dict()))
    state = resume.load_state(path, "fp")
    return samplers.solve(name, sigmas, state.latents.to(device), velocity, start_step=state.step,
                          state=state.solver_state)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(samplers.SOLVERS))
def test_resumed_run_is_bit_identical(name, device, tmp_path):
    straight = run_with_resume(name, 6, 6, tmp_path, device)
    for stop_after in range(6):
        assert torch.equal(run_with_resume(name, 6, stop_after, tmp_path, device), straight), stop_after


def test_state_dict_is_a_snapshot_of_the_history():
    sigmas = samplers.flow_sigmas(5, 5)
    solver = samplers.make_solver("unipc", sigmas)
    x, velocities = random_run(5)
    x = solver.step(0, x, velocities[0])
    x = solver.step(1, x, velocities[1])
    saved = {k: v.clone() for k, v in solver.state_dict().items()}
    kept = solver.state_dict()
    assert set(kept) == {"unipc.step", "unipc.sigmas", "unipc.x0_prev", "unipc.corrector_base"}
    solver.step(2, x, velocities[2])
    assert all(torch.equal(kept[k], saved[k]) for k in saved)


@pytest.mark.parametrize("name, other", [("unipc", "dpmpp_2m"), ("dpmpp_2m", "unipc")])
def test_foreign_or_stale_state_is_refused(name, other):
    x, velocities = random_run(3)
    source = samplers.make_solver(other, samplers.flow_sigmas(6, 5))
    source.step(0, x, velocities[0])
    with pytest.raises(ValueError, match=f"not a {name} solver state"):
        samplers.make_solver(name, samplers.flow_sigmas(6, 5)).load_state_dict(source.state_dict())
    same = samplers.make_solver(name, samplers.flow_sigmas(6, 5))
    same.step(0, x, velocities[0])
    with pytest.raises(ValueError, match="different sigma schedule"):
        samplers.make_solver(name, samplers.flow_sigmas(6, 3)).load_state_dict(same.state_dict())
    truncated = {k: v for k, v in same.state_dict().items() if not k.endswith("x0_prev")}
    with pytest.raises(ValueError, match="needs"):
        samplers.make_solver(name, samplers.flow_sigmas(6, 5)).load_state_dict(truncated)
    with pytest.raises(ValueError, match="keeps no state"):
        samplers.make_solver("euler", samplers.flow_sigmas(6, 5)).load_state_dict(same.state_dict())


def test_old_resume_files_load_with_no_solver_state(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.resume.safetensors"
    save_file({"latents": torch.ones(2, 3), "cpu_rng": torch.get_rng_state()}, str(path),
              metadata={"format": resume.FORMAT, "step": "3", "total_steps": "50", "fingerprint": "fp"})
    state = resume.load_state(path, "fp")
    assert state.step == 3 and state.solver_state == {} and torch.equal(state.latents, torch.ones(2, 3))
    samplers.make_solver("euler", samplers.flow_sigmas(50, 5)).load_state_dict(state.solver_state)


def test_solver_state_round_trips_through_the_resume_file(tmp_path):
    state_dict = {"unipc.step": torch.tensor(2), "unipc.x0_prev": torch.randn(3, 4)}
    path = tmp_path / "s.resume.safetensors"
    resume.save_state(path, resume.ResumeState(2, 9, torch.zeros(3, 4), torch.get_rng_state(), "fp", state_dict))
    loaded = resume.load_state(path, "fp").solver_state
    assert set(loaded) == set(state_dict) and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_solve_calls_back_after_every_step():
    seen = []
    sigmas = samplers.flow_sigmas(4, 5)
    x = samplers.solve("dpmpp_2m", sigmas, torch.ones(3), lambda x, s: x * 0 + float(s), start_step=0,
                       callback=lambda i, n, x, solver: seen.append((i, n, solver.name)))
    assert seen == [(i, 4, "dpmpp_2m") for i in range(4)] and x.dtype == torch.float32


@pytest.mark.parametrize("sampler, shift, expected", [(None, None, ("euler", 5.0)), ("unipc", 3, ("unipc", 3.0)),
                                                      ("dpmpp_2m", None, ("dpmpp_2m", 5.0))])
def test_sampler_options_from_args(sampler, shift, expected):
    assert samplers.sampler_options(argparse.Namespace(sampler=sampler, shift=shift), 5) == expected


@pytest.mark.parametrize("sampler, shift, match", [("ddim", None, "--sampler ddim"), ("euler", 0, "--shift 0"),
                                                   ("euler", "x", "--shift x")])
def test_sampler_options_refuse_bad_flags(sampler, shift, match):
    with pytest.raises(UserError, match=match):
        samplers.sampler_options(argparse.Namespace(sampler=sampler, shift=shift), 5)


def test_bench_samplers_prints_a_row_per_solver():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_samplers.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "2", "3", "--steps", "4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == list(samplers.SOLVERS)
