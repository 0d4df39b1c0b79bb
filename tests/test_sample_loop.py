"""The engine's denoising loop: the solver slot, guidance-1 steps and resume.

``SATVideoDiffusionEngine.sample`` runs on a stand-in for upstream's
RFSampler (same interface: ``prepare_sampling_loop``, ``denoise`` with
VanillaCFG's uncond/cond batch, ``sampler_step``) and a small row-wise
network, so every path can be compared with a loop written out here. A
``scail`` test repeats the guidance-1 check with upstream's own sampler,
guider and denoiser.
"""
import types

import pytest
import torch
from torch import nn

from scail_win import samplers
from scail_win.diffusion_video import SATVideoDiffusionEngine

SHAPE = (3, 4, 6, 8)  # T C H W of the latents


class Network(nn.Module):
    """Row-wise in the batch: a sample's output depends only on its own inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, c, **kwargs):
        self.calls.append(x.shape[0])
        text = c["crossattn"].mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        s = sigma.view(-1, 1, 1, 1, 1)
        return torch.tanh(x * (1.0 - 0.3 * s)) + text * (0.5 + s)


class Denoiser:
    def __call__(self, network, x, sigma, c, **kwargs):
        return network(x, sigma, c)


class Guider:
    def __init__(self, scale):
        self.scale = scale

    def prepare_inputs(self, x, s, c, uc):
        return torch.cat([x] * 2), torch.cat([s] * 2), {"crossattn": torch.cat([uc["crossattn"], c["crossattn"]])}

    def __call__(self, x, sigma):
        x_u, x_c = x.chunk(2)
        return x_u + self.scale * (x_c - x_u)


class RFSampler:
    """Upstream's RFSampler interface, with its shifted schedule."""

    def __init__(self, steps, scale):
        self.num_steps, self.guider, self.distill = steps, Guider(scale), False

    def prepare_sampling_loop(self, x, cond, uc):
        sigmas = samplers.flow_sigmas(self.num_steps, 5.0)
        return x, x.new_ones([x.shape[0]]), sigmas, len(sigmas), cond, uc, None

    def denoise(self, x, denoiser, sigma, cond, uc):
        out = denoiser(*self.guider.prepare_inputs(x, sigma, cond, uc), cfg_scale=self.guider.scale)
        return self.guider(out.to(torch.float32), sigma)

    def sampler_step(self, sigma, next_sigma, denoiser, x, cond, uc):
        output = self.denoise(x, denoiser, sigma, cond, uc).to(torch.float32)
        return x + (next_sigma - sigma).view(-1, 1, 1, 1, 1) * output


def make_engine(steps=6, scale=4.0, sampler="euler", shift=None, sampler_obj=None, denoiser=None):
    engine = SATVideoDiffusionEngine.__new__(SATVideoDiffusionEngine)
    nn.Module.__init__(engine)
    engine.args = types.SimpleNamespace(sampler=sampler, shift=shift)
    engine.model = Network()
    engine.denoiser = denoiser or Denoiser()
    engine.sampler = sampler_obj or RFSampler(steps, scale)
    engine.compute_device = engine.device = torch.device("cpu")
    engine.dtype = torch.float32
    engine.memory_plan, engine._block_swap, engine.current_phase = None, None, None
    return engine


def conditions(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"crossattn": torch.randn(1, 5, 7, generator=g)}, {"crossattn": torch.randn(1, 5, 7, generator=g)}


def run(engine, seed=3, **kwargs):
    c, uc = conditions()
    torch.manual_seed(seed)
    return engine.sample(dict(c), uc=dict(uc), batch_size=1, shape=SHAPE, **kwargs)


def noise(seed=3):
    torch.manual_seed(seed)
    return torch.randn(1, *SHAPE).float()


