import argparse
import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from scail_win.io import jobs
from scail_win.placement import memory_plan as memory
from scail_win.model import loader as model_loader
from scail_win.placement import offload
from scail_win.arguments import packaged_config_path
from scail_win.model.spec import ModelSpec
from scail_win.testing.smoke import TINY_DIT

GiB = 1 << 30


def packaged_config():
    return OmegaConf.load(packaged_config_path())


def packaged_network():
    return OmegaConf.to_container(packaged_config().model.network_config, resolve=False)


# --- a module with SCAIL's parameter layout, for counting ---------------------------------------


class _Layer(nn.Module):
    """sat's BaseTransformerLayer as SCAIL builds it (no-affine input/post-attention norms)."""

    def __init__(self, d, ffn):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query_key_value, self.attention.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.cross_attention = nn.Module()
        self.cross_attention.query = nn.Linear(d, d)
        self.cross_attention.key_value = nn.Linear(d, 2 * d)
        self.cross_attention.dense = nn.Linear(d, d)
        self.post_cross_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h, self.mlp.dense_4h_to_h = nn.Linear(d, ffn), nn.Linear(ffn, d)


class ScailLayout(nn.Module):
    """SCAIL's DiT parameters (share_adaln, i2v CLIP, affine qk-norms), built on ``device``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, n, ted = spec.hidden_size, spec.num_layers, spec.time_embed_dim
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_Layer(d, spec.ffn_size) for _ in range(n))
        self.mixins = nn.Module()
        patch = nn.Module()
        patch.proj = nn.Conv3d(spec.in_channels, d, spec.patch_size, stride=spec.patch_size)
        patch.proj_pose = nn.Conv3d(spec.in_channels, d, spec.patch_size, stride=spec.patch_size)
        adaln = nn.Module()
        adaln.adaLN_modulations = nn.ParameterList(nn.Parameter(torch.zeros(1, 6, d)) for _ in range(n))
        for name in ("query", "key", "cross_query", "cross_key", "clip_feature_key"):
            setattr(adaln, f"{name}_layernorm_list",
                    nn.ModuleList(nn.LayerNorm(spec.qk_norm_size, bias=False) for _ in range(n)))
        adaln.clip_feature_key_value_list = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(n))
        final = nn.Module()
        final.linear = nn.Linear(d, 4 * spec.out_channels)
        final.adaLN_modulation = nn.Parameter(torch.zeros(1, 2, d))
        self.mixins.patch_embed, self.mixins.adaln_layer, self.mixins.final_layer = patch, adaln, final
        self.time_embed = nn.Sequential(nn.Linear(spec.time_freq_dim, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.adaln_projection = nn.Sequential(nn.SiLU(), nn.Linear(ted, 6 * d))
        self.text_embedding = nn.Sequential(nn.Linear(spec.text_dim, d), nn.GELU(), nn.Linear(d, d))
        self.clip_proj = nn.Sequential(nn.LayerNorm(1280), nn.Linear(1280, 1280), nn.GELU(), nn.Linear(1280, d),
                                       nn.LayerNorm(d))


def counts(model):
    groups = offload.scail_layer_groups(model)
    total = sum(p.numel() for p in model.parameters())
    return groups[0].numel, total - sum(g.numel for g in groups)


# --- dimensions ------------------------------------------------------------------------


def test_packaged_config_gives_scail_previews_dimensions():
    spec = ModelSpec.from_config(packaged_config())
    assert (spec.num_layers, spec.hidden_size, spec.ffn_size, spec.num_heads, spec.head_dim) == (40, 5120, 13824,
                                                                                                  40, 128)
    assert (spec.text_dim, spec.text_length, spec.context_tokens) == (4096, 512, 512 + 257)
    assert (spec.in_channels, spec.out_channels, spec.latent_channels) == (20, 16, 16)
    assert spec.patch_size == (1, 2, 2) and spec.vae_stride == (4, 8, 8)
    # The frame limit is the network's num_frames (its RoPE and AdaLN tables: 21 latent frames).
    assert (spec.latent_frames_max, spec.max_frames) == (21, 81)
    assert (spec.size_multiple, spec.max_height, spec.max_width) == (32, 2400, 2400)
    assert jobs.ModelLimits.from_spec(spec) == jobs.ModelLimits()


def test_token_layout_matches_upstream_numbers():
    spec = ModelSpec.from_config(packaged_config())
    assert spec.tokens_per_sample(81, 512, 896) == 37_632 + 1_792 + 9_408
    assert spec.tokens_per_sample(81, 896, 512) == 48_832
    assert spec.tokens_per_sample(1, 512, 896) == 32 * 56 * 2 + 16 * 28
    assert spec.latent_shape(81, 512, 896) == (21, 64, 112)
    with pytest.raises(ValueError, match="width"):
        spec.tokens_per_sample(81, 512, 0)


def test_parameter_counts_match_scails_layout():
    spec = ModelSpec.from_config(packaged_config())
    with torch.device("meta"):
        model = ScailLayout(spec)
    assert counts(model) == (spec.layer_params, spec.resident_params)
    # The old hard-coded formula missed sat's affine post-cross-attention LayerNorm (2 x hidden a layer).
    assert spec.layer_params == 403_828_224 + 2 * 5120
    # UPSTREAM.md measured 16.39 B parameters, 30.54 GiB in bf16.
    assert spec.total_params == 16_394_965_824
    assert round(spec.total_params * 2 / GiB, 2) == 30.54


def test_counts_match_measured_upstream_builds():
    """The baseline (shared/baseline, H200, 2026-11-28) built upstream's DiT and counted its parameters."""
    spec = ModelSpec.from_config(packaged_config())
    assert spec.total_params == 16_394_965_824  # "full: params 16,394,965,824"
    small = OmegaConf.merge(packaged_network(), {"params": {
        "num_layers": 2, "hidden_size": 256, "time_embed_dim": 256, "inner_hidden_size": 512,
        "num_attention_heads": 4, "modules": {"pos_embed_config": {"params": {"hidden_size_head": 64}},
                                              "adaln_layer_config": {"params": {"hidden_size_head": 256}}}}})
    spec = ModelSpec.from_network_config(small)
    # "small: params / tokens per sample 5,518,400 / 812" at 128x224, 17 frames.
    assert (spec.total_params, spec.tokens_per_sample(17, 128, 224)) == (5_518_400, 812)


