"""Spatially tiled encode and decode for SCAIL's Wan VAE.

Upstream decodes 21 latent frames at 512x896 in one pass and peaks at
8.41 GiB (encode of the 81-frame i2v clip: 6.79 GiB), which does not fit an
8 GB card. Almost all of that is the activations of one temporal chunk over
the whole frame, so splitting height and width bounds it.

Wan's VAE is causal in time: it walks the clip chunk by chunk (first frame,
then four at a time) and carries a cache of each causal conv's last inputs.
So tiles split only height and width; every tile goes through the VAE's own
``encode``/``decode`` over the whole clip, with its own cache, exactly as
upstream runs it. Overlapping tiles are cross-faded with linear ramps (the
idea of diffusers' ``blend_v``/``blend_h``), written as per-axis weights
normalised to sum to one, so any overlap pattern blends correctly and a
region covered by one tile keeps that tile's values bit for bit.

Only one tile's activations exist at a time; each tile's result is added
into the output tensor on the output device and dropped.

The functions come in two layers: ``tiled_encode_with``/``tiled_decode_with``
take plain callables and the spatial factor (testable with any toy VAE), and
``tiled_encode``/``tiled_decode`` adapt upstream's ``WanVAE`` (or its inner
``WanVAE_`` model). ``estimate_peak_bytes``, ``needs_tiling`` and
``pick_tile_px`` turn the measured upstream peaks into a tiling decision.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from scail_win.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Wan2.1's VAE: 8x spatial, 4x temporal compression, 16 latent channels.
WAN_SPATIAL_FACTOR = 8

# Defaults: 256 px tiles with 64 px of overlap, as diffusers' Wan VAE uses.
DEFAULT_TILE_PX = (256, 256)
DEFAULT_OVERLAP_PX = (64, 64)
DEFAULT_TILE_LATENT = (32, 32)
DEFAULT_OVERLAP_LATENT = (8, 8)

Pair = Union[int, Sequence[int]]
Span = tuple[int, int]


def _pair(value: Pair, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    try:
        first, second = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got {value!r}") from None
    for item in (first, second):
        if not isinstance(item, int) or isinstance(item, bool):
            raise TypeError(f"{name} must hold ints, got {value!r}")
    return first, second


def tile_spans(size: int, tile: int, overlap: int, align: int = 1) -> list[Span]:
    """``(start, end)`` of the tiles that cover ``range(size)`` along one axis.

    Tiles are ``tile`` long, start at multiples of ``align`` and overlap
    their neighbours by at least ``overlap``; they are spread evenly between
    0 and the end, and the last one ends exactly at ``size`` (it may be up
    to ``align - 1`` longer than ``tile``). One tile when ``tile >= size``.
    """
    if size < 1:
        raise ValueError(f"cannot tile an axis of size {size}")
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tile {tile} and overlap {overlap} need 0 <= overlap < tile")
    if tile % align or overlap % align:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {align}")
    last = (size - tile) // align * align
    if last <= 0:
        return [(0, size)]
    stride = tile - overlap
    count = 1 + -(-(size - tile) // stride)
    # Spacing last/(count-1) <= stride, and flooring to the (stride-dividing)
    # alignment keeps every gap <= stride, so each overlap is >= `overlap`.
    starts = sorted({i * last // (count - 1) // align * align for i in range(count)})
    return [(s, s + tile) for s in starts[:-1]] + [(starts[-1], size)]


def blend_weights(spans: Sequence[Span], size: int) -> list["torch.Tensor"]:
    """Per-tile float64 weights along one axis; they sum to 1 at every position.

    Each tile ramps linearly from its edge across the stretch it shares with
    its neighbour (0.5/L ... (L-0.5)/L, so two tiles sharing L positions
    cross-fade exactly and never get a zero weight) and is 1 elsewhere.
    """
    import torch

    raw = []
    for i, (start, end) in enumerate(spans):
        centre = torch.arange(start, end, dtype=torch.float64) + 0.5
        weight = torch.ones(end - start, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > start:
            weight = torch.minimum(weight, (centre - start) / (spans[i - 1][1] - start))
        if i + 1 < len(spans) and end > spans[i + 1][0]:
            weight = torch.minimum(weight, (end - centre) / (end - spans[i + 1][0]))
        raw.append(weight)
    total = torch.zeros(size, dtype=torch.float64)
    for (start, end), weight in zip(spans, raw):
        total[start:end] += weight
    if not bool((total > 0).all()):
        raise ValueError(f"tiles {list(spans)} do not cover all {size} positions")
    return [weight / total[start:end] for (start, end), weight in zip(spans, raw)]


def _tiled(fn: Callable[["torch.Tensor"], "torch.Tensor"], x: "torch.Tensor", *, what: str,
           factor: int, upsamples: bool, tile: tuple[int, int], overlap: tuple[int, int],
           align: int, device: Any, output_device: Any) -> "torch.Tensor":
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"{what}: expected a (batch, channels, frames, height, width) tensor, "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{what}: spatial factor must be a positive int, got {factor!r}")
    height, width = x.shape[-2:]
    rows = tile_spans(height, tile[0], overlap[0], align)
    cols = tile_spans(width, tile[1], overlap[1], align)
    out_device = x.device if output_device is None else torch.device(output_device)

    def run(row: Span, col: Span) -> "torch.Tensor":
        piece = x[:, :, :, row[0]:row[1], col[0]:col[1]]
        if device is not None:
            piece = piece.to(device)
        return fn(piece.contiguous())

    def to_out(pos: int) -> int:
        return pos * factor if upsamples else pos // factor

    with torch.no_grad():
        if len(rows) == 1 and len(cols) == 1:
            y = run(rows[0], cols[0])
            return y.to(out_device, torch.promote_types(y.dtype, torch.float32))

        # The bottom-right tile ends where the input ends, so its result fixes
        # the output size whatever rounding the VAE applies at odd sizes.
        order = [(r, c) for r in range(len(rows)) for c in range(len(cols))][::-1]
        out = None
        for n, (r, c) in enumerate(order):
            logger.debug("%s: tile %d/%d rows %s cols %s", what, n + 1, len(order), rows[r], cols[c])
            y = run(rows[r], cols[c])
            if out is None:
                out_h = to_out(rows[-1][0]) + y.shape[-2]
                out_w = to_out(cols[-1][0]) + y.shape[-1]
                dtype = torch.promote_types(y.dtype, torch.float32)
                out = torch.zeros((*y.shape[:3], out_h, out_w), dtype=dtype, device=out_device)
                out_rows = [(to_out(s), to_out(e)) for s, e in rows[:-1]] + [(to_out(rows[-1][0]), out_h)]
                out_cols = [(to_out(s), to_out(e)) for s, e in cols[:-1]] + [(to_out(cols[-1][0]), out_w)]
                for spans in (out_rows, out_cols):
                    if any(e <= s for s, e in spans) or any(b[1] < a[1] for a, b in zip(spans, spans[1:])):
                        raise ValueError(f"{what}: the last tile gave shape {tuple(y.shape)}, which "
                                         f"does not extend the other tiles; is the spatial factor "
                                         f"{factor} right?")
                row_w = [w.to(out_device, dtype) for w in blend_weights(out_rows, out_h)]
                col_w = [w.to(out_device, dtype) for w in blend_weights(out_cols, out_w)]
            (y0, y1), (x0, x1) = out_rows[r], out_cols[c]
            expected = (*out.shape[:3], y1 - y0, x1 - x0)
            if tuple(y.shape) != expected:
                raise ValueError(f"{what}: the tile at rows {rows[r]} cols {cols[c]} gave shape "
                                 f"{tuple(y.shape)}, expected {expected}; is the spatial factor "
                                 f"{factor} right?")
            out[:, :, :, y0:y1, x0:x1].addcmul_(y.to(out_device, out.dtype),
                                                row_w[r][:, None] * col_w[c][None, :])
            # Drop this tile's result before the next tile allocates its own.
            del y
    return out


def tiled_encode_with(encode_fn: Callable[["torch.Tensor"], "torch.Tensor"], video: "torch.Tensor", *,
                      factor: int, tile_px: Pair = DEFAULT_TILE_PX,
                      overlap_px: Pair = DEFAULT_OVERLAP_PX, device: Any = None,
                      output_device: Any = None) -> "torch.Tensor":
    """Encode ``video`` (B, C, T, H, W) tile by tile with ``encode_fn``.

    ``encode_fn`` maps a (B, C, T, h, w) clip to latents (B, c, t, h/factor,
    w/factor); tiles are ``tile_px`` pixels with ``overlap_px`` of overlap,
    both multiples of ``factor``, and start at multiples of ``factor``. Each
    tile is moved to ``device`` (if given) before ``encode_fn``; the result is
    assembled on ``output_device`` (default: the input's device) in at least
    float32. With one tile this is exactly ``encode_fn(video)``.
    """
    return _tiled(encode_fn, video, what="VAE encode", factor=factor, upsamples=False,
                  tile=_pair(tile_px, "tile_px"), overlap=_pair(overlap_px, "overlap_px"),
                  align=factor, device=device, output_device=output_device)


def tiled_decode_with(decode_fn: Callable[["torch.Tensor"], "torch.Tensor"], latents: "torch.Tensor", *,
                      factor: int, tile_latent: Pair = DEFAULT_TILE_LATENT,
                      overlap_latent: Pair = DEFAULT_OVERLAP_LATENT, device: Any = None,
                      output_device: Any = None) -> "torch.Tensor":
    """Decode ``latents`` (B, c, t, h, w) tile by tile with ``decode_fn``.

    ``decode_fn`` maps latents to (B, C, T, h*factor, w*factor); tiles are
    ``tile_latent`` latent positions with ``overlap_latent`` of overlap.
    Device handling and dtype as in :func:`tiled_encode_with`.
    """
    return _tiled(decode_fn, latents, what="VAE decode", factor=factor, upsamples=True,
                  tile=_pair(tile_latent, "tile_latent"),
                  overlap=_pair(overlap_latent, "overlap_latent"),
                  align=1, device=device, output_device=output_device)


def _wan_callables(vae: Any, scale: Any) -> tuple[Callable, Callable, Any]:
    """(encode_fn, decode_fn, device) for upstream's WanVAE or its inner model."""
    if hasattr(vae, "model") and hasattr(vae, "scale") and callable(getattr(vae, "decode", None)):
        # sgm.models.wan_vae.WanVAE: encode/decode take a batch, apply the
        # latent mean/std and autocast; decode also clamps to [-1, 1].
        return vae.encode, vae.decode, _parameter_device(vae.model)
    if callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None)):
        # The inner WanVAE_ model needs the (mean, 1/std) pair on every call.
        if scale is None:
            raise TypeError("pass scale=(mean, 1/std) when tiling the inner WanVAE_ model "
                            "(upstream's WanVAE object carries it as .scale)")
        return partial(vae.encode, scale=scale), partial(vae.decode, scale=scale), _parameter_device(vae)
    raise TypeError(f"expected upstream's WanVAE or its inner model, got {type(vae).__name__}")


