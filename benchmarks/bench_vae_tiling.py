#!/usr/bin/env python3
"""Untiled vs tiled Wan VAE encode/decode on one CUDA GPU.

Builds upstream's ``sgm.models.wan_vae.WanVAE`` from a SCAIL tree
(--scail-root, default $SCAIL_ROOT or .scail) in bf16 on the GPU, with random
weights (upstream's ``_video_vae`` layout) or, with --vae-pth, the real
Wan2.1_VAE.pth, and calls it the way the engine does: ``vae.encode(clip)``
and ``vae.decode(latents)``, untiled and through scail_win.model.vae_tiling.

Encode: upstream's i2v clip (a reference frame then zeros), 81 frames at
512x896 by default. Decode: the latents of a smooth moving synthetic clip
(21 latent frames). For each run: tile, the memory estimate of
scail_win.model.vae_tiling, peak allocated and reserved GiB (weights and inputs
included, as in shared/baseline), seconds, and the max/mean abs and max
relative difference from the untiled result. Random weights exaggerate seam
differences; use --vae-pth for quality numbers.

    python benchmarks/bench_vae_tiling.py --json "$OUT/vae_tiling.json"
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win.model.vae_tiling import (estimate_peak_bytes, pick_tile_px, tiled_decode,  # noqa: E402
                                  tiled_encode)

GIB = 1 << 30


def load_wan_vae_module(root: Path):
    # The file alone: sgm/__init__ imports pytorch_lightning, omegaconf, ...
    path = root / "sgm" / "models" / "wan_vae.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --scail-root <SCAIL checkout>")
    spec = importlib.util.spec_from_file_location("scail_wan_vae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_vae(root: Path, vae_pth: str | None):
    wan = load_wan_vae_module(root)
    if vae_pth:
        return wan.WanVAE(vae_pth=vae_pth, dtype=torch.bfloat16, device="cuda")

    def random_model(pretrained_path=None, z_dim=None, **kwargs):
        # upstream _video_vae's configuration, without reading a checkpoint
        return wan.WanVAE_(dim=96, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)

    wan._video_vae = random_model
    torch.manual_seed(0)
    return wan.WanVAE(dtype=torch.bfloat16, device="cuda")


def synthetic_clip(frames: int, height: int, width: int) -> torch.Tensor:
    """Smooth, moving colour patterns in [-1, 1], (1, 3, T, H, W) bf16 on the GPU."""
    t = torch.arange(frames, device="cuda", dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, height, device="cuda")[None, :, None]
    x = torch.linspace(0, 1, width, device="cuda")[None, None, :]
    channels = [torch.sin(6.0 * x + 3.0 * y + 0.15 * t),
                torch.cos(9.0 * y - 4.0 * x + 0.1 * t),
                torch.sin(5.0 * (x - 0.5) ** 2 * 20 + 7.0 * y * x - 0.2 * t)]
    return torch.stack(channels)[None].clamp(-1, 1).to(torch.bfloat16)


def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out, torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB, seconds


def parse_tiles(text: str) -> list[tuple[int, int]]:
    tiles = []
    for item in filter(None, text.split(",")):
        h, _, w = item.lower().partition("x")
        tiles.append((int(h), int(w or h)))
    return tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT", ".scail"))
    ap.add_argument("--vae-pth", help="real Wan2.1_VAE.pth (default: random weights)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--encode-tiles", default="256x256,512x480",
                    help="comma list of HxW pixel tiles for encode")
    ap.add_argument("--decode-tiles", default="32x32,64x60",
                    help="comma list of HxW latent tiles for decode")
    ap.add_argument("--overlap-px", type=int, default=64, help="overlap in pixels (decode: /8)")
    ap.add_argument("--budget-gib", default="7,4",
                    help="comma list of budgets: also run pick_tile_px's choice for each")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    frames, height, width = args.frames, args.height, args.width
    vae = build_vae(Path(args.scail_root), args.vae_pth)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  VAE "
          f"{sum(p.numel() for p in vae.model.parameters()) / 1e6:.1f} M params, "
          f"{'weights ' + args.vae_pth if args.vae_pth else 'random weights'}", flush=True)
    budgets = [float(b) for b in filter(None, args.budget_gib.split(","))]
    overlap_latent = args.overlap_px // 8
    rows = []

    def report(op, tile, estimate, result, ref, peak, reserved, seconds):
        row = dict(op=op, tile=tile, estimate_gib=round(estimate / GIB, 3), peak_alloc_gib=round(peak, 3),
                   peak_reserved_gib=round(reserved, 3), seconds=round(seconds, 3))
        if ref is not None:
            diff = (result.float().cpu() - ref).abs()
            row.update(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                       max_rel=float(diff.max() / ref.abs().max()))
        rows.append(row)
        diffs = (f"  max abs {row['max_abs']:.4g}  mean abs {row['mean_abs']:.3g}  rel {row['max_rel']:.4g}"
                 if ref is not None else "")
        print(f"{op:6s} {str(tile):12s} est {row['estimate_gib']:6.2f}  peak alloc {peak:6.2f}  "
              f"reserved {reserved:6.2f} GiB  {seconds:6.2f} s{diffs}", flush=True)

    # Warm up cuDNN and the allocator on a small clip so the first timing is fair.
    with torch.no_grad():
        vae.decode(vae.encode(synthetic_clip(5, 64, 64)))

    clip = synthetic_clip(frames, height, width)
    clip[:, :, 1:] = 0  # upstream's i2v input: the reference frame, then zeros
    encode_tiles = [(t, args.overlap_px) for t in parse_tiles(args.encode_tiles)]
    for budget in budgets:
        tile = pick_tile_px(frames, height, width, int(budget * GIB), "encode", args.overlap_px)
        if tile is not None:
            encode_tiles.append((tile, args.overlap_px))
    ref, peak, reserved, seconds = measure(lambda: vae.encode(clip))
    report("encode", "untiled", estimate_peak_bytes("encode", frames, height, width), ref, None,
           peak, reserved, seconds)
    ref = ref.cpu()
    for tile, overlap in encode_tiles:
        out, peak, reserved, seconds = measure(lambda: tiled_encode(vae, clip, tile, overlap))
        report("encode", tile, estimate_peak_bytes("encode", frames, height, width, tile), out, ref,
               peak, reserved, seconds)
        del out

    with torch.no_grad():
        latents = vae.encode(synthetic_clip(frames, height, width))
    del clip, ref
    out_frames = 4 * (latents.shape[2] - 1) + 1
    decode_tiles = [(t, overlap_latent) for t in parse_tiles(args.decode_tiles)]
    for budget in budgets:
        tile = pick_tile_px(out_frames, height, width, int(budget * GIB), "decode", args.overlap_px)
        if tile is not None:
            decode_tiles.append(((tile[0] // 8, tile[1] // 8), overlap_latent))
    ref, peak, reserved, seconds = measure(lambda: vae.decode(latents))
    report("decode", "untiled", estimate_peak_bytes("decode", out_frames, height, width), ref, None,
           peak, reserved, seconds)
    ref = ref.cpu()
    for tile, overlap in decode_tiles:
        out, peak, reserved, seconds = measure(lambda: tiled_decode(vae, latents, tile, overlap))
        tile_px = (tile[0] * 8, tile[1] * 8)
        report("decode", tile, estimate_peak_bytes("decode", out_frames, height, width, tile_px), out,
               ref, peak, reserved, seconds)
        del out

    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, frames=frames,
            height=height, width=width, weights=args.vae_pth or "random", rows=rows), indent=1),
            encoding="utf-8")


if __name__ == "__main__":
    main()