def test_other_configs_get_their_own_dimensions():
    tiny = OmegaConf.merge(packaged_network(), {"params": TINY_DIT})
    spec = ModelSpec.from_network_config(tiny)
    assert (spec.num_layers, spec.hidden_size, spec.ffn_size, spec.head_dim, spec.qk_norm_size) == (2, 128, 256,
                                                                                                     64, 128)
    with torch.device("meta"):
        model = ScailLayout(spec)
    assert counts(model) == (spec.layer_params, spec.resident_params)
    # A 1.3B-sized network with a 49-frame table and dwpose inputs.
    small = copy.deepcopy(packaged_network())
    small["params"].update(num_layers=30, hidden_size=1536, time_embed_dim=1536, inner_hidden_size=8960,
                           num_attention_heads=12, num_frames=49)
    small["params"]["modules"]["adaln_layer_config"]["params"]["hidden_size_head"] = 1536
    spec = ModelSpec.from_network_config(small, representation="dwpose", text_length=256)
    assert (spec.num_layers, spec.hidden_size, spec.head_dim, spec.max_frames, spec.size_multiple) == (30, 1536, 128,
                                                                                                      49, 16)
    assert spec.context_tokens == 256 + 257
    with torch.device("meta"):
        model = ScailLayout(spec)
    assert counts(model) == (spec.layer_params, spec.resident_params)
    assert 1.3e9 < spec.total_params < 1.7e9
    dit, *_ = memory.scail_specs(spec, 512, 896, 49)
    assert (dit.num_layers, dit.hidden, dit.ffn, dit.head_dim, dit.context_tokens) == (30, 1536, 8960, 128, 513)
    assert dit.tokens_per_sample == spec.tokens_per_sample(49, 512, 896)


def test_upstream_defaults_and_overrides():
    params = packaged_network()["params"]
    for key in ("inner_hidden_size", "time_embed_dim", "time_freq_dim"):
        params.pop(key)
    spec = ModelSpec.from_network_config({"params": params}, vae_compress_size=[4, 16, 16], latent_channels=48,
                                         use_i2v_clip=False)
    assert spec.ffn_size == 4 * spec.hidden_size and spec.time_freq_dim == spec.time_embed_dim == spec.hidden_size
    assert spec.vae_stride == (4, 16, 16) and spec.latent_channels == 48
    assert spec.max_height == 4800 and spec.tokens_per_sample(1, 512, 512) == 16 * 16 * 2 + 8 * 8
    assert spec.context_tokens == 512 and not spec.use_i2v_clip
    # The engine writes use_i2v_clip into the params; that wins.
    assert ModelSpec.from_network_config({**params, "use_i2v_clip": True}, use_i2v_clip=False).use_i2v_clip


