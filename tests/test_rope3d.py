"""scail_win.model.kernels.rope3d: the fused 3D RoPE against upstream's formula and mixin.

The references build upstream's full (T, H, W, head_dim) tables and rotate
the reference, video and pose segments separately, as the mixin does: in
float64 (``fp32`` mode must be that, rounded once) or in upstream's own
precision (``exact`` mode must equal that bit for bit).
"""
import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scail_win import rotary
from scail_win.model.kernels import rope3d

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
scail = pytest.mark.skipif(not os.environ.get("SCAIL_ROOT"), reason="set SCAIL_ROOT to a SCAIL checkout")

# Table extents of the tests' mixin (upstream: latent size / patch, frames).
TABLE = dict(height=12, width=14, frames=4)


def layout(frames, height, width, **shifts):
    return rope3d.Rope3DLayout(
        frames, height, width, ref_length=height * width, seq_length=frames * height * width,
        pose_length=frames * (height // 2) * (width // 2), **shifts,
    )


LAYOUTS = {
    "odd grid": layout(2, 5, 7),
    "shifted": layout(3, 6, 4, h_shift=1, w_shift=2, pose_h=2, pose_w=9),
}


def upstream_freqs(head_dim, theta=10000):
    dim_hw = 2 * (head_dim // 6)
    dim_t = head_dim - 2 * dim_hw
    return [1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)) for d in (dim_t, dim_hw, dim_hw)]


def reference(x, lay, *, interleaved, emulate=False):
    """Upstream's rotation of x; float64 unless emulate (float32 tables, x's dtype).

    Returns the result and, per element, the size of the products it sums.
    """
    head_dim = x.shape[-1]
    wide = torch.float32 if emulate else torch.float64
    ft, fh, fw = (f.to(wide) for f in upstream_freqs(head_dim))

    def angle_grid(t, h, w):
        parts = [torch.outer(c.to(wide), f) for c, f in ((t, ft), (h, fh), (w, fw))]
        if interleaved:
            parts = [p.repeat_interleave(2, dim=-1) for p in parts]
        shape = (len(t), len(h), len(w))
        grid = torch.cat([parts[0][:, None, None].expand(*shape, -1), parts[1][None, :, None].expand(*shape, -1),
                          parts[2][None, None, :].expand(*shape, -1)], dim=-1)
        return grid if interleaved else torch.cat([grid, grid], dim=-1)

    video = angle_grid(torch.arange(1, TABLE["frames"] + 1), torch.arange(TABLE["height"]),
                       torch.arange(TABLE["width"] + 120))
    extended = angle_grid(torch.zeros(1), torch.arange(TABLE["height"]), torch.arange(TABLE["width"]))
    T, H, W, hs, ws = lay.frames, lay.height, lay.width, lay.h_shift, lay.w_shift
    segments = []
    for trig in (torch.cos, torch.sin):
        ref = trig(extended[:1, hs:hs + H, ws:ws + W])
        vid = trig(video[:T, hs:hs + H, ws:ws + W])
        pose = trig(video[:T, lay.pose_h + hs:lay.pose_h + hs + H, lay.pose_w + ws:lay.pose_w + ws + W])
        pose = F.avg_pool2d(pose.permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
        segments.append(torch.cat([s.reshape(-1, head_dim) for s in (ref, vid, pose)]))
    cos, sin = segments

    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
    if emulate:
        return x * cos.to(x.dtype) + turned * sin.to(x.dtype), None
    x64, t64 = x.double(), turned.double()
    return x64 * cos + t64 * sin, x64.abs() * cos.abs() + t64.abs() * sin.abs()


def ulp(values, dtype):
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(values, info.eps), exponent - 1)


def assert_rounded_once(out, ref, bound, dtype, rounding=0.5):
    """out is ref rounded once to dtype (within `rounding` ulp), up to float32 arithmetic error."""
    allowed = (0.0 if dtype == torch.float32 else rounding) * ulp(ref, dtype) + 2.0**-21 * bound + 1e-30
    worst = ((out.double() - ref).abs() / allowed).max().item()
    assert worst <= 1.0, f"error {worst:.3f}x the one-rounding bound"


