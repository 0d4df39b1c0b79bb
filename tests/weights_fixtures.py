"""Small SCAIL-shaped weight folders for the weights, convert and doctor tests.

The DiT stand-in uses sat's names and the kinds of tensors SCAIL's DiT has
(per-layer Linear weights, norms, a 3D AdaLN table, a Conv3d patch embed, an
integer buffer, a non-persistent buffer), and the checkpoint holds the
non-tensor entries a sat/DeepSpeed checkpoint carries.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

DIT_PREFIX = "model.diffusion_model."
SAT_PT = "model/1/mp_rank_00_model_states.pt"
T5_PTH = "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth"
CLIP_PTH = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"
VAE_PTH = "Wan2.1_VAE.pth"


class _Attention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, text: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(text, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)


class _Mlp(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, ffn)
        self.dense_4h_to_h = nn.Linear(ffn, hidden)


class _Layer(nn.Module):
    def __init__(self, hidden: int, ffn: int, text: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.attention = _Attention(hidden)
        self.cross_attention = _CrossAttention(hidden, text)
        self.mlp = _Mlp(hidden, ffn)


class TinyDiT(nn.Module):
    def __init__(self, layers: int = 2, hidden: int = 64, ffn: int = 128, text: int = 32, heads: int = 4):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_Layer(hidden, ffn, text) for _ in range(layers))
        self.mixins = nn.Module()
        self.mixins.patch_embed = nn.Conv3d(20, hidden, (1, 2, 2), stride=(1, 2, 2))
        adaln = nn.Module()
        adaln.adaLN_modulations = nn.ParameterList(
            nn.Parameter(torch.randn(1, 6, hidden) / hidden**0.5) for _ in range(layers))
        adaln.query_layernorm_list = nn.ModuleList(nn.LayerNorm(hidden // heads) for _ in range(layers))
        adaln.clip_feature_key_value_list = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(layers))
        self.mixins.adaln_layer = adaln
        self.time_embed = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.register_buffer("step", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("freqs", torch.arange(8.0), persistent=False)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float tensor non-trivial values (LayerNorm starts at ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return module


def deepspeed_extras() -> dict:
    """The non-tensor entries a sat + DeepSpeed checkpoint stores next to 'module'."""
    return {
        "iteration": 1,
        "buffer_names": ["step"],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict(a=torch.Size([4, 4]))],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 1,
        "global_samples": 8,
        "dp_world_size": 8,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}},
        "ds_version": "0.18.2",
        "random_rng_state": random.Random(0).getstate(),
        "np_rng_state": np.random.RandomState(0).get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }


def tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}), encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Unigram"}}),
                                           encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}), encoding="utf-8")


def make_scail_folder(root: Path, *, dit: nn.Module | None = None, extras: dict | None = None,
                      big_tensors: int = 0, big_numel: int = 0) -> tuple[Path, nn.Module]:
    """A SCAIL-Preview-shaped folder; returns (root, the bf16 DiT whose weights it holds).

    ``big_tensors`` adds that many float32 tensors of ``big_numel`` elements
    to the DiT checkpoint (for memory tests).
    """
    dit = dit if dit is not None else randomize_(TinyDiT())
    dit = dit.to(torch.bfloat16)
    module = {DIT_PREFIX + k: v.clone() for k, v in dit.state_dict().items()}
    for i in range(big_tensors):
        # Cheap distinct values: random ones take seconds at this size.
        module[f"{DIT_PREFIX}extra.big{i}"] = torch.arange(big_numel, dtype=torch.float32).mul_(1e-6).add_(i)
    ckpt = {"module": module, **(deepspeed_extras() if extras is None else extras)}
    (root / "model" / "1").mkdir(parents=True)
    (root / "model" / "latest").write_text("1", encoding="utf-8")
    torch.save(ckpt, root / SAT_PT)
    tokenizer_files(root / "umt5-xxl")
    torch.save({"token_embedding.weight": torch.randn(50, 16).bfloat16(),
                "blocks.0.attn.q.weight": torch.randn(16, 16).bfloat16()}, root / T5_PTH)
    torch.save({"visual.proj": torch.randn(16, 8).half(),
                "visual.transformer.0.attn.to_qkv.weight": torch.randn(48, 16).half()}, root / CLIP_PTH)
    torch.save({"encoder.conv1.weight": torch.randn(8, 3, 3, 3, 3),
                "decoder.head.2.bias": torch.randn(3)}, root / VAE_PTH)
    return root, dit


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
