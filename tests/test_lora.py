"""scail_win.weights.lora: --lora parsing, every naming scheme, fused-qkv rows, every weight path, bad files.

The CPU model is a small stand-in with sat's names for everything SCAIL's DiT
has that a LoRA can touch (fused qkv, cross-attention query / key_value,
FFN, AdaLN tables and qk norms, CLIP key/value, embeddings, patch
embedding, head). Expected merges are computed here from the test's own
Wan -> sat table, not from the module's.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from scail_win.weights import lora as L
from scail_win.weights import checkpoint as W
from scail_win.errors import UserError
from scail_win.placement.offload import BlockSwap, scail_layer_groups

H, FFN, TXT, CLIPW, LAYERS = 16, 32, 16, 8, 3


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_key_value = nn.Linear(H, 3 * H)
        self.dense = nn.Linear(H, H)


class _Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(H, H)
        self.key_value = nn.Linear(H, 2 * H)
        self.dense = nn.Linear(H, H)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(H, FFN)
        self.dense_4h_to_h = nn.Linear(FFN, H)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = _Attn()
        self.cross_attention = _Cross()
        self.post_cross_attention_layernorm = nn.LayerNorm(H)
        self.mlp = _Mlp()


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(H))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinySat(nn.Module):
    """sat's names for SCAIL's DiT, at toy size, with a forward through sat's layer_forward hook."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))
        ada = nn.Module()
        ada.adaLN_modulations = nn.ParameterList(nn.Parameter(torch.randn(1, 6, H)) for _ in range(LAYERS))
        for name in ("query", "key", "cross_query", "cross_key", "clip_feature_key"):
            setattr(ada, f"{name}_layernorm_list", nn.ModuleList(_Norm() for _ in range(LAYERS)))
        ada.clip_feature_key_value_list = nn.ModuleList(nn.Linear(H, 2 * H) for _ in range(LAYERS))
        patch = nn.Module()
        patch.proj = nn.Conv3d(4, H, (1, 2, 2), stride=(1, 2, 2))
        patch.proj_pose = nn.Conv3d(4, H, (1, 2, 2), stride=(1, 2, 2))
        final = nn.Module()
        final.linear = nn.Linear(H, 8)
        final.adaLN_modulation = nn.Parameter(torch.randn(1, 2, H))
        self.mixins = nn.ModuleDict({"adaln_layer": ada, "patch_embed": patch, "final_layer": final})
        self.time_embed = nn.Sequential(nn.Linear(8, H), nn.SiLU(), nn.Linear(H, H))
        self.adaln_projection = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))
        self.text_embedding = nn.Sequential(nn.Linear(TXT, H), nn.GELU(), nn.Linear(H, H))
        self.clip_proj = nn.Module()
        self.clip_proj.proj = nn.Sequential(nn.LayerNorm(CLIPW), nn.Linear(CLIPW, CLIPW), nn.GELU(),
                                            nn.Linear(CLIPW, H), nn.LayerNorm(H))
        self.hooks = {"layer_forward": self.layer_forward}

    def layer_forward(self, h, ctx, *, layer_id):
        i = int(layer_id)
        ada = self.mixins["adaln_layer"]
        layer = self.transformer.layers[i]
        mod = ada.adaLN_modulations[i]
        x = h * (1 + mod[:, 1]) + mod[:, 0]
        q, k, v = layer.attention.query_key_value(x).chunk(3, dim=-1)
        q, k = ada.query_layernorm_list[i](q), ada.key_layernorm_list[i](k)
        h = h + layer.attention.dense(torch.softmax(q @ k.transpose(1, 2), -1) @ v)
        q = ada.cross_query_layernorm_list[i](layer.cross_attention.query(h))
        k, v = layer.cross_attention.key_value(ctx).chunk(2, dim=-1)
        ki, vi = ada.clip_feature_key_value_list[i](ctx).chunk(2, dim=-1)
        k, ki = ada.cross_key_layernorm_list[i](k), ada.clip_feature_key_layernorm_list[i](ki)
        att = torch.softmax(q @ k.transpose(1, 2), -1) @ v + torch.softmax(q @ ki.transpose(1, 2), -1) @ vi
        h = h + layer.cross_attention.dense(att)
        h = h + layer.mlp.dense_4h_to_h(torch.tanh(layer.mlp.dense_h_to_4h(layer.post_cross_attention_layernorm(h))))
        return h * (1 + mod[:, 5])

    def forward(self, h, ctx):
        for i in range(LAYERS):
            h = self.hooks["layer_forward"](h, ctx, layer_id=i)
        return self.mixins["final_layer"].linear(h)


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinySat().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return model.to(dtype)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 6, H, generator=g).to(dtype), torch.randn(2, 4, H, generator=g).to(dtype)


