import logging

import pytest
import torch
from torch import nn

from scail_win.errors import UserError
from scail_win.placement.memory_plan import (
    GiB,
    DiTSpec,
    default_budget_bytes,
    dit_activation_bytes,
    dit_fixed_bytes,
    plan_memory,
    scail_specs,
)
from scail_win.model.spec import ModelSpec

PHASES = ("text", "clip", "vae_encode", "denoise", "vae_decode")


def packaged_spec():
    from omegaconf import OmegaConf

    from scail_win.arguments import packaged_config_path

    return ModelSpec.from_config(OmegaConf.load(packaged_config_path()))


PACKAGED = packaged_spec()


def specs(h=512, w=896, f=81, **kw):
    dit, t5, clip, vae = scail_specs(PACKAGED, h, w, f, **kw)
    return dict(t5=t5, clip=clip, vae=vae), dit


# --- sizes ----------------------------------------------------------------------


def test_specs_take_the_model_dimensions():
    _, dit = specs()
    assert (dit.num_layers, dit.hidden, dit.ffn, dit.head_dim) == (40, 5120, 13824, 128)
    assert dit.tokens_per_sample == 48_832 and dit.context_tokens == 512 + 257
    assert dit.group_bytes == PACKAGED.layer_params * 2 and dit.resident_bytes == PACKAGED.resident_params * 2
    with pytest.raises(TypeError, match="ModelSpec"):
        scail_specs(512, 896, 81, 2)


def test_default_budget():
    assert default_budget_bytes(8 * GiB) == 6 * GiB
    assert default_budget_bytes(24 * GiB) == 20 * GiB


# --- plans --------------------------------------------------------------------