def test_constructors_agree():
    config = packaged_config()
    args = argparse.Namespace(model_config=config.model, vae_compress_size=[4, 8, 8], latent_channels=16,
                              representation="smpl_downsample")
    spec = ModelSpec.from_config(config)
    assert ModelSpec.from_args(args) == spec
    assert ModelSpec.from_model_config(OmegaConf.to_container(config.model, resolve=False),
                                       vae_compress_size=(4, 8, 8), representation="smpl_downsample") == spec
    # Upstream's representation default (dwpose) takes full-size pose inputs.
    assert ModelSpec.from_model_config(config.model).size_multiple == 16


@pytest.mark.parametrize("key", ["num_layers", "hidden_size", "patch_size", "num_frames", "elementwise_affine"])
def test_missing_key_is_named(key):
    params = packaged_network()["params"]
    del params[key]
    with pytest.raises(ValueError, match=f"model.network_config.params.{key}"):
        ModelSpec.from_network_config(params)


def test_malformed_configs_are_named():
    params = packaged_network()["params"]
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelSpec.from_network_config({**params, "num_attention_heads": 7})
    with pytest.raises(ValueError, match="patch_size"):
        ModelSpec.from_network_config({**params, "patch_size": [1, 2]})
    with pytest.raises(ValueError, match="num_multi_query_heads"):
        ModelSpec.from_network_config({**params, "num_multi_query_heads": 8})
    with pytest.raises(ValueError, match="inner_hidden_size"):
        ModelSpec.from_network_config({**params, "inner_hidden_size": 0})
    no_norm_width = copy.deepcopy(params)
    del no_norm_width["modules"]["adaln_layer_config"]["params"]["hidden_size_head"]
    with pytest.raises(ValueError, match="adaln_layer_config.params.hidden_size_head"):
        ModelSpec.from_network_config(no_norm_width)
    with pytest.raises(ValueError, match="vae_compress_size"):
        ModelSpec.from_network_config(params, vae_compress_size=[4, 8])
    model = OmegaConf.to_container(packaged_config().model, resolve=False)
    del model["conditioner_config"]["params"]["emb_models"][0]["params"]["max_length"]
    with pytest.raises(ValueError, match="max_length"):
        ModelSpec.from_model_config(model)
    with pytest.raises(ValueError, match="network_config"):
        ModelSpec.from_model_config({"use_i2v_clip": True})


# --- the plan, pinned ------------------------------------------------------------------------------

# Computed before ModelSpec existed (scail_specs with the bf16 group and resident bytes make_plan
# measures on SCAIL-Preview's DiT, 807,676,928 and 482,854,528), at 512x896x81, host RAM 64 GiB:
# budget -> (blocks on GPU, prefetch, offload, split CFG, chunk, T5, CLIP, VAE encode tile,
#            VAE decode tile, resident phases, peaks).
TODAY = {
    6: (0, 1, 'pinned', True, 16384, 'swap', 'gpu', (512, 480), (512, 480), (),
        {'clip': 1331439860, 'denoise': 5746652800, 'text': 3119010283, 'vae_decode': 5413019196,
         'vae_encode': 4258211212}),
    8: (0, 1, 'pinned', False, 8192, 'swap', 'gpu', None, (512, 480), (),
        {'clip': 1331439860, 'denoise': 7986138752, 'text': 3119010283, 'vae_decode': 5413019196,
         'vae_encode': 7290706985}),
    12: (1, 1, 'pinned', False, 32768, 'gpu', 'gpu', None, None, (),
         {'clip': 1331439860, 'denoise': 12669352576, 'text': 11650098789, 'vae_decode': 9030168740,
          'vae_encode': 7290706985}),
    24: (14, 1, 'pinned', False, None, 'gpu', 'gpu', None, None, (),
         {'clip': 1331439860, 'denoise': 25702381184, 'text': 11650098789, 'vae_decode': 9030168740,
          'vae_encode': 7290706985}),
}


def summary(plan):
    return (plan.blocks_on_gpu, plan.prefetch, plan.offload_mode, plan.cfg_split, plan.layer_chunk_tokens,
            plan.t5_placement, plan.clip_placement, plan.vae_encode_tile_px, plan.vae_decode_tile_px,
            plan.resident_phases, dict(sorted(plan.peaks.items())))