# The test's own table: Wan module -> (sat module, part, parts, diffusers name).
CLIP_KV = "mixins.adaln_layer.clip_feature_key_value_list.0"
SAT = {
    "blocks.1.self_attn.q": ("transformer.layers.1.attention.query_key_value", 0, 3, "blocks.1.attn1.to_q"),
    "blocks.1.self_attn.k": ("transformer.layers.1.attention.query_key_value", 1, 3, "blocks.1.attn1.to_k"),
    "blocks.1.self_attn.v": ("transformer.layers.1.attention.query_key_value", 2, 3, "blocks.1.attn1.to_v"),
    "blocks.0.self_attn.o": ("transformer.layers.0.attention.dense", 0, 1, "blocks.0.attn1.to_out.0"),
    "blocks.2.cross_attn.q": ("transformer.layers.2.cross_attention.query", 0, 1, "blocks.2.attn2.to_q"),
    "blocks.2.cross_attn.k": ("transformer.layers.2.cross_attention.key_value", 0, 2, "blocks.2.attn2.to_k"),
    "blocks.2.cross_attn.v": ("transformer.layers.2.cross_attention.key_value", 1, 2, "blocks.2.attn2.to_v"),
    "blocks.2.cross_attn.o": ("transformer.layers.2.cross_attention.dense", 0, 1, "blocks.2.attn2.to_out.0"),
    "blocks.0.cross_attn.k_img": (CLIP_KV, 0, 2, "blocks.0.attn2.add_k_proj"),
    "blocks.0.cross_attn.v_img": (CLIP_KV, 1, 2, "blocks.0.attn2.add_v_proj"),
    "blocks.1.ffn.0": ("transformer.layers.1.mlp.dense_h_to_4h", 0, 1, "blocks.1.ffn.net.0.proj"),
    "blocks.1.ffn.2": ("transformer.layers.1.mlp.dense_4h_to_h", 0, 1, "blocks.1.ffn.net.2"),
    "time_embedding.0": ("time_embed.0", 0, 1, "condition_embedder.time_embedder.linear_1"),
    "text_embedding.2": ("text_embedding.2", 0, 1, "condition_embedder.text_embedder.linear_2"),
    "time_projection.1": ("adaln_projection.1", 0, 1, "condition_embedder.time_proj"),
    "head.head": ("mixins.final_layer.linear", 0, 1, "proj_out"),
    "img_emb.proj.1": ("clip_proj.proj.1", 0, 1, "condition_embedder.image_embedder.ff.net.0.proj"),
    "patch_embedding": ("mixins.patch_embed.proj", 0, 1, "patch_embedding"),
}
# diff / diff_b targets (Wan name, role) -> sat tensor, part, parts
DIFFS = {
    ("blocks.0.norm3", "diff"): ("transformer.layers.0.post_cross_attention_layernorm.weight", 0, 1),
    ("blocks.0.norm3", "diff_b"): ("transformer.layers.0.post_cross_attention_layernorm.bias", 0, 1),
    ("blocks.1.modulation", "diff"): ("mixins.adaln_layer.adaLN_modulations.1", 0, 1),
    ("head.modulation", "diff"): ("mixins.final_layer.adaLN_modulation", 0, 1),
    ("blocks.2.self_attn.v", "diff_b"): ("transformer.layers.2.attention.query_key_value.bias", 2, 3),
    ("blocks.2.self_attn.norm_q", "diff"): ("mixins.adaln_layer.query_layernorm_list.2.weight", 0, 1),
    ("blocks.0.cross_attn.norm_k_img", "diff"): ("mixins.adaln_layer.clip_feature_key_layernorm_list.0.weight", 0, 1),
    ("blocks.1.cross_attn.k", "diff"): ("transformer.layers.1.cross_attention.key_value.weight", 0, 2),
}
DIFFUSERS_DIFFS = {"blocks.0.norm3": "blocks.0.norm2", "blocks.1.modulation": "blocks.1.scale_shift_table",
                   "head.modulation": "scale_shift_table", "blocks.2.self_attn.v": "blocks.2.attn1.to_v",
                   "blocks.2.self_attn.norm_q": "blocks.2.attn1.norm_q",
                   "blocks.0.cross_attn.norm_k_img": "blocks.0.attn2.norm_added_k",
                   "blocks.1.cross_attn.k": "blocks.1.attn2.to_k"}

