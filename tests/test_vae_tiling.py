"""Tests for scail_win.model.vae_tiling: a toy causal conv VAE on the CPU, and
upstream's WanVAE (tiny, random weights) when SCAIL_ROOT names a SCAIL tree."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scail_win.model import vae_tiling
from scail_win.errors import UserError
from scail_win.model.vae_tiling import (blend_weights, estimate_peak_bytes, needs_tiling, pick_tile_px,
                                  tile_spans, tiled_decode, tiled_decode_with, tiled_encode,
                                  tiled_encode_with)

GIB = 1 << 30
FACTOR = 8


class CausalConv(nn.Conv3d):
    """3x3x3 conv that sees only the current and two previous frames."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3)

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1, 2, 0)))


class ToyVAE(nn.Module):
    """8x spatial down/up, causal in time, nonlinear: enough to tell tiling bugs."""

    def __init__(self, latent=4, width=6):
        super().__init__()
        self.enc_in = CausalConv(3, width)
        # Zero pad right/bottom, stride 2: floor(n / 2), as Wan's encoder rounds.
        self.downs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2) for _ in range(3))
        self.enc_mix = nn.ModuleList(CausalConv(width, width) for _ in range(3))
        self.enc_out = CausalConv(width, latent)
        self.dec_in = CausalConv(latent, width)
        self.dec_mix = nn.ModuleList(CausalConv(width, width) for _ in range(3))
        self.dec_out = CausalConv(width, 3)

    def encode(self, x):
        x = torch.tanh(self.enc_in(x))
        for down, mix in zip(self.downs, self.enc_mix):
            b, c, t, h, w = x.shape
            frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            frames = down(F.pad(frames, (0, 1, 0, 1)))
            x = frames.reshape(b, t, c, *frames.shape[-2:]).permute(0, 2, 1, 3, 4)
            x = torch.tanh(mix(x))
        return self.enc_out(x)

    def decode(self, z):
        x = torch.tanh(self.dec_in(z))
        for mix in self.dec_mix:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
            x = torch.tanh(mix(x))
        return self.dec_out(x)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyVAE().eval().requires_grad_(False)


def _video(h, w, t=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=gen) * 2 - 1


def _latents(h, w, t=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, t, h, w, generator=gen)


# ---- layout and weights ---------------------------------------------------

