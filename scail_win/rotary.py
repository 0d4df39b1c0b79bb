"""Drop-in for ``sat.model.position_embedding.triton_rotary``.

sat's module imports Triton at the top, so ``import sat`` fails where Triton
is missing (Windows).  This module keeps its one public name, ``apply_rotary``,
with the same signature and meaning, and runs it either with PyTorch (CPU and
CUDA) or with our Triton kernel (``rotary_triton``, imported only when it can
run).  It also owns the backend choice for every rotary kernel in scail-win
(``select_backend``), which ``rope3d`` shares.

Layout (as upstream): x is (batch, nheads, seqlen, headdim); cos and sin are
(seqlen_ro, rotary_dim / 2); token ``s`` of sequence ``b`` uses table row
``position_ids[b, s] + seqlen_offsets[b]``.  Rows outside ``[0, seqlen_ro)``
leave the token unrotated, as upstream's masked table loads do.  Both paths
compute in float32 and round once to x's dtype.
"""
from typing import Optional, Union

import torch

from scail_win.model.kernels.kernel_backend import KernelBackend

BACKEND = KernelBackend("SCAIL_WIN_ROTARY", "scail_win.model.kernels.rotary_triton", "rotary embeddings")
BACKEND_ENV = BACKEND.env

# Largest head dim the Triton kernels take (upstream's limit too); larger
# heads run on the PyTorch path.
TRITON_MAX_HEADDIM = 256

# Elements of x per PyTorch-path step: bounds the float32 temporaries (a few
# times 64 MiB) without paying a kernel launch per head.
TORCH_CHUNK_ELEMENTS = 1 << 24


def select_backend(x: torch.Tensor, *, headdim: int) -> str:
    """Pick "torch" or "triton" for one call on ``x`` (see kernel_backend.KernelBackend.select).

    Beyond the common conditions, the head dim must fit the kernels.
    ``SCAIL_WIN_ROTARY=triton`` turns any condition failing into an error
    instead of a fallback.
    """
    problem = f"head dim {headdim} is above {TRITON_MAX_HEADDIM}" if headdim > TRITON_MAX_HEADDIM else None
    return BACKEND.select(x, problem)


