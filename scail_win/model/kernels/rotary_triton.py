"""Triton kernels for rotary embeddings; imported only where Triton can run.

Two kernels, one program per (block of tokens, group of heads, batch item):
the angles of a token block are gathered once into registers and reused for
every head of the group, so each element of x is read once and written once.

* ``rotary``: sat's apply_rotary (position-indexed cos/sin tables).
* ``rope3d``: SCAIL's 3D RoPE, whose angles come from per-axis tables
  (see rope3d.py for the table layout and the two rounding modes).

Callers validate arguments (rotary.py, rope3d.py); these wrappers only launch.
"""
import contextlib

import triton
import triton.language as tl

if not (hasattr(tl, "split") and hasattr(tl, "join")):
    raise ImportError(f"Triton {triton.__version__} lacks tl.split/tl.join; Triton >= 3.0 is needed")

# (tokens per program, heads per program, warps): memory-bound kernels, sized
# so a program moves tens of KiB; benchmarks/bench_rope3d.py --sweep retunes.
ROTARY_CONFIG = (32, 4, 4)
ROPE3D_CONFIG = (32, 8, 4)


def _on_device(x):
    """Launch on x's GPU, not the current one (CPU tensors: TRITON_INTERPRET=1)."""
    import torch

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@triton.jit
def _rotate_store(x_ptrs, out_ptrs, sxd, sod, c, s, mask_pairs, mask_full,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
                  INTERLEAVED: tl.constexpr, EXACT: tl.constexpr):
    """Rotate one [BLOCK_S, 2*HALF] tile of pairs by angles (c, s) and store it."""
    out_ty = out_ptrs.dtype.element_ty
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_HALF)
        xx = tl.load(x_ptrs + cols[None, :] * sxd, mask=mask_full, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(xx, (BLOCK_S, BLOCK_HALF, 2)))
    else:
        cols = tl.arange(0, BLOCK_HALF)
        x0 = tl.load(x_ptrs + cols[None, :] * sxd, mask=mask_pairs, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptrs + (cols[None, :] + HALF) * sxd, mask=mask_pairs, other=0.0).to(tl.float32)
    if EXACT:
        # Upstream's rounding: each product rounded to the output dtype, then
        # their sum (x*cos + rotate_half(x)*sin evaluated in that dtype).
        o0 = ((x0 * c).to(out_ty).to(tl.float32) - (x1 * s).to(out_ty).to(tl.float32)).to(out_ty)
        o1 = ((x1 * c).to(out_ty).to(tl.float32) + (x0 * s).to(out_ty).to(tl.float32)).to(out_ty)
    else:
        o0 = (x0 * c - x1 * s).to(out_ty)
        o1 = (x0 * s + x1 * c).to(out_ty)
    if INTERLEAVED:
        oo = tl.reshape(tl.join(o0, o1), (BLOCK_S, 2 * BLOCK_HALF))
        tl.store(out_ptrs + cols[None, :] * sod, oo, mask=mask_full)
    else:
        tl.store(out_ptrs + cols[None, :] * sod, o0, mask=mask_pairs)
        tl.store(out_ptrs + (cols[None, :] + HALF) * sod, o1, mask=mask_pairs)