@pytest.mark.parametrize("size,tile,overlap,align", [
    (512, 256, 64, 8), (896, 256, 64, 8), (100, 48, 16, 8), (30, 16, 8, 8),
    (264, 256, 64, 8), (13, 4, 1, 1), (64, 64, 8, 8), (7, 32, 8, 8), (57, 8, 0, 1),
])
def test_tile_spans_cover_aligned_and_overlap(size, tile, overlap, align):
    spans = tile_spans(size, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == size
    if size <= tile:
        assert spans == [(0, size)]
    for start, end in spans:
        assert start % align == 0
        assert tile <= end - start < tile + align or spans == [(0, size)]
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 < e1
        assert e0 - s1 >= overlap


@pytest.mark.parametrize("args", [(10, 0, 0), (10, 8, 8), (10, 8, -1), (10, 12, 4, 8), (10, 16, 4, 8), (0, 8, 0)])
def test_tile_spans_reject_bad_arguments(args):
    with pytest.raises(ValueError):
        tile_spans(*args)


def test_blend_weights_cross_fade_linearly_and_sum_to_one():
    spans = [(0, 10), (6, 16)]
    w0, w1 = blend_weights(spans, 16)
    assert torch.equal(w0[:6], torch.ones(6, dtype=torch.float64))
    assert torch.equal(w1[4:], torch.ones(6, dtype=torch.float64))
    # Over the 4 shared positions: (3.5, 2.5, 1.5, 0.5) / 4 fading out, mirrored fading in.
    assert torch.allclose(w0[6:], torch.tensor([3.5, 2.5, 1.5, 0.5], dtype=torch.float64) / 4)
    assert torch.allclose(w0[6:] + w1[:4], torch.ones(4, dtype=torch.float64))


def test_blend_weights_sum_to_one_with_uneven_and_triple_overlaps():
    spans = [(0, 12), (3, 15), (9, 20), (10, 24)]
    total = torch.zeros(24, dtype=torch.float64)
    for (s, e), w in zip(spans, blend_weights(spans, 24)):
        assert bool((w > 0).all())
        total[s:e] += w
    assert torch.allclose(total, torch.ones(24, dtype=torch.float64))


# ---- tiled vs untiled on the toy VAE ---------------------------------------

def test_one_tile_is_exactly_untiled(toy):
    video = _video(64, 80)
    assert torch.equal(tiled_encode_with(toy.encode, video, factor=FACTOR, tile_px=(64, 80),
                                         overlap_px=0),
                       toy.encode(video))
    z = _latents(6, 9)
    assert torch.equal(tiled_decode_with(toy.decode, z, factor=FACTOR, tile_latent=16, overlap_latent=0),
                       toy.decode(z))


@pytest.mark.parametrize("h,w", [(100, 76), (71, 130), (64, 64), (41, 200)])
def test_encode_shapes_match_untiled_for_odd_sizes(toy, h, w):
    video = _video(h, w, t=3)
    ref = toy.encode(video)
    out = tiled_encode_with(toy.encode, video, factor=FACTOR, tile_px=32, overlap_px=16)
    assert out.shape == ref.shape == (1, 4, 3, h // 8, w // 8)


@pytest.mark.parametrize("h,w", [(13, 9), (5, 17), (7, 7)])
def test_decode_shapes_match_untiled_for_odd_sizes(toy, h, w):
    z = _latents(h, w, t=2)
    out = tiled_decode_with(toy.decode, z, factor=FACTOR, tile_latent=4, overlap_latent=2)
    assert out.shape == toy.decode(z).shape == (1, 3, 2, 8 * h, 8 * w)


def _seam_mask(spans, size, reach):
    """True where no covering tile has a cut edge within ``reach``."""
    exact = torch.ones(size, dtype=torch.bool)
    for i, (s, e) in enumerate(spans):
        lo = s + reach if i > 0 else s
        hi = e - reach if i + 1 < len(spans) else e
        exact[s:lo] = False
        exact[max(hi, s):e] = False
    return exact


def _worst_tile_error(fn, x, ref, rows, cols, factor, upsamples):
    """Per output pixel, the largest error of any raw (unblended) tile covering it."""
    def to_out(pos):
        return pos * factor if upsamples else pos // factor

    worst = torch.zeros(ref.shape[-2:])
    for r0, r1 in rows:
        for c0, c1 in cols:
            raw = fn(x[..., r0:r1, c0:c1].contiguous())
            o = (slice(to_out(r0), to_out(r0) + raw.shape[-2]), slice(to_out(c0), to_out(c0) + raw.shape[-1]))
            tile_err = (raw - ref[..., o[0], o[1]]).abs().amax(dim=(0, 1, 2))
            worst[o] = torch.maximum(worst[o], tile_err)
    return worst


def test_decode_is_exact_away_from_seams_and_blends_within_tile_errors(toy):
    z = _latents(20, 23)
    ref = toy.decode(z)
    tile, overlap = 12, 4
    out = tiled_decode_with(toy.decode, z, factor=FACTOR, tile_latent=tile, overlap_latent=overlap)
    rows = [(8 * s, 8 * e) for s, e in tile_spans(20, tile, overlap)]
    cols = [(8 * s, 8 * e) for s, e in tile_spans(23, tile, overlap)]
    assert len(rows) > 1 and len(cols) > 1
    # The toy decoder sees at most 2 latents (16 px) around an output pixel.
    mask = _seam_mask(rows, 160, 16)[:, None] & _seam_mask(cols, 184, 16)[None, :]
    assert mask.any() and not mask.all()
    diff = (out - ref).abs()
    assert diff[..., mask].max() < 1e-5
    # Each pixel is a convex blend of tile outputs, so it is never further from
    # the untiled value than the worst raw tile there.
    worst = _worst_tile_error(toy.decode, z, ref, tile_spans(20, tile, overlap),
                              tile_spans(23, tile, overlap), FACTOR, upsamples=True)
    assert bool((diff.amax(dim=(0, 1, 2)) <= worst + 1e-5).all())
    assert diff.max() > 0  # the seams really differ, so the checks above bite


def test_encode_tiled_close_to_untiled_and_exact_away_from_seams(toy):
    video = _video(160, 200, t=3)
    ref = toy.encode(video)
    out = tiled_encode_with(toy.encode, video, factor=FACTOR, tile_px=96, overlap_px=32)
    rows = [(s // 8, e // 8) for s, e in tile_spans(160, 96, 32, 8)]
    cols = [(s // 8, e // 8) for s, e in tile_spans(200, 96, 32, 8)]
    assert len(rows) > 1 and len(cols) > 1
    # The toy encoder sees 23 px before and 37 px after a latent's own 8 px.
    mask = _seam_mask(rows, 20, 5)[:, None] & _seam_mask(cols, 25, 5)[None, :]
    assert mask.any() and not mask.all()
    diff = (out - ref).abs()
    assert diff[..., mask].max() < 1e-5
    assert diff.max() < 0.5 * ref.abs().max()


def test_temporal_causality_is_kept(toy):
    video = _video(96, 112, t=6)
    changed = video.clone()
    changed[:, :, 3] = -changed[:, :, 3]
    a = tiled_encode_with(toy.encode, video, factor=FACTOR, tile_px=48, overlap_px=16)
    b = tiled_encode_with(toy.encode, changed, factor=FACTOR, tile_px=48, overlap_px=16)
    assert torch.equal(a[:, :, :3], b[:, :, :3])
    assert not torch.equal(a[:, :, 3], b[:, :, 3])
    z = _latents(10, 11, t=5)
    z2 = z.clone()
    z2[:, :, 2] += 1
    da = tiled_decode_with(toy.decode, z, factor=FACTOR, tile_latent=6, overlap_latent=2)
    db = tiled_decode_with(toy.decode, z2, factor=FACTOR, tile_latent=6, overlap_latent=2)
    assert torch.equal(da[:, :, :2], db[:, :, :2])
    assert not torch.equal(da[:, :, 2], db[:, :, 2])


def test_tiles_run_one_at_a_time_on_the_given_device(toy):
    seen = []

    def decode(z):
        seen.append((tuple(z.shape), z.is_contiguous(), z.device.type))
        return toy.decode(z)

    z = _latents(12, 12, t=2)
    out = tiled_decode_with(decode, z, factor=FACTOR, tile_latent=8, overlap_latent=4,
                            device="cpu", output_device="cpu")
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert seen == [((1, 4, 2, 8, 8), True, "cpu")] * 4


def test_half_precision_tiles_assemble_in_float32(toy):
    z = _latents(10, 10, t=2)
    out = tiled_decode_with(lambda t: toy.decode(t).to(torch.bfloat16), z, factor=FACTOR,
                            tile_latent=6, overlap_latent=2)
    assert out.dtype == torch.float32


def test_wrong_factor_is_reported(toy):
    with pytest.raises(ValueError, match="spatial factor 4"):
        tiled_decode_with(toy.decode, _latents(10, 10, t=1), factor=4, tile_latent=6, overlap_latent=2)


@pytest.mark.parametrize("kwargs", [dict(tile_px=36), dict(tile_px=32, overlap_px=12),
                                    dict(tile_px=32, overlap_px=32), dict(tile_px=(32,))])
def test_bad_tiles_are_rejected(toy, kwargs):
    with pytest.raises((ValueError, TypeError)):
        tiled_encode_with(toy.encode, _video(64, 64, t=1), factor=FACTOR, **kwargs)


def test_non_video_input_is_rejected(toy):
    with pytest.raises(ValueError, match="frames, height, width"):
        tiled_encode_with(toy.encode, torch.zeros(3, 64, 64), factor=FACTOR)


# ---- the WanVAE adapters, on stand-ins with upstream's call shapes ---------

class WrapperLike:
    """Upstream WanVAE's shape: .model, .scale, batch encode/decode."""

    def __init__(self, toy):
        self.model = toy
        self.scale = [torch.zeros(4), torch.ones(4)]

    def encode(self, videos):
        return self.model.encode(videos).float()

    def decode(self, zs):
        return self.model.decode(zs).float().clamp_(-1, 1)


class InnerLike(ToyVAE):
    """Upstream WanVAE_'s shape: encode(x, scale) / decode(z, scale)."""

    def encode(self, x, scale):
        return (super().encode(x) - scale[0]) * scale[1]

    def decode(self, z, scale):
        return super().decode(z / scale[1] + scale[0])


def test_wrapper_adapter_matches_its_own_calls(toy):
    vae = WrapperLike(toy)
    video = _video(64, 64, t=3)
    assert torch.equal(tiled_encode(vae, video, tile_px=64, overlap_px=0), vae.encode(video))
    out = tiled_decode(vae, _latents(12, 12, t=2), tile_latent=8, overlap_latent=4)
    assert out.shape == (1, 3, 2, 96, 96) and out.abs().max() <= 1


def test_inner_model_needs_scale():
    torch.manual_seed(0)
    inner = InnerLike().eval().requires_grad_(False)
    z = _latents(8, 8, t=1)
    with pytest.raises(TypeError, match="scale"):
        tiled_decode(inner, z)
    scale = (0.5, 2.0)
    assert torch.equal(tiled_decode(inner, z, tile_latent=8, overlap_latent=0, scale=scale), inner.decode(z, scale))


def test_unknown_vae_is_rejected():
    with pytest.raises(TypeError, match="WanVAE"):
        tiled_decode(object(), _latents(4, 4, t=1))


# ---- the tiling decision ---------------------------------------------------

# Upstream's measured peaks; the later encode phases also still held the
# first phase's 81-frame bf16 clip at 512x896 (extra bytes).
CLIP_81 = 6 * 81 * 512 * 896


@pytest.mark.parametrize("op,frames,h,w,extra,gib", [
    ("decode", 81, 512, 896, 0, 8.41), ("encode", 81, 512, 896, 0, 6.79),
    ("encode", 81, 256, 448, CLIP_81, 2.10), ("encode", 1, 512, 896, CLIP_81 - 6 * 512 * 896, 2.52),
])
def test_estimate_reproduces_measured_upstream_peaks(op, frames, h, w, extra, gib):
    assert (estimate_peak_bytes(op, frames, h, w) + extra) / GIB == pytest.approx(gib, rel=1e-3)


def test_estimate_follows_frame_area_not_clip_length():
    # Chunked in time: a short clip at full size still needs nearly all of it.
    short = estimate_peak_bytes("decode", 17, 512, 896)
    assert 0.9 * estimate_peak_bytes("decode", 81, 512, 896) < short
    assert estimate_peak_bytes("decode", 81, 256, 448) < 0.4 * estimate_peak_bytes("decode", 81, 512, 896)
    assert estimate_peak_bytes("decode", 321, 512, 896) > estimate_peak_bytes("decode", 81, 512, 896)


def test_estimate_tiled_is_lower_and_full_tile_is_untiled():
    untiled = estimate_peak_bytes("decode", 81, 512, 896)
    assert estimate_peak_bytes("decode", 81, 512, 896, (512, 896)) == untiled
    assert estimate_peak_bytes("decode", 81, 512, 896, (256, 256)) < 0.4 * untiled
    assert estimate_peak_bytes("encode", 81, 512, 896, 256) < estimate_peak_bytes("encode", 81, 512, 896)


def test_needs_tiling_on_an_8_gib_card():
    assert needs_tiling(81, 512, 896, 8 * GIB, op="decode")
    assert not needs_tiling(81, 512, 896, 9 * GIB, op="decode")
    assert not needs_tiling(81, 512, 896, 7 * GIB, op="encode")
    assert needs_tiling(81, 512, 896, 6 * GIB, op="encode")
    assert not needs_tiling(81, 256, 448, 6 * GIB, op="encode")


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("gib", [6.0, 4.0, 2.5])
def test_pick_tile_fits_the_budget(op, gib):
    tile = pick_tile_px(81, 512, 896, int(gib * GIB), op=op)
    assert tile is not None
    assert tile[0] % 8 == 0 and tile[1] % 8 == 0
    assert tile[0] < 512 or tile[1] < 896
    assert estimate_peak_bytes(op, 81, 512, 896, tile) <= gib * GIB


def test_pick_tile_none_when_untiled_fits_and_error_when_nothing_fits():
    assert pick_tile_px(81, 512, 896, 12 * GIB) is None
    with pytest.raises(UserError, match="smallest tiles"):
        pick_tile_px(81, 512, 896, GIB // 2)


@pytest.mark.parametrize("args", [("resize", 81, 512, 896), ("decode", 0, 512, 896), ("decode", 81, 512.0, 896)])
def test_estimate_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        estimate_peak_bytes(*args)


def test_importing_the_decision_helpers_does_not_need_torch_first():
    # The plan may ask before anything imported torch; the module defers it.
    source = Path(vae_tiling.__file__).read_text(encoding="utf-8")
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("torch" in line for line in top_level)


# ---- upstream's WanVAE from the SCAIL tree ---------------------------------

def _load_wan_vae_module(root: Path):
    # Load the file itself: sgm/__init__ pulls in pytorch_lightning and more.
    path = root / "sgm" / "models" / "wan_vae.py"
    if not path.is_file():
        pytest.skip(f"{path} not found in SCAIL_ROOT")
    spec = importlib.util.spec_from_file_location("scail_wan_vae_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_wan_vae():
    root = os.environ.get("SCAIL_ROOT")
    if not root:
        pytest.skip("SCAIL_ROOT is not set")
    wan = _load_wan_vae_module(Path(root))

    def small_model(pretrained_path=None, z_dim=None, **kwargs):
        # Upstream's layout (dim_mult, temporal flags) at a tiny width.
        return wan.WanVAE_(dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[False, True, True])

    torch.manual_seed(0)
    original = wan._video_vae
    wan._video_vae = small_model
    try:
        return wan.WanVAE(dtype=torch.float32, device="cpu")
    finally:
        wan._video_vae = original


def _log_difference(what, out, ref):
    diff = (out - ref).abs()
    logging.getLogger(__name__).info(
        "tiny WanVAE %s, tiled vs untiled: max abs %.4g, mean abs %.4g, max rel %.4g",
        what, float(diff.max()), float(diff.mean()), float(diff.max() / ref.abs().max()))
    return diff


@pytest.mark.scail
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_real_wan_vae_tiled_decode(tiny_wan_vae):
    vae = tiny_wan_vae
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 3, 8, 10, generator=gen)
    ref = vae.decode(z)
    assert torch.equal(tiled_decode(vae, z, tile_latent=(8, 10), overlap_latent=0), ref)
    out = tiled_decode(vae, z, tile_latent=6, overlap_latent=2)
    assert out.shape == ref.shape == (1, 3, 9, 64, 80)
    diff = _log_difference("decode", out, ref)
    # Random weights make seams far worse than trained ones; what must hold is
    # that blending never leaves the range of the raw tiles' own errors.
    worst = _worst_tile_error(vae.decode, z, ref, tile_spans(8, 6, 2), tile_spans(10, 6, 2),
                              8, upsamples=True)
    assert bool((diff.amax(dim=(0, 1, 2)) <= worst + 1e-5).all())
    assert out.abs().max() <= 1
    # Latent frame 2 becomes video frames 5..8; the causal cache per tile
    # must leave frames 0..4 untouched.
    z2 = z.clone()
    z2[:, :, 2] += 1
    out2 = tiled_decode(vae, z2, tile_latent=6, overlap_latent=2)
    assert torch.equal(out[:, :, :5], out2[:, :, :5])
    assert not torch.equal(out[:, :, 5:], out2[:, :, 5:])


@pytest.mark.scail
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_real_wan_vae_tiled_encode(tiny_wan_vae):
    vae = tiny_wan_vae
    gen = torch.Generator().manual_seed(4)
    video = torch.rand(1, 3, 5, 64, 80, generator=gen) * 2 - 1
    ref = vae.encode(video)
    assert torch.equal(tiled_encode(vae, video, tile_px=(64, 80), overlap_px=0), ref)
    out = tiled_encode(vae, video, tile_px=48, overlap_px=16)
    assert out.shape == ref.shape == (1, 16, 2, 8, 10)
    diff = _log_difference("encode", out, ref)
    worst = _worst_tile_error(vae.encode, video, ref, tile_spans(64, 48, 16, 8),
                              tile_spans(80, 48, 16, 8), 8, upsamples=False)
    assert bool((diff.amax(dim=(0, 1, 2)) <= worst + 1e-5).all())