def triton_kernels():
    """The ``rotary_triton`` module; only call after select_backend chose "triton"."""
    return BACKEND.kernels()


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[Union[int, torch.Tensor]] = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of every head of x.

    Arguments:
        x: (batch, nheads, seqlen, headdim).
        cos, sin: (seqlen_ro, rotary_dim / 2), same dtype as x.
        position_ids: (batch, seqlen) integer table rows.
        seqlen_offsets: int, or integer tensor (batch,), added to the rows.
        cu_seqlens: must be None (upstream accepts it but never uses it).
        max_seqlen: bound on the rows used (int or 0-d tensor); required.
        interleaved: rotate pairs (0, 1), (2, 3), ... instead of the halves
            (i, i + rotary_dim / 2).
        inplace: write into x and return it.
        conjugate: rotate by the negative angle (the backward of a rotation).
    Returns:
        (batch, nheads, seqlen, headdim); channels past rotary_dim are copied.
    """
    _check_args(x, cos, sin, position_ids, seqlen_offsets, cu_seqlens, max_seqlen)
    rotary_dim = 2 * cos.shape[1]
    headdim = x.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    if isinstance(seqlen_offsets, torch.Tensor):
        seqlen_offsets = seqlen_offsets.contiguous()

    out = x if inplace else torch.empty_like(x)
    if rotary_dim < headdim and not inplace:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    if select_backend(x, headdim=headdim) == "triton":
        triton_kernels().rotary(
            x, out, cos, sin, position_ids, seqlen_offsets, interleaved=interleaved, conjugate=conjugate
        )
    else:
        _rotary_torch(x, out, cos, sin, position_ids, seqlen_offsets, interleaved, conjugate)
    return out


def _check_args(x, cos, sin, position_ids, seqlen_offsets, cu_seqlens, max_seqlen):
    """Upstream's asserts, as ValueError (shapes, bounds) and TypeError (types)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, cos, sin, position_ids)):
        raise TypeError("apply_rotary: x, cos, sin and position_ids must be tensors")
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be (batch, nheads, seqlen, headdim), got shape {tuple(x.shape)}")
    if cu_seqlens is not None:
        raise ValueError("apply_rotary: cu_seqlens (variable-length batches) is not supported; pass a 4-D x")
    if cos.dim() != 2:
        raise ValueError(f"apply_rotary: cos must be (seqlen_ro, rotary_dim / 2), got shape {tuple(cos.shape)}")
    batch, _, seqlen, headdim = x.shape
    seqlen_ro, rotary_dim = cos.shape[0], 2 * cos.shape[1]
    if tuple(position_ids.shape) != (batch, seqlen):
        raise ValueError(
            f"apply_rotary: position_ids must be (batch, seqlen) = {(batch, seqlen)}, got {tuple(position_ids.shape)}"
        )
    if sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: sin shape {tuple(sin.shape)} differs from cos shape {tuple(cos.shape)}")
    if rotary_dim > headdim:
        raise ValueError(f"apply_rotary: rotary_dim {rotary_dim} must be <= headdim {headdim}")
    if max_seqlen is None:
        raise TypeError("apply_rotary: max_seqlen is required (the largest table row used, plus one)")
    max_seqlen = int(max_seqlen)
    if seqlen_ro < max_seqlen:
        raise ValueError(f"apply_rotary: seqlen_ro {seqlen_ro} must be >= max_seqlen {max_seqlen}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"apply_rotary: cos and sin must have the same dtype, got {cos.dtype} and {sin.dtype}")
    if x.dtype != cos.dtype:
        raise TypeError(f"apply_rotary: input and cos/sin must have the same dtype, got {x.dtype} and {cos.dtype}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"apply_rotary: position_ids must be int32 or int64, got {position_ids.dtype}")
    if isinstance(seqlen_offsets, torch.Tensor):
        if tuple(seqlen_offsets.shape) != (batch,):
            raise ValueError(
                f"apply_rotary: seqlen_offsets must have shape ({batch},), got {tuple(seqlen_offsets.shape)}"
            )
        if seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"apply_rotary: seqlen_offsets must be int32 or int64, got {seqlen_offsets.dtype}")
    elif isinstance(seqlen_offsets, int):
        if seqlen_offsets + max_seqlen > seqlen_ro:
            raise ValueError(
                f"apply_rotary: seqlen_offsets {seqlen_offsets} + max_seqlen {max_seqlen} exceeds seqlen_ro {seqlen_ro}"
            )
    else:
        raise TypeError(f"apply_rotary: seqlen_offsets must be an int or a tensor, got {type(seqlen_offsets).__name__}")
    tensors = [x, cos, sin, position_ids] + ([seqlen_offsets] if isinstance(seqlen_offsets, torch.Tensor) else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("apply_rotary: x, cos, sin, position_ids and seqlen_offsets must be on one device")


def _rotary_torch(x, out, cos, sin, position_ids, seqlen_offsets, interleaved, conjugate):
    """PyTorch path: gather the rows, rotate in float32, a chunk of tokens at a time."""
    seqlen_ro, half = cos.shape
    rows = position_ids.long()
    rows = rows + (seqlen_offsets.long()[:, None] if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets)
    in_table = (rows >= 0) & (rows < seqlen_ro)
    rows = rows.clamp(0, seqlen_ro - 1)

    batch, nheads, seqlen, _ = x.shape
    step = max(1, TORCH_CHUNK_ELEMENTS // max(1, batch * nheads * 2 * half))
    for start in range(0, seqlen, step):
        stop = min(seqlen, start + step)
        r, ok = rows[:, start:stop], in_table[:, start:stop, None]
        # (batch, 1, tokens, half): one angle per pair, shared by all heads.
        c = torch.where(ok, cos[r].float(), 1.0)[:, None]
        s = torch.where(ok, sin[r].float(), 0.0)[:, None]
        if conjugate:
            s = -s
        x0, x1 = _pair_views(x[:, :, start:stop], half, interleaved)
        o0, o1 = _pair_views(out[:, :, start:stop], half, interleaved)
        rotate_pairs_fp32(x0, x1, c, s, o0, o1)


def rotate_pairs_fp32(x0, x1, c, s, o0, o1):
    """(o0, o1) = (x0 c - x1 s, x0 s + x1 c) in float32, rounded once to out's dtype.

    c and s are float32, so each product promotes x exactly without a cast
    copy.  Both results exist before either is written: o may alias x.
    """
    r0 = (x0 * c).addcmul_(x1, s, value=-1.0)
    r1 = (x0 * s).addcmul_(x1, c)
    o0.copy_(r0)
    o1.copy_(r1)


def _pair_views(t: torch.Tensor, half: int, interleaved: bool):
    """Views of the two members of each rotated pair of the last dim of t."""
    if interleaved:
        pairs = t[..., : 2 * half].unflatten(-1, (half, 2))
        return pairs[..., 0], pairs[..., 1]
    return t[..., :half], t[..., half : 2 * half]