def _parameter_device(module: Any) -> Any:
    for parameter in module.parameters():
        return parameter.device
    return None


def tiled_encode(vae: Any, video: "torch.Tensor", tile_px: Pair = DEFAULT_TILE_PX,
                 overlap_px: Pair = DEFAULT_OVERLAP_PX, *, scale: Any = None,
                 output_device: Any = None, factor: int = WAN_SPATIAL_FACTOR) -> "torch.Tensor":
    """Upstream ``vae.encode(video)``, tiled over height and width.

    ``vae`` is ``sgm.models.wan_vae.WanVAE`` (or its ``.model`` with
    ``scale``); ``video`` is (B, 3, T, H, W) in [-1, 1], in the dtype upstream
    passes. Tiles run on the VAE's parameter device; the latents (float32)
    land on ``output_device`` (default: the video's device). ``factor``: the
    VAE's spatial stride (the model's ``ModelSpec.vae_stride``).
    """
    encode_fn, _, device = _wan_callables(vae, scale)
    return tiled_encode_with(encode_fn, video, factor=factor, tile_px=tile_px,
                             overlap_px=overlap_px, device=device, output_device=output_device)


def tiled_decode(vae: Any, latents: "torch.Tensor", tile_latent: Pair = DEFAULT_TILE_LATENT,
                 overlap_latent: Pair = DEFAULT_OVERLAP_LATENT, *, scale: Any = None,
                 output_device: Any = None, factor: int = WAN_SPATIAL_FACTOR) -> "torch.Tensor":
    """Upstream ``vae.decode(latents)``, tiled over height and width.

    ``latents`` is (B, 16, t, h, w); the video (float32, B, 3, 4t-3, 8h, 8w)
    lands on ``output_device`` (default: the latents' device); ``factor`` as
    in :func:`tiled_encode`.
    """
    _, decode_fn, device = _wan_callables(vae, scale)
    return tiled_decode_with(decode_fn, latents, factor=factor,
                             tile_latent=tile_latent, overlap_latent=overlap_latent,
                             device=device, output_device=output_device)