def make_input(lay, dtype, *, batch=2, heads=3, head_dim=128, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, lay.total, head_dim, generator=gen).to(device=device, dtype=dtype)


def make_rope(mode, interleaved, head_dim=128):
    return rope3d.Rope3D(head_dim, interleaved=interleaved, mode=mode, **TABLE)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", (True, False), ids=("interleaved", "halves"))
@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("head_dim", (128, 40))
def test_fp32_mode_is_float64_rounded_once(dtype, interleaved, name, head_dim, torch_path):
    lay = LAYOUTS[name]
    x = make_input(lay, dtype, head_dim=head_dim)
    ref, bound = reference(x, lay, interleaved=interleaved)
    out = make_rope("fp32", interleaved, head_dim)(x, lay)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rounded_once(out, ref, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", (True, False), ids=("interleaved", "halves"))
@pytest.mark.parametrize("name", LAYOUTS)
def test_exact_mode_is_upstream_arithmetic(dtype, interleaved, name, torch_path):
    lay = LAYOUTS[name]
    x = make_input(lay, dtype)
    expected, _ = reference(x, lay, interleaved=interleaved, emulate=True)
    assert torch.equal(make_rope("exact", interleaved)(x, lay), expected)


def test_inplace_and_strided_input(torch_path):
    """SCAIL hands a (b, s, heads, d) buffer seen as (b, heads, s, d)."""
    lay = LAYOUTS["shifted"]
    x = make_input(lay, torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    rope = make_rope("fp32", True)
    out = rope(x, lay)
    assert out.stride() == x.stride()
    same = rope(x, lay, inplace=True)
    assert same.data_ptr() == x.data_ptr() and torch.equal(same, out)


def test_tables_are_small_and_cached(torch_path):
    """SCAIL's 512x896 grid: a few KiB of tables, against upstream's 870 MB."""
    rope = rope3d.Rope3D(128, height=150, width=150, frames=21, interleaved=True)
    lay = layout(21, 32, 56)
    x = torch.zeros(1, 1, lay.total, 128, dtype=torch.bfloat16)
    table, _ = rope.tables(x, lay)
    assert table.numel() * table.element_size() < 256 * 1024
    assert rope.tables(x, lay)[0] is table
    exact = rope3d.Rope3D(128, height=150, width=150, frames=21, interleaved=True, mode="exact")
    assert exact.tables(x, lay)[0] is not exact.tables(x.float(), lay)[0]  # rounded per dtype


def test_bad_inputs():
    rope = make_rope("fp32", True)
    lay = LAYOUTS["odd grid"]
    x = make_input(lay, torch.float32)
    with pytest.raises(ValueError, match="tokens"):
        rope(x[:, :, 1:], lay)
    with pytest.raises(ValueError, match="do not match"):
        rope(x, rope3d.Rope3DLayout(2, 5, 7, 35, 70, 13))
    with pytest.raises(ValueError, match="exceeds the tables"):
        rope(make_input(layout(5, 5, 7), torch.float32), layout(5, 5, 7))
    with pytest.raises(ValueError, match="exceeds the tables"):
        rope(x, layout(2, 5, 7, pose_h=8))
    with pytest.raises(ValueError, match="expected"):
        rope(x[..., :64], lay)
    with pytest.raises(TypeError):
        rope(x.long(), lay)
    with pytest.raises(ValueError, match="mode"):
        rope3d.Rope3D(128, mode="bf16", **TABLE)
    with pytest.raises(ValueError, match="even"):
        rope3d.Rope3D(127, **TABLE)
    with pytest.raises(ValueError, match="rope_W"):
        rope3d.Rope3DLayout.from_kwargs({"rope_T": 2, "rope_H": 5})


def dit_kwargs(lay):
    """The rope kwargs the DiT passes to attention_fn."""
    return dict(rope_T=lay.frames, rope_H=lay.height, rope_W=lay.width, ref_length=lay.ref_length,
                seq_length=lay.seq_length, pose_length=lay.pose_length, rope_H_shift=lay.h_shift,
                rope_W_shift=lay.w_shift, global_rope_H=lay.pose_h, global_rope_W=lay.pose_w)


@pytest.fixture(scope="module")
def sat_mixin():
    """sat's BaseMixin, imported through the startup hook (sat needs it without Triton)."""
    if importlib.util.find_spec("sat") is None:
        pytest.skip("SwissArmyTransformer (sat) is not installed")
    from scail_win import hook

    installed = any(isinstance(finder, hook.ScailWinFinder) for finder in sys.meta_path)
    hook.install()
    import sat.model.base_model as base_model

    yield base_model
    if not installed:
        hook.uninstall()


def mixin_args(**extra):
    """What the DiT passes the mixin: pos_embed_config params plus its own."""
    return dict(height=TABLE["height"], width=TABLE["width"], compressed_num_frames=TABLE["frames"],
                hidden_size=384, hidden_size_head=128, height_interpolation=1.0, width_interpolation=1.0,
                time_interpolation=1.0, patch_size=[1, 2, 2], **extra)


def test_mixin_hooks_and_state(sat_mixin, torch_path):
    Mixin = rope3d.Rotary3DPositionEmbeddingMixin
    assert Mixin is rope3d._mixin_class() and issubclass(Mixin, sat_mixin.BaseMixin)
    mixin = Mixin(**mixin_args(interleaved_rope=True, rope_mode="exact"))
    assert dict(mixin.state_dict()) == {} and not list(mixin.parameters())
    assert mixin.position_embedding_forward(None) is None
    assert getattr(Mixin.attention_fn, "non_conflict", False)

    transformer = torch.nn.Module()
    transformer.position_embeddings = torch.nn.Embedding(4, 8)
    object.__setattr__(mixin, "transformer", transformer)
    mixin.reinit()
    assert not hasattr(transformer, "position_embeddings")

    lay = LAYOUTS["shifted"]
    q, k, v = (make_input(lay, torch.bfloat16, seed=s) for s in range(3))
    seen = {}

    def old_impl(q, k, v, mask, **kwargs):
        seen.update(q=q, k=k, v=v, mask=mask, kwargs=kwargs)
        return "context"

    assert mixin.attention_fn(q, k, v, "mask", old_impl=old_impl, **dit_kwargs(lay)) == "context"
    rope = make_rope("exact", True)
    assert torch.equal(seen["q"], rope(q, lay)) and torch.equal(seen["k"], rope(k, lay))
    assert seen["v"] is v and seen["mask"] == "mask" and seen["kwargs"]["rope_T"] == lay.frames
    mixin.attention_fn(q, k, v, None, old_impl=old_impl, cross_attention=True)
    assert seen["q"] is q and seen["k"] is k

    with_v = Mixin(**mixin_args(interleaved_rope=True, rot_v=True, rope_inplace=True))
    v_before = v.clone()
    with_v.attention_fn(q, k, v, None, old_impl=old_impl, **dit_kwargs(lay))
    assert seen["v"] is v and not torch.equal(v, v_before)
    with pytest.raises(ValueError, match="pnp"):
        Mixin(**mixin_args(pnp=True))


def upstream_mixin_class(base_model):
    """Upstream's Rotary3DPositionEmbeddingMixin, compiled from the SCAIL tree.

    Importing the DiT module pulls in sgm (pytorch_lightning and more); the
    class needs only these definitions and sat, so they are taken from the
    file as written.
    """
    from einops import rearrange, repeat
    from sat.transformer_defaults import attention_fn_default

    path = Path(os.environ["SCAIL_ROOT"]) / "dit_video_crossattn_sc_xc.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = {"broadcat", "rotate_half", "rotate_half_false", "Rotary3DPositionEmbeddingMixin"}
    body = [node for node in tree.body if getattr(node, "name", None) in wanted]
    assert {node.name for node in body} == wanted, f"{path} no longer defines {wanted}"
    namespace = dict(torch=torch, F=F, rearrange=rearrange, repeat=repeat, BaseMixin=base_model.BaseMixin,
                     non_conflict=base_model.non_conflict, attention_fn_default=attention_fn_default)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["Rotary3DPositionEmbeddingMixin"]


def run_both(upstream_cls, device, dtype, interleaved, lay, monkeypatch):
    """q and k as rotated by upstream's mixin and by ours in exact mode."""
    if device == "cpu":
        # Upstream moves its tables to the GPU with .cuda(); keep them here.
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    ours = rope3d.Rotary3DPositionEmbeddingMixin(**mixin_args(interleaved_rope=interleaved, rope_mode="exact"))
    theirs = upstream_cls(**mixin_args(interleaved_rope=interleaved))
    q, k = (make_input(lay, dtype, device=device, seed=s) for s in range(2))
    results = []
    for mixin in (theirs, ours):
        seen = {}
        mixin.attention_fn(q, k, k, None, old_impl=lambda q, k, v, m, **kw: seen.update(q=q, k=k), **dit_kwargs(lay))
        results.append((seen["q"], seen["k"]))
    return results


@pytest.mark.scail
@scail
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", (True, False), ids=("interleaved", "halves"))
@pytest.mark.parametrize("name", LAYOUTS)
def test_exact_mode_equals_upstream_mixin(sat_mixin, dtype, interleaved, name, monkeypatch, torch_path):
    upstream_cls = upstream_mixin_class(sat_mixin)
    (uq, uk), (q, k) = run_both(upstream_cls, "cpu", dtype, interleaved, LAYOUTS[name], monkeypatch)
    assert torch.equal(q, uq) and torch.equal(k, uk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,interleaved,name", [("exact", True, "shifted"), ("fp32", True, "odd grid"),
                                                   ("exact", False, "odd grid"), ("fp32", False, "shifted")])
def test_triton_kernel_in_interpreter(dtype, mode, interleaved, name, rotary_triton_interpreted):
    # The interpreter truncates float32 -> bfloat16 where GPUs round to nearest.
    truncating = dtype == torch.bfloat16
    if mode == "exact" and truncating:
        pytest.skip("the interpreter truncates to bfloat16; bitwise bfloat16 is checked on the GPU")
    lay = LAYOUTS[name]
    x = make_input(lay, dtype, batch=1, heads=3)
    rope = make_rope(mode, interleaved)
    table, rows = rope.tables(x, lay)
    out = torch.empty_like(x)
    rotary_triton_interpreted.rope3d(x, out, table, rows, interleaved=interleaved, exact=mode == "exact",
                                     config=(16, 2, 4))
    if mode == "exact":
        assert torch.equal(out, reference(x, lay, interleaved=interleaved, emulate=True)[0])
    else:
        ref, bound = reference(x, lay, interleaved=interleaved)
        assert_rounded_once(out, ref, bound, dtype, rounding=1.0 if truncating else 0.5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", (True, False), ids=("interleaved", "halves"))
@pytest.mark.parametrize("name", LAYOUTS)
def test_triton_path_on_gpu(dtype, interleaved, name, monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    lay = LAYOUTS[name]
    x = make_input(lay, dtype, device="cuda").transpose(1, 2).contiguous().transpose(1, 2)
    monkeypatch.setenv(rotary.BACKEND_ENV, "triton")
    ref, bound = reference(x.cpu(), lay, interleaved=interleaved)
    assert_rounded_once(make_rope("fp32", interleaved)(x, lay).cpu(), ref, bound, dtype)
    expected, _ = reference(x.cpu(), lay, interleaved=interleaved, emulate=True)
    exact = make_rope("exact", interleaved)(x, lay)
    assert exact.stride() == x.stride()
    assert torch.equal(exact.cpu(), expected)
    x_copy = x.clone()
    assert torch.equal(make_rope("exact", interleaved)(x_copy, lay, inplace=True), exact)


@pytest.mark.gpu
@pytest.mark.scail
@cuda
@scail
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_exact_mode_equals_upstream_mixin_on_gpu(sat_mixin, dtype, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.setenv(rotary.BACKEND_ENV, backend)
    upstream_cls = upstream_mixin_class(sat_mixin)
    (uq, uk), (q, k) = run_both(upstream_cls, "cuda", dtype, True, LAYOUTS["shifted"], monkeypatch)
    assert torch.equal(q, uq) and torch.equal(k, uk)