def test_guidance_one_runs_only_the_conditional_pass_and_equals_the_batched_cond_half():
    engine = make_engine(steps=5, scale=1.0)
    out = run(engine)
    assert engine.model.calls == [1] * 5            # no unconditional pass, no batch of 2
    # The reference: the full CFG batch, keeping its conditional half.
    c, uc = conditions()
    net, x, sigmas = Network(), noise(), samplers.flow_sigmas(5, 5.0)
    guider = Guider(1.0)
    for i in range(5):
        s = torch.ones(1) * sigmas[i]
        batched = net(*guider.prepare_inputs(x, s, c, uc)).to(torch.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * batched.chunk(2)[1]
    assert torch.equal(out, x)


def test_default_euler_with_cfg_is_upstreams_sampler_step():
    engine = make_engine(steps=4, scale=4.0)
    out = run(engine)
    assert engine.model.calls == [2] * 4
    ref_engine = make_engine(steps=4, scale=4.0)
    c, uc = conditions()
    x, sigmas = noise(), samplers.flow_sigmas(4, 5.0)
    for i in range(4):
        x = ref_engine.sampler.sampler_step(torch.ones(1) * sigmas[i], torch.ones(1) * sigmas[i + 1],
                                            lambda *a, **k: ref_engine.model(*a[:3]), x, c, uc)
    assert torch.equal(out, x)


@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m"])
def test_solver_slot_equals_the_solver_on_the_guided_velocity(name):
    engine = make_engine(steps=6, scale=4.0, sampler=name)
    out = run(engine)
    c, uc = conditions()
    helper = make_engine(steps=6, scale=4.0)

    def velocity(x, sigma):
        return helper.sampler.denoise(x, lambda *a, **k: helper.model(*a[:3]), torch.ones(1) * sigma, c, uc)

    ref = samplers.solve(name, samplers.flow_sigmas(6, 5.0), noise(), velocity)
    assert torch.equal(out, ref)


def test_the_attached_run_config_picks_the_solver_not_a_stale_args_attribute():
    from scail_win import run_config

    euler = run(make_engine(sampler="euler"))
    engine = make_engine(sampler="euler")
    engine.args.run_config = run_config.RunConfig.from_options(dict(sampler="unipc"))
    assert engine.sampling_settings() == ("unipc", None)
    assert torch.allclose(run(engine), run(make_engine(sampler="unipc"))) and not torch.allclose(run(engine), euler)


def test_shift_changes_the_schedule():
    base, shifted = run(make_engine(steps=4, shift=None)), run(make_engine(steps=4, shift=2.0))
    same = run(make_engine(steps=4, shift=5.0))
    assert torch.equal(base, same)  # the config's shift
    assert not torch.equal(base, shifted)


@pytest.mark.parametrize("name", ["euler", "unipc", "dpmpp_2m"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_resume_from_a_saved_step_is_bit_identical(name, scale):
    straight = run(make_engine(steps=6, scale=scale, sampler=name))
    saved = {}

    def on_step(i, n, x, solver):
        if i + 1 == 3:
            saved.update(x=x.clone(), state={k: v.clone() for k, v in solver.state_dict().items()})

    run(make_engine(steps=6, scale=scale, sampler=name), step_callback=on_step)
    resumed = run(make_engine(steps=6, scale=scale, sampler=name), start_step=3, start_latents=saved["x"],
                  solver_state=saved["state"])
    assert torch.equal(straight, resumed)


def test_step_cache_is_told_every_step():
    engine = make_engine(steps=4)
    seen = []
    engine.step_cache = types.SimpleNamespace(begin_step=lambda i, n: seen.append((i, n)),
                                              summary=lambda: "cache summary")
    run(engine)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


@pytest.mark.scail
def test_guidance_one_with_upstreams_sampler_guider_and_denoiser():
    """Upstream's RFSampler (shift 5), VanillaCFG at scale 1 and Denoiser with RFScaling."""
    import sat.mpu

    if not hasattr(sat.mpu, "get_sequence_parallel_world_size"):
        pytest.skip("sgm needs SCAIL's vendored sat; PyPI's SwissArmyTransformer comes first on sys.path here")
    from sgm.modules.diffusionmodules.denoiser import Denoiser as UpstreamDenoiser
    from sgm.modules.diffusionmodules.sampling import RFSampler as UpstreamSampler

    def sampler(scale):
        return UpstreamSampler(
            hunyuan_schedule=True, shift_scale=5, num_steps=5, verbose=False,
            discretization_config={"target": "sgm.modules.diffusionmodules.discretizer.RFDiscretization"},
            guider_config={"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": scale}})

    def denoiser():
        return UpstreamDenoiser(
            weighting_config={"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            scaling_config={"target": "sgm.modules.diffusionmodules.denoiser_scaling.RFScaling"})

    engine = make_engine(sampler_obj=sampler(1.0), denoiser=denoiser())
    engine.sampler.device = "cpu"
    out = run(engine)
    assert engine.model.calls == [1] * 5
    # Upstream's loop on the CFG batch, keeping the conditional half.
    upstream = make_engine(sampler_obj=sampler(1.0), denoiser=denoiser())
    upstream.sampler.device = "cpu"
    c, uc = conditions()
    x, s_in, sigmas, _, c, uc, _ = upstream.sampler.prepare_sampling_loop(noise(), c, uc)
    for i in range(5):
        inputs = upstream.sampler.guider.prepare_inputs(x, s_in * sigmas[i], c, uc)
        batched = upstream.denoiser(upstream.model, *inputs).to(torch.float32)
        x = x + (s_in * sigmas[i + 1] - s_in * sigmas[i]).view(-1, 1, 1, 1, 1) * batched.chunk(2)[1]
    assert torch.equal(out, x)