# ---- When to tile --------------------------------------------------------
# Peak allocated bytes of upstream's bf16 WanVAE_ on the H200 with random
# weights (shared/baseline/README.md and bench_phases.py, 2026-11-28). Each
# peak counts everything allocated then: the 0.25 GiB of weights, the phase's
# input, and in the later encode phases the first phase's 81-frame clip.
_GIB = 1 << 30
_REF_PIXELS = 512 * 896
_WEIGHTS = 0.25 * _GIB
_ENCODE_81 = 6.79 * _GIB          # ref + zeros clip, 81 frames at 512x896
_ENCODE_81_QUARTER = 2.10 * _GIB  # pose clip, 81 frames at 256x448
_ENCODE_1 = 2.52 * _GIB           # the ref frame alone at 512x896
_DECODE_81 = 8.41 * _GIB          # 21 latent frames -> 81 frames at 512x896
# Bytes per pixel-frame of a bf16 RGB clip: the input held during encode,
# the output being concatenated chunk by chunk during decode.
_CLIP_BYTES = 6
# Bytes per pixel-frame of the float32 RGB video a decode returns.
_ASSEMBLED_BYTES = 12
_CLIP_81 = _CLIP_BYTES * 81 * _REF_PIXELS

# The VAE walks the clip in chunks of at most four frames, so its activations
# scale with the frame area, not the clip length. Model: weights + a fixed
# part + per-pixel chunk activations + the clips held. The two 81-frame
# encodes give the fixed and per-pixel parts, the decode its own per-pixel
# part, the one-frame encode the first (one-frame) chunk's.
_ENC_ACT_FULL = _ENCODE_81 - _WEIGHTS - _CLIP_81
_ENC_ACT_QUARTER = _ENCODE_81_QUARTER - _WEIGHTS - _CLIP_81 - _CLIP_81 / 4
_ENC_PER_PIXEL = (_ENC_ACT_FULL - _ENC_ACT_QUARTER) / (0.75 * _REF_PIXELS)
_FIXED = _ENC_ACT_FULL - _ENC_PER_PIXEL * _REF_PIXELS
_ENC_ONE_FRAME_PER_PIXEL = (_ENCODE_1 - _WEIGHTS - _CLIP_81 - _FIXED) / _REF_PIXELS
_DEC_PER_PIXEL = (_DECODE_81 - _WEIGHTS - _FIXED - _CLIP_81) / _REF_PIXELS