SCHEMES = {
    # name: (module path from Wan/diffusers name, down suffix, up suffix, alpha?, diffusers names?)
    "peft_diffusers": (lambda m: f"transformer.{m}", ".lora_A.weight", ".lora_B.weight", False, True),
    "peft_wan": (lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight", False, False),
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", True, False),
    "kohya_dotted": (lambda m: f"diffusion_model.{m}", ".lora_down.weight", ".lora_up.weight", True, False),
}


def lowrank_file(path, scheme, modules=SAT, rank=3, seed=1, dtype=torch.bfloat16):
    """A LoRA over ``modules`` in ``scheme``; returns {wan module: (up, down, alpha)} as stored."""
    name_of, down_sfx, up_sfx, with_alpha, diffusers = SCHEMES[scheme]
    model = make_model()
    tensors = dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, {}
    for wan, (sat, part, parts, dname) in modules.items():
        weight = tensors[sat + ".weight"]
        rows = weight.shape[0] // parts
        down = torch.randn((rank,) + tuple(weight.shape[1:]), generator=g).to(dtype)
        up = torch.randn((rows, rank) + (1,) * (weight.dim() - 2), generator=g).to(dtype)
        key = name_of(dname if diffusers else wan)
        sd[key + down_sfx], sd[key + up_sfx] = down, up
        alpha = float(rank)
        if with_alpha:
            alpha = 1.5 + part
            sd[key + ".alpha"] = torch.tensor(alpha)
        factors[wan] = (up, down, alpha)
    save_file(sd, str(path))
    return factors


def expected(model, factors, strength, modules=SAT):
    """sat tensor name -> float32 weight after the LoRA, from the test's table."""
    out = {n: t.detach().float().clone() for n, t in model.state_dict().items()}
    for wan, (up, down, alpha) in factors.items():
        sat, part, parts, _ = modules[wan]
        w = out[sat + ".weight"]
        rows = w.shape[0] // parts
        rank = down.shape[0]
        delta = up.float().reshape(rows, rank) @ down.float().reshape(rank, -1)
        w.view(w.shape[0], -1)[part * rows:(part + 1) * rows] += strength * alpha / rank * delta
    return out


def check_weights(model, want, dtype=torch.float32):
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t.float(), want[name].to(dtype).float(), rtol=1e-5, atol=1e-5, msg=name)


# --- the flag --------------------------------------------------------------------------


@pytest.mark.parametrize("text,path,strength", [
    ("x.safetensors", "x.safetensors", 1.0),
    ("x.safetensors:0.8", "x.safetensors", 0.8),
    (r"C:\loras\y.safetensors:0.8", r"C:\loras\y.safetensors", 0.8),
    (r"C:\loras\y.safetensors", r"C:\loras\y.safetensors", 1.0),
    ("/a/b:c.safetensors:-1.5e-1", "/a/b:c.safetensors", -0.15),
    ("d:.5", "d", 0.5),
])
def test_parse_lora_spec(text, path, strength):
    spec = L.parse_lora_spec(text)
    assert spec.path == Path(path) and spec.strength == pytest.approx(strength)


@pytest.mark.parametrize("text,match", [("", "empty"), ("x.safetensors:", "nothing after the colon"),
                                        (":0.5", "no file")])
def test_parse_lora_spec_errors(text, match):
    with pytest.raises(UserError, match=match):
        L.parse_lora_spec(text)