def test_8gib_card_fits_the_14b_model_at_512x896x81():
    parts, dit = specs()
    plan = plan_memory(dit, total_vram_bytes=8 * GiB, **parts)
    assert plan.budget_bytes == 6 * GiB
    assert set(plan.peaks) == set(PHASES)
    assert all(peak <= 6 * GiB for peak in plan.peaks.values()), plan.peaks
    assert plan.offload_mode == "pinned" and plan.swapped_blocks > 0
    assert plan.cfg_split
    assert plan.t5_placement == "swap" and plan.clip_placement == "gpu"
    assert plan.vae_tiling and plan.vae_decode_tile_px and plan.vae_encode_tile_px
    assert plan.vae_tile_kwargs_for("encode")["tile_px"] == plan.vae_encode_tile_px
    h, w = plan.vae_decode_tile_px
    assert plan.vae_tile_kwargs_for("decode")["tile_latent"] == (h // 8, w // 8)
    assert plan.resident_phases == () and plan.budget_gb == 6.0
    text = plan.describe()
    assert "DiT" in text and "swapped" in text and "CFG halves" in text and len(text.splitlines()) == 6


def test_large_card_keeps_everything_resident_and_uncut():
    parts, dit = specs()
    plan = plan_memory(dit, total_vram_bytes=141 * GiB, **parts)
    assert plan.blocks_on_gpu == 40 and plan.offload_mode == "none" and plan.prefetch == 0
    assert not plan.cfg_split and plan.layer_chunk_tokens is None
    assert plan.t5_placement == "gpu" and not plan.vae_tiling and plan.vae_tile_kwargs_for("decode") == {}
    assert plan.resident_phases == ("denoise",)
    assert "all 40 layers on the GPU" in plan.describe()
    # All layers fit, but not beside umT5 (when the activations are small):
    # the DiT leaves the GPU between phases.
    _, short = specs(256, 448, 17)
    full = dit_fixed_bytes(short, 40, 0, 2) + dit_activation_bytes(short, 2, None)
    beside_t5 = (short.resident_bytes + 40 * short.group_bytes + parts["t5"].weight_bytes
                 + parts["t5"].activation_bytes)
    assert full < beside_t5
    plan = plan_memory(short, budget_gb=(full + beside_t5) / 2 / GiB, **parts)
    assert plan.blocks_on_gpu == 40 and plan.t5_placement == "gpu" and plan.resident_phases == ()


def chunk_sizes(plan):
    unchunked = float("inf")
    return plan.layer_chunk_tokens or unchunked


@pytest.mark.parametrize("size", [(512, 896, 81), (512, 896, 33), (720, 1280, 81), (256, 448, 17)])
def test_every_phase_fits_and_more_memory_never_cuts_more(size):
    parts, dit = specs(*size)
    last = None
    for gb in [x / 2 for x in range(6, 200)]:
        try:
            plan = plan_memory(dit, budget_gb=gb, **parts)
        except UserError:
            assert last is None, f"{gb} GiB failed after a smaller budget worked"
            continue
        assert all(peak <= plan.budget_bytes for peak in plan.peaks.values()), (gb, plan.peaks)
        if last is not None:
            # Memory first buys back the prefetch, then the unsplit CFG batch
            # (exact, like upstream), then larger chunks, then resident blocks.
            assert plan.prefetch >= last.prefetch or plan.offload_mode == "none"
            assert plan.cfg_split <= last.cfg_split
            if (plan.cfg_split, plan.prefetch) == (last.cfg_split, last.prefetch):
                chunk, last_chunk = chunk_sizes(plan), chunk_sizes(last)
                assert chunk >= last_chunk
                if chunk == last_chunk:
                    assert plan.blocks_on_gpu >= last.blocks_on_gpu
        last = plan
    assert last.blocks_on_gpu == dit.num_layers and not last.cfg_split


def test_impossible_budget_names_the_minimum_and_the_minimum_works():
    parts, dit = specs()
    with pytest.raises(UserError, match=r"^--vram-budget 2 GiB is too small for 512x896, 81 frames: "
                                        r"the DiT needs at least [\d.]+ GiB") as err:
        plan_memory(dit, budget_gb=2.0, **parts)
    need = float(str(err.value).split("at least ")[1].split(" GiB")[0])
    plan = plan_memory(dit, budget_gb=need + 0.05, **parts)
    assert plan.blocks_on_gpu == 0 and plan.cfg_split
    with pytest.raises(UserError, match=r"^the 2\.5 GiB budget of this 4\.0 GiB GPU is too small"):
        plan_memory(dit, total_vram_bytes=4 * GiB, **parts)


def test_blocks_on_gpu_override():
    parts, dit = specs()
    plan = plan_memory(dit, budget_gb=30, blocks_on_gpu=7, **parts)
    assert plan.blocks_on_gpu == 7 and plan.peaks["denoise"] <= 30 * GiB
    with pytest.raises(UserError, match="--blocks-on-gpu"):
        plan_memory(dit, budget_gb=30, blocks_on_gpu=41, **parts)


def test_blocks_on_gpu_override_over_budget_warns(caplog):
    parts, dit = specs()
    with caplog.at_level(logging.WARNING, logger="scail_win.placement.memory_plan"):
        plan = plan_memory(dit, budget_gb=6, blocks_on_gpu=20, **parts)
    assert plan.blocks_on_gpu == 20
    assert "over the 6.0 GiB budget" in caplog.text


def test_offload_mode_follows_host_ram():
    parts, dit = specs()
    assert plan_memory(dit, budget_gb=6, host_ram_bytes=128 * GiB, **parts).offload_mode == "pinned"
    assert plan_memory(dit, budget_gb=6, host_ram_bytes=32 * GiB, **parts).offload_mode == "stream"
    assert plan_memory(dit, budget_gb=6, host_ram_bytes=32 * GiB, offload_mode="pinned", **parts).offload_mode == "pinned"
    # fp8 storage halves what the host holds.
    parts8, dit8 = specs(dit_host_bytes_per_param=1)
    assert plan_memory(dit8, budget_gb=6, host_ram_bytes=48 * GiB, **parts8).offload_mode == "pinned"


def test_no_cfg_batch_is_never_split():
    dit = DiTSpec(num_layers=4, hidden=64, ffn=128, head_dim=16, tokens_per_sample=10_000,
                  group_bytes=10 * 2**20, resident_bytes=2**20, cfg_batch=1)
    need = dit_fixed_bytes(dit, 0, 1, 1) + dit_activation_bytes(dit, 1, 4096)
    plan = plan_memory(dit, budget_gb=need / GiB * 1.01)
    assert not plan.cfg_split
    assert plan.peaks["denoise"] <= plan.budget_bytes


def test_activation_estimate_scales_with_tokens_batch_and_chunks():
    _, dit = specs()
    one = dit_activation_bytes(dit, 1, None)
    assert dit_activation_bytes(dit, 2, None) > 1.9 * one
    assert dit_activation_bytes(dit, 1, 4096) < one / 2
    _, small = specs(256, 448, 81)
    assert dit_activation_bytes(small, 1, None) < one / 3


def test_bad_arguments():
    _, dit = specs()
    with pytest.raises(ValueError):
        plan_memory(dit)
    with pytest.raises(UserError):
        plan_memory(dit, budget_gb=0)
    with pytest.raises(ValueError):
        plan_memory(dit, budget_gb=8, offload_mode="disk")


# --- split CFG ------------------------------------------------------------------


class Wrapper(nn.Module):
    """Shaped like sgm's OpenAIWrapper: forward(x, t, c, **kwargs); batch-1 entries broadcast."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, c, **kwargs):
        self.seen.append(x.shape[0])
        ref = c["ref"].expand(x.shape[0], -1)
        return x * t[:, None] + c["crossattn"].sum(1) + ref * kwargs["scale"] + kwargs["extra"]


def test_the_dit_is_loaded_where_the_plan_keeps_it():
    from scail_win.model.loader import dit_load_device

    parts, dit = specs()
    cuda = torch.device("cuda", 0)
    resident = plan_memory(dit, total_vram_bytes=141 * GiB, **parts)
    swapped = plan_memory(dit, total_vram_bytes=8 * GiB, **parts)
    assert dit_load_device(resident, cuda) == cuda
    assert dit_load_device(None, cuda) == cuda  # --offload none: upstream moves everything
    assert dit_load_device(swapped, cuda) == "cpu"
    assert dit_load_device(None, torch.device("cpu")) == "cpu"
    # All layers fit, but not beside umT5: the DiT waits in RAM for its phase.
    _, short = specs(256, 448, 17)
    between = plan_memory(short, budget_gb=(dit_fixed_bytes(short, 40, 0, 2) + 4 * GiB) / GiB, **parts)
    assert between.blocks_on_gpu == 40 and between.resident_phases == ()
    assert dit_load_device(between, cuda) == "cpu"


def test_split_cfg_runs_the_halves_in_turn_with_the_same_result():
    from scail_win.placement.registry import HookRegistry
    from scail_win.model.loader import _SplitCFG

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    c = {"crossattn": torch.randn(2, 5, 3, generator=g), "ref": torch.randn(1, 3, generator=g)}
    extra = torch.randn(2, 3, generator=g)
    net = Wrapper()
    full = net(x, t, dict(c), scale=2.0, extra=extra)
    HookRegistry.of(net).add(_SplitCFG())
    net.seen.clear()
    split = net(x, t, dict(c), scale=2.0, extra=extra)
    assert net.seen == [1, 1] and torch.equal(split, full)
    net.seen.clear()
    net(x[:1], t[:1], {"crossattn": c["crossattn"][:1], "ref": c["ref"]}, scale=2.0, extra=extra[:1])
    assert net.seen == [1]  # a batch of one is not split