_OPS = ("encode", "decode")


def _check_sizes(op: str, frames: int, height: int, width: int) -> None:
    if op not in _OPS:
        raise ValueError(f"op must be 'encode' or 'decode', got {op!r}")
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def estimate_peak_bytes(op: str, frames: int, height: int, width: int,
                        tile_px: Pair | None = None) -> int:
    """Estimated peak GPU bytes of a bf16 Wan VAE ``op`` with its weights.

    ``frames``, ``height``, ``width`` describe the video in pixels (decode:
    the output video, 4 * latent_frames - 3 frames). ``tile_px`` (pixels)
    estimates a tiled run whose input and output stay on the GPU; None, or a
    tile covering the frame, means untiled. Fitted to upstream's measured
    peaks (exact at the measured sizes); the caller keeps its own headroom.
    """
    _check_sizes(op, frames, height, width)
    area = height * width
    clip = frames * area
    tiled = False
    if tile_px is not None:
        tile_h, tile_w = _pair(tile_px, "tile_px")
        if tile_h < 1 or tile_w < 1:
            raise ValueError(f"tile_px must be positive, got {tile_px!r}")
        tiled = tile_h < height or tile_w < width
        tile_area = min(tile_h, height) * min(tile_w, width)
    else:
        tile_area = area
    if op == "encode":
        per_pixel = _ENC_ONE_FRAME_PER_PIXEL if frames == 1 else _ENC_PER_PIXEL
        # A tiled run also holds its contiguous copy of the tile's clip.
        tile_copy = _CLIP_BYTES * frames * tile_area if tiled else 0
        peak = _WEIGHTS + _FIXED + per_pixel * tile_area + _CLIP_BYTES * clip + tile_copy
    elif not tiled:
        # After the last chunk upstream converts the bf16 video to float32.
        peak = _WEIGHTS + max(_FIXED + _DEC_PER_PIXEL * area + _CLIP_BYTES * clip,
                              (_CLIP_BYTES + _ASSEMBLED_BYTES) * clip)
    else:
        tile_clip = frames * tile_area
        peak = _WEIGHTS + _ASSEMBLED_BYTES * clip + max(
            _FIXED + _DEC_PER_PIXEL * tile_area + _CLIP_BYTES * tile_clip,
            (_CLIP_BYTES + _ASSEMBLED_BYTES) * tile_clip)
    return int(math.ceil(peak))