def test_specs_from_args_checks_files(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    assert L.specs_from_args(argparse.Namespace(lora=None)) == []
    assert L.specs_from_args(argparse.Namespace(lora=[f"{f}:0.5"])) == [L.LoraSpec(f, 0.5)]
    with pytest.raises(UserError, match="no such file"):
        L.specs_from_args(argparse.Namespace(lora=[str(tmp_path / "missing.safetensors")]))


def test_identity_changes_with_file_and_strength(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert L.identity(argparse.Namespace(lora=None)) is None
    one = L.identity(argparse.Namespace(lora=[f"{f}:0.5"]))
    assert one != L.identity(argparse.Namespace(lora=[f"{f}:0.6"]))
    f.write_bytes(b"xy")
    assert one != L.identity(argparse.Namespace(lora=[f"{f}:0.5"]))


# --- every naming scheme, resident ---------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_merges_w_plus_scaled_up_down(tmp_path, scheme):
    path = tmp_path / "l.safetensors"
    factors = lowrank_file(path, scheme)
    model = make_model()
    want = expected(model, factors, 0.7)
    merge = L.apply_loras(model, [L.LoraSpec(path, 0.7)])
    assert len(merge.files[0].terms) == len({s for s, *_ in SAT.values()})
    assert not merge.files[0].unmatched
    check_weights(model, want)


@pytest.mark.parametrize("diffusers", [False, True])
def test_diff_and_diff_b_full_deltas(tmp_path, diffusers):
    model = make_model()
    tensors = model.state_dict()
    g = torch.Generator().manual_seed(3)
    sd, want = {}, {n: t.float().clone() for n, t in tensors.items()}
    for (wan, role), (sat, part, parts) in DIFFS.items():
        t = want[sat]
        rows = t.shape[0] // parts
        diff = torch.randn((rows,) + tuple(t.shape[1:]), generator=g)
        name = f"transformer.{DIFFUSERS_DIFFS[wan]}" if diffusers else f"diffusion_model.{wan}"
        sd[f"{name}.{role}"] = diff
        t[part * rows:(part + 1) * rows] += 2.0 * diff
    if diffusers:  # the file is recognised as diffusers by its other names
        sd["transformer.blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(2, H)
        sd["transformer.blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(H, 2)
    path = tmp_path / "d.safetensors"
    save_file(sd, str(path))
    L.apply_loras(model, [L.LoraSpec(path, 2.0)])
    check_weights(model, want)


def test_q_lora_changes_only_the_q_rows_of_the_fused_qkv(tmp_path):
    path = tmp_path / "q.safetensors"
    only_q = {"blocks.1.self_attn.q": SAT["blocks.1.self_attn.q"],
              "blocks.2.cross_attn.v": SAT["blocks.2.cross_attn.v"]}
    lowrank_file(path, "peft_wan", modules=only_q)
    model = make_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    L.apply_loras(model, [L.LoraSpec(path, 1.0)])
    qkv = "transformer.layers.1.attention.query_key_value.weight"
    kv = "transformer.layers.2.cross_attention.key_value.weight"
    after = model.state_dict()
    assert not torch.equal(after[qkv][:H], before[qkv][:H])
    assert torch.equal(after[qkv][H:], before[qkv][H:])
    assert torch.equal(after[kv][:H], before[kv][:H]) and not torch.equal(after[kv][H:], before[kv][H:])
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {qkv, kv}


def test_two_loras_on_one_bf16_tensor_round_once(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    mods = {"blocks.1.ffn.0": SAT["blocks.1.ffn.0"]}
    fa = lowrank_file(a, "kohya", modules=mods, seed=1, dtype=torch.float32)
    fb = lowrank_file(b, "peft_wan", modules=mods, seed=2, dtype=torch.float32)
    model = make_model(dtype=torch.bfloat16)
    name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    ref = model.state_dict()[name].float()
    for (up, down, alpha), s in ((fa["blocks.1.ffn.0"], 0.5), (fb["blocks.1.ffn.0"], -1.0)):
        ref = ref.addmm(up, down, alpha=s * alpha / down.shape[0])
    L.apply_loras(model, [L.LoraSpec(a, 0.5), L.LoraSpec(b, -1.0)])
    got = model.state_dict()[name]
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16))


def test_merged_in_row_chunks_equals_one_chunk(monkeypatch):
    w = torch.randn(40, 24)
    term = L.Term(8, 32, 0.3, up=torch.randn(24, 4), down=torch.randn(4, 24))
    whole = L.merged(w, [term])
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * 24 * 5)  # 5 rows a chunk
    torch.testing.assert_close(L.merged(w, [term]), whole)
    torch.testing.assert_close(whole[8:32], w[8:32] + 0.3 * term.up @ term.down)
    assert torch.equal(whole[:8], w[:8]) and torch.equal(whole[32:], w[32:])


def test_unmatched_keys_are_reported(tmp_path, caplog):
    path = tmp_path / "u.safetensors"
    lowrank_file(path, "peft_wan", modules={"blocks.0.self_attn.o": SAT["blocks.0.self_attn.o"]})
    from safetensors.torch import load_file
    sd = load_file(str(path))
    sd["diffusion_model.blocks.0.self_attn.q.weight"] = torch.zeros(H, H)  # not a LoRA role
    sd["diffusion_model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(2, H)  # no such block
    sd["diffusion_model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(H, 2)
    save_file(sd, str(path))
    with caplog.at_level(logging.INFO, logger="scail_win.weights.lora"):
        L.apply_loras(make_model(), [L.LoraSpec(path, 1.0)])
    text = caplog.text
    assert "3 keys match no layer" in text and "blocks.7.self_attn.q" in text
    assert "changed 1 tensors" in text


# --- bad files ---------------------------------------------------------------------------


def _bad(tmp_path, sd):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("case,match", [
    ("no_match", "none of its 1 keys"),
    ("up_shape", "makes a 17x16 change"),
    ("down_shape", "makes a 16x15 change"),
    ("rank", "rank mismatch"),
    ("half_pair", "has no matching lora_up"),
    ("diff_shape", "shape \\[3\\]"),
    ("dora", "DoRA"),
])
def test_bad_lora_contents_give_one_line_naming_file_and_key(tmp_path, case, match):
    key = "diffusion_model.blocks.0.self_attn.o"
    sd = {
        "no_match": {"something.else.lora_A.weight": torch.zeros(2, 4)},
        "up_shape": {f"{key}.lora_A.weight": torch.zeros(2, H), f"{key}.lora_B.weight": torch.zeros(H + 1, 2)},
        "down_shape": {f"{key}.lora_A.weight": torch.zeros(2, H - 1), f"{key}.lora_B.weight": torch.zeros(H, 2)},
        "rank": {f"{key}.lora_A.weight": torch.zeros(2, H), f"{key}.lora_B.weight": torch.zeros(H, 3)},
        "half_pair": {f"{key}.lora_down.weight": torch.zeros(2, H)},
        "diff_shape": {"diffusion_model.blocks.0.norm3.diff": torch.zeros(3)},
        "dora": {f"{key}.lora_A.weight": torch.zeros(2, H), f"{key}.lora_B.weight": torch.zeros(H, 2),
                 f"{key}.dora_scale": torch.ones(H, 1)},
    }[case]
    path = _bad(tmp_path, sd)
    with pytest.raises(UserError, match=match) as info:
        L.apply_loras(make_model(), [L.LoraSpec(path, 1.0)])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    if case != "no_match":
        assert key in message or "blocks.0.norm3" in message


@pytest.mark.parametrize("case", ["truncated", "pickle", "text"])
def test_unreadable_files_give_one_line(tmp_path, case):
    path = tmp_path / "x.safetensors"
    if case == "truncated":
        lowrank_file(path, "peft_wan")
        W_bytes = path.read_bytes()
        path.write_bytes(W_bytes[: len(W_bytes) - 40])
    elif case == "pickle":
        torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_text("not a lora", encoding="utf-8")
    with pytest.raises(UserError, match="not a valid safetensors file") as info:
        L.apply_loras(make_model(), [L.LoraSpec(path, 1.0)])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- the weight paths: resident, block swap (pinned / streamed), fp8 ----------------------------


def _reference(path, strength, dtype=torch.float32):
    model = make_model(dtype=dtype)
    L.apply_loras(model, [L.LoraSpec(path, strength)])
    return model


@pytest.mark.parametrize("mode", ["pinned", "stream"])
def test_block_swap_paths_compute_with_the_merged_weights(tmp_path, mode):
    path = tmp_path / "l.safetensors"
    lowrank_file(path, "kohya")
    ref = _reference(path, 0.9)
    model = make_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", resident_groups=1, mode=mode).attach()
    merge = L.apply_loras(model, [L.LoraSpec(path, 0.9)], device="cpu", swap=swap)
    # Swapped layers are merged on load; their masters (the model's own tensors here) stay as they were.
    assert merge.on_load and all(".layers.1." not in n for n in merge.on_load)
    for name, (master, owned) in swap.swapped_masters().items():
        assert not owned and torch.equal(master, before[name])
    x = inputs()
    assert torch.equal(model(*x), ref(*x))
    assert torch.equal(model(*x), ref(*x))  # a second pass loads the layers again
    swap.detach()
    check_weights(model, {n: t.float() for n, t in ref.state_dict().items()})


def _write_checkpoint(model, path, fp8):
    sd = {n: t.detach().bfloat16().contiguous() for n, t in model.state_dict().items()}
    entries, tail, scales = [], [], {}
    for n, t in sd.items():
        if fp8 and W.is_fp8_candidate(n, tuple(t.shape)) or (fp8 and n.endswith("dense_h_to_4h.weight")):
            q, s = W.quantize_fp8(t)
            sd[n], scales[n + W.FP8_SCALE_SUFFIX] = q, s
        entries.append((n, sd[n].dtype, tuple(sd[n].shape)))
    tail = [(n, s.dtype, tuple(s.shape)) for n, s in scales.items()]
    with W.SafetensorsWriter(path, entries, tail=tail) as writer:
        everything = {**sd, **scales}
        for n in writer.pending:
            writer.write(n, everything[n])
        writer.commit()


def _meta_model():
    with torch.device("meta"):
        return TinySat().eval()


def test_fp8_streamed_from_the_file_merges_on_every_load(tmp_path):
    dit = tmp_path / "dit.safetensors"
    _write_checkpoint(make_model(), dit, fp8=True)
    path = tmp_path / "l.safetensors"
    lowrank_file(path, "peft_diffusers")
    resident = _meta_model()
    W.load_into(resident, dit, dtype=torch.bfloat16)  # fp8 dequantized to bf16 at load
    resident.hooks = {"layer_forward": resident.layer_forward}
    L.apply_loras(resident, [L.LoraSpec(path, 1.2)])

    swapped = _meta_model()
    swapped.hooks = {"layer_forward": swapped.layer_forward}
    with W.open_state_dict(dit) as src:
        W.load_into(swapped, src, dtype=torch.bfloat16, keep_fp8=lambda n: n.startswith("transformer.layers."))
        assert swapped.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.float8_e4m3fn
        cw = W.CheckpointWeights(src, dtype=torch.bfloat16)
        swap = BlockSwap(swapped, scail_layer_groups(swapped), "cpu", mode="stream", source=cw,
                         materialize=cw.materialize).attach()
        merge = L.apply_loras(swapped, [L.LoraSpec(path, 1.2)], device="cpu", swap=swap)
        assert "transformer.layers.1.mlp.dense_h_to_4h.weight" in merge.on_load
        x = inputs(torch.bfloat16)
        assert torch.equal(swapped(*x), resident(*x))
        assert torch.equal(swapped(*x), resident(*x))  # a second pass loads the layers again
        swap.detach()


def test_fp8_weight_kept_in_fp8_is_requantized(tmp_path):
    dit = tmp_path / "dit.safetensors"
    _write_checkpoint(make_model(), dit, fp8=True)
    path = tmp_path / "l.safetensors"
    lowrank_file(path, "peft_wan", modules={"blocks.1.ffn.0": SAT["blocks.1.ffn.0"]}, dtype=torch.float32)
    model = _meta_model()
    W.load_into(model, dit, dtype=torch.bfloat16, keep_fp8=True)
    lin = model.transformer.layers[1].mlp.dense_h_to_4h
    assert lin.weight.dtype == torch.float8_e4m3fn
    want = W.dequantize(lin.weight, lin.weight_scale, torch.float32)
    (up, down, alpha), = lowrank_file(tmp_path / "same.safetensors", "peft_wan",
                                      modules={"blocks.1.ffn.0": SAT["blocks.1.ffn.0"]},
                                      dtype=torch.float32).values()
    want = want + 0.8 * up @ down
    L.apply_loras(model, [L.LoraSpec(path, 0.8)])
    assert lin.weight.dtype == torch.float8_e4m3fn
    got = W.dequantize(lin.weight, lin.weight_scale, torch.float32)
    assert W.relative_error(got, want) < 0.04  # fp8's own error, not a missing delta
    assert W.relative_error(got, want - 0.8 * up @ down) > 0.2


@pytest.mark.parametrize("blocks_on_gpu", [3, 1])
def test_the_loader_order_read_on_meta_then_merge_after_placement(tmp_path, blocks_on_gpu):
    """model_loader.build's order: LoRAs read against the meta DiT, merged after load_into and place_dit."""
    from types import SimpleNamespace

    from scail_win.model.loader import place_dit

    dit = tmp_path / "dit.safetensors"
    _write_checkpoint(make_model(), dit, fp8=False)
    path = tmp_path / "l.safetensors"
    lowrank_file(path, "kohya_dotted")
    ref = _meta_model()
    W.load_into(ref, dit)
    ref.hooks = {"layer_forward": ref.layer_forward}
    L.apply_loras(ref, [L.LoraSpec(path, 0.5)])

    model = _meta_model()
    model.hooks = {"layer_forward": model.layer_forward}
    merge = L.read_loras(model, L.specs_from_args(argparse.Namespace(lora=[f"{path}:0.5"])))
    W.load_into(model, dit)
    plan = SimpleNamespace(layer_chunk_tokens=None, offload_mode="stream", blocks_on_gpu=blocks_on_gpu,
                           num_layers=LAYERS, prefetch=1)
    placement = place_dit(model, plan, torch.device("cpu"))
    assert (placement.swap is None) == (blocks_on_gpu == LAYERS)
    merge.apply(model, device="cpu", swap=placement.swap)
    x = inputs(torch.bfloat16)
    assert torch.equal(model(*x), ref(*x))
    placement.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["pinned", "stream"])
def test_cuda_paths_match_resident(tmp_path, mode):
    path = tmp_path / "l.safetensors"
    lowrank_file(path, "kohya")
    cuda = torch.device("cuda")
    resident = make_model(dtype=torch.bfloat16).to(cuda)
    L.apply_loras(resident, [L.LoraSpec(path, 0.9)], device=cuda)
    model = make_model(dtype=torch.bfloat16)
    swap = BlockSwap(model, scail_layer_groups(model), cuda, resident_groups=1, mode=mode).attach()
    merge = L.apply_loras(model, [L.LoraSpec(path, 0.9)], device=cuda, swap=swap)
    assert bool(merge.on_load) == (mode == "stream")
    x = [t.to(cuda) for t in inputs(torch.bfloat16)]
    torch.testing.assert_close(model(*x), resident(*x), rtol=0, atol=0)
    swap.detach()


# --- the map against SCAIL's real DiT ---------------------------------------------------------


MODEL_YAML = "configs/video_model/Wan2.1-i2v-14Bsc-pose-xc-latent.yaml"
_SCAIL_PACKAGES = ("sat", "sgm", "dit_video_crossattn_sc_xc")


@pytest.mark.scail
def test_name_map_covers_every_linear_of_scails_dit():
    """Built tiny from SCAIL's own class: every per-layer and top-level weight has a Wan name."""
    from omegaconf import OmegaConf

    from scail_win import arguments, hook
    from scail_win.model.kernels import rope3d
    from scail_win.diffusion_video import build_dit
    from scail_win.testing.smoke import TINY_DIT

    root = Path(os.environ["SCAIL_ROOT"])
    # SCAIL's own sat and sgm, whatever `sat` was before (PyPI's lacks what SCAIL's sgm imports).
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
    shapes = {n: tuple(t.shape) for n, t in list(dit.named_parameters()) + list(dit.named_buffers())}
    wan = L.sat_to_wan(shapes)
    covered = {t.weight for t in wan.values()} | {t.bias for t in wan.values() if t.bias}
    linears = [n for n, s in shapes.items() if n.endswith(".weight") and len(s) >= 2]
    assert linears and not [n for n in linears if n not in covered]
    per_layer = [n for n in shapes if ".layers." in n or "_list." in n or "adaLN_modulations." in n]
    assert not [n for n in per_layer if n not in covered]
    hidden = TINY_DIT["hidden_size"]
    for name, target in wan.items():
        rows = shapes[target.weight][0]
        assert rows % target.parts == 0, name
        if target.parts > 1:
            assert rows // target.parts == hidden, name
    # Every Wan module SCAIL's DiT has is found from a LoRA key in each scheme.
    names = L.NameMap(shapes)
    for module in wan:
        assert names.lookup(f"diffusion_model.{module}", False) == wan[module]
        assert names.lookup("lora_unet_" + module.replace(".", "_"), False) == wan[module]
    assert len({m.split(".", 2)[1] for m in wan if m.startswith("blocks.")}) == TINY_DIT["num_layers"]