@pytest.mark.parametrize("budget", sorted(TODAY))
def test_packaged_plan_is_todays(budget):
    spec = ModelSpec.from_config(packaged_config())
    dit, t5, clip, vae = memory.scail_specs(spec, 512, 896, 81)
    assert (dit.group_bytes, dit.resident_bytes) == (807_676_928, 482_854_528)
    plan = memory.plan_memory(dit, budget_gb=budget, t5=t5, clip=clip, vae=vae, host_ram_bytes=64 * GiB)
    assert summary(plan) == TODAY[budget]


def test_make_plan_reads_the_engine_config(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GiB))
    config = packaged_config()
    spec = ModelSpec.from_config(config)
    with torch.device("meta"):
        dit = ScailLayout(spec)
    args = argparse.Namespace(model_config=config.model, vae_compress_size=[4, 8, 8],
                              representation="smpl_downsample", sampling_image_size=[512, 896], max_frames=None,
                              vram_budget=8, ram_budget=64)
    plan = model_loader.make_plan(args, dit, torch.device("cuda", 0))
    assert summary(plan) == TODAY[8] and plan.label == "512x896, 81 frames"
    # A config with other dimensions is planned with its own.
    tiny = OmegaConf.merge(config, {"model": {"network_config": {"params": {**TINY_DIT, "num_frames": 17}}}})
    tiny_spec = ModelSpec.from_config(tiny)
    with torch.device("meta"):
        tiny_dit = ScailLayout(tiny_spec)
    args.model_config = tiny.model
    plan = model_loader.make_plan(args, tiny_dit, torch.device("cuda", 0))
    assert plan.num_layers == 2 and plan.blocks_on_gpu == 2 and plan.label == "512x896, 17 frames"
    assert plan.peaks["denoise"] < TODAY[8][-1]["denoise"] / 10


def test_vae_tile_kwargs_use_the_models_stride():
    spec = ModelSpec.from_network_config(packaged_network(), vae_compress_size=[4, 16, 16])
    dit, t5, clip, vae = memory.scail_specs(spec, 512, 896, 81)
    assert vae.spatial_stride == 16
    plan = memory.plan_memory(dit, budget_gb=6, t5=t5, clip=clip, vae=vae)
    h, w = plan.vae_decode_tile_px
    assert h % 16 == 0 and w % 16 == 0
    assert plan.vae_tile_kwargs_for("decode") == {"tile_latent": (h // 16, w // 16), "overlap_latent": (4, 4),
                                                  "factor": 16}
    assert plan.vae_tile_kwargs_for("encode")["factor"] == 16


# --- against SCAIL's own class ---------------------------------------------------------------------

MODEL_YAML = "configs/video_model/Wan2.1-i2v-14Bsc-pose-xc-latent.yaml"
_SCAIL_PACKAGES = ("sat", "sgm", "dit_video_crossattn_sc_xc")


@pytest.mark.scail
def test_counts_match_scails_dit():
    """SCAIL's DiT built tiny from upstream's config: its layer groups and the rest, as ModelSpec counts them."""
    from scail_win import arguments, hook
    from scail_win.model.kernels import rope3d
    from scail_win.diffusion_video import build_dit

    root = Path(os.environ["SCAIL_ROOT"])
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in _SCAIL_PACKAGES}
    sys.path.insert(0, str(root))
    rope3d._mixin_class.cache_clear()  # it subclasses whichever sat's BaseMixin
    hooked = any(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path)
    hook.install()
    started = not torch.distributed.is_initialized()
    try:
        arguments.initialize_distributed(argparse.Namespace(
            device="cpu", world_size=1, rank=0, model_parallel_size=1, sequence_parallel_size=1,
            num_multi_query_heads=0, distributed_backend="gloo", deepspeed=False))
        net = OmegaConf.load(root / MODEL_YAML).model.network_config
        net.params = OmegaConf.merge(net.params, TINY_DIT)
        dit = build_dit(net, dtype_str="fp32", use_i2v_clip=True, rope_mode="fp32", empty_weights=True)
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not hooked:
            hook.uninstall()
        for n in [n for n in sys.modules if n.split(".")[0] in _SCAIL_PACKAGES]:
            del sys.modules[n]
        sys.modules.update(saved)
        sys.path.remove(str(root))
        rope3d._mixin_class.cache_clear()
    spec = ModelSpec.from_network_config(net, use_i2v_clip=True)
    assert counts(dit) == (spec.layer_params, spec.resident_params)