def needs_tiling(frames: int, height: int, width: int, budget_bytes: int,
                 op: str = "decode") -> bool:
    """True when an untiled ``op`` is estimated to peak above ``budget_bytes``."""
    return estimate_peak_bytes(op, frames, height, width) > budget_bytes


def _tile_for(size: int, count: int, overlap: int, factor: int) -> int | None:
    """Smallest ``factor``-aligned tile that covers ``size`` with ``count`` tiles."""
    if count == 1:
        return -(-size // factor) * factor
    need = -(-(size + (count - 1) * overlap) // count)
    tile = -(-need // factor) * factor
    return tile if overlap < tile < size else None


def pick_tile_px(frames: int, height: int, width: int, budget_bytes: int, op: str = "decode",
                 overlap_px: int = DEFAULT_OVERLAP_PX[0], factor: int = WAN_SPATIAL_FACTOR
                 ) -> tuple[int, int] | None:
    """Tile size in pixels for ``op`` within ``budget_bytes``; None if untiled fits.

    Among tilings estimated to fit, picks the one computing the least area
    (overlaps are computed twice), then the fewest tiles. Both sides are
    multiples of ``factor`` (the VAE's spatial stride); for decode pass
    ``(h // factor, w // factor)`` as ``tile_latent`` and ``overlap_px //
    factor`` as ``overlap_latent``. Raises UserError when even the smallest
    tile does not fit.
    """
    _check_sizes(op, frames, height, width)
    if overlap_px < 0 or overlap_px % factor:
        raise ValueError(f"overlap_px must be a non-negative multiple of {factor}, got {overlap_px}")
    if not needs_tiling(frames, height, width, budget_bytes, op):
        return None
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for rows in range(1, -(-height // factor) + 1):
        tile_h = _tile_for(height, rows, overlap_px, factor)
        if tile_h is None:
            continue
        for cols in range(1, -(-width // factor) + 1):
            tile_w = _tile_for(width, cols, overlap_px, factor)
            if tile_w is None or (rows == 1 and cols == 1):
                continue
            if estimate_peak_bytes(op, frames, height, width, (tile_h, tile_w)) <= budget_bytes:
                # More columns only shrink the tile and add overlap work.
                cost = (rows * tile_h * cols * tile_w, rows * cols)
                if best is None or cost < best[0]:
                    best = (cost, (tile_h, tile_w))
                break
    if best is None:
        floor = estimate_peak_bytes(op, frames, height, width,
                                    (overlap_px + factor, overlap_px + factor))
        raise UserError(f"VAE {op} of {frames} frames at {height}x{width} needs about "
                        f"{floor / _GIB:.2f} GiB even in the smallest tiles, more than the "
                        f"{budget_bytes / _GIB:.2f} GiB available; lower the resolution or "
                        f"the frame count, or free GPU memory")
    return best[1]