@triton.jit
def _rotary_kernel(X, OUT, COS, SIN, POS, OFFSETS,
                   seqlen, nheads, seqlen_ro, offset,
                   sxb, sxh, sxs, sxd, sob, soh, sos, sod, spb, sps,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
                   HEADS: tl.constexpr, OFFSETS_TENSOR: tl.constexpr,
                   INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    tok = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_ok = tok < seqlen
    tok = tok.to(tl.int64)

    row = tl.load(POS + b * spb + tok * sps, mask=tok_ok, other=0).to(tl.int64)
    if OFFSETS_TENSOR:
        row += tl.load(OFFSETS + b).to(tl.int64)
    else:
        row += offset
    # Rows outside the table leave the token unrotated (cos 1, sin 0).
    in_table = tok_ok & (row >= 0) & (row < seqlen_ro)
    k = tl.arange(0, BLOCK_HALF)
    k_ok = k < HALF
    tab_mask = in_table[:, None] & k_ok[None, :]
    c = tl.load(COS + row[:, None] * HALF + k[None, :], mask=tab_mask, other=1.0).to(tl.float32)
    s = tl.load(SIN + row[:, None] * HALF + k[None, :], mask=tab_mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        s = -s

    mask_pairs = tok_ok[:, None] & k_ok[None, :]
    mask_full = tok_ok[:, None] & (tl.arange(0, 2 * BLOCK_HALF) < 2 * HALF)[None, :]
    for i in range(HEADS):
        h = tl.program_id(1) * HEADS + i
        if h < nheads:
            h64 = h.to(tl.int64)
            x_ptrs = X + b * sxb + h64 * sxh + tok[:, None] * sxs
            out_ptrs = OUT + b * sob + h64 * soh + tok[:, None] * sos
            _rotate_store(x_ptrs, out_ptrs, sxd, sod, c, s, mask_pairs, mask_full,
                          HALF, BLOCK_HALF, BLOCK_S, INTERLEAVED, False)


def rotary(x, out, cos, sin, position_ids, seqlen_offsets, *, interleaved, conjugate, config=None):
    """Launch sat's rotary on validated CUDA tensors (see rotary.apply_rotary)."""
    import torch

    batch, nheads, seqlen, _ = x.shape
    if batch * nheads * seqlen == 0:
        return
    block_s, heads, warps = config or ROTARY_CONFIG
    half = cos.shape[1]
    offsets_tensor = isinstance(seqlen_offsets, torch.Tensor)
    grid = (triton.cdiv(seqlen, block_s), triton.cdiv(nheads, heads), batch)
    with _on_device(x):
        _rotary_kernel[grid](
            x, out, cos, sin, position_ids,
            seqlen_offsets if offsets_tensor else position_ids,  # unused pointer when offsets is an int
            seqlen, nheads, cos.shape[0], 0 if offsets_tensor else int(seqlen_offsets),
            *x.stride(), *out.stride(), *position_ids.stride(),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_S=block_s, HEADS=heads,
            OFFSETS_TENSOR=offsets_tensor, INTERLEAVED=interleaved, CONJUGATE=conjugate,
            num_warps=warps, enable_fp_fusion=True,
        )


@triton.jit
def _rope3d_kernel(X, OUT, TAB,
                   seqlen, nheads, tab_rows,
                   grid_w, grid_hw, pose_start, pose_w, pose_hw,
                   row_t_pose, row_h, row_h_pose, row_w, row_w_pose,
                   sxb, sxh, sxs, sxd, sob, soh, sos, sod,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, SLOTS_T: tl.constexpr,
                   SLOTS_TH: tl.constexpr, BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
                   INTERLEAVED: tl.constexpr, EXACT: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    tok = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_ok = tok < seqlen

    # Reference and video tokens are frames 0..T of one (T+1, H, W) grid;
    # pose tokens are frames of the pooled (T, H/2, W/2) grid after them.
    is_pose = tok >= pose_start
    p = tl.where(is_pose, tok - pose_start, tok)
    plane = tl.where(is_pose, pose_hw, grid_hw)
    width = tl.where(is_pose, pose_w, grid_w)
    frame = p // plane
    rem = p - frame * plane
    hh = rem // width
    ww = rem - hh * width
    rt = tl.where(is_pose, row_t_pose + frame, frame)
    rh = tl.where(is_pose, row_h_pose, row_h) + hh
    rw = tl.where(is_pose, row_w_pose, row_w) + ww

    # Slot k of the head takes its angle from the t, h or w table row.
    k = tl.arange(0, BLOCK_HALF)
    row = tl.where(k[None, :] < SLOTS_T, rt[:, None], tl.where(k[None, :] < SLOTS_TH, rh[:, None], rw[:, None]))
    tab_off = row.to(tl.int64) * HALF + k[None, :]
    k_ok = k < HALF
    tab_mask = tok_ok[:, None] & k_ok[None, :]
    c = tl.load(TAB + tab_off, mask=tab_mask, other=1.0)
    s = tl.load(TAB + tab_rows * HALF + tab_off, mask=tab_mask, other=0.0)

    tok = tok.to(tl.int64)
    mask_full = tok_ok[:, None] & (tl.arange(0, 2 * BLOCK_HALF) < 2 * HALF)[None, :]
    for i in range(HEADS):
        h = tl.program_id(1) * HEADS + i
        if h < nheads:
            h64 = h.to(tl.int64)
            x_ptrs = X + b * sxb + h64 * sxh + tok[:, None] * sxs
            out_ptrs = OUT + b * sob + h64 * soh + tok[:, None] * sos
            _rotate_store(x_ptrs, out_ptrs, sxd, sod, c, s, tab_mask, mask_full,
                          HALF, BLOCK_HALF, BLOCK_S, INTERLEAVED, EXACT)


def rope3d(x, out, table, rows, *, interleaved, exact, config=None):
    """Launch the 3D RoPE on validated CUDA tensors.

    table: float32 (2, R, head_dim / 2), cos then sin, rows as rope3d.py lays
    them out; rows: the dict of ints from rope3d's table builder.
    """
    batch, nheads, seqlen, headdim = x.shape
    if batch * nheads * seqlen == 0:
        return
    block_s, heads, warps = config or ROPE3D_CONFIG
    half = headdim // 2
    grid = (triton.cdiv(seqlen, block_s), triton.cdiv(nheads, heads), batch)
    with _on_device(x):
        _rope3d_kernel[grid](
            x, out, table,
            seqlen, nheads, table.shape[1],
            rows["grid_w"], rows["grid_hw"], rows["pose_start"], rows["pose_w"], rows["pose_hw"],
            rows["t_pose"], rows["h"], rows["h_pose"], rows["w"], rows["w_pose"],
            *x.stride(), *out.stride(),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), SLOTS_T=rows["slots_t"],
            SLOTS_TH=rows["slots_t"] + rows["slots_h"], BLOCK_S=block_s, HEADS=heads,
            INTERLEAVED=interleaved, EXACT=exact,
            num_warps=warps,
            # Exact mode must not contract x*cos + y*sin into an fma.
            enable_fp_fusion=not exact,
        )
