"""Fused 3D rotary embedding for the SCAIL DiT (replaces upstream's
``Rotary3DPositionEmbeddingMixin``).

Upstream rotates the three segments of q and k separately and concatenates
them: reference tokens (one frame at t = 0), video tokens (frames t = 1..T)
and pose tokens (frames t = 1..T at a spatial offset, with cos/sin averaged
over 2x2 windows because the pose grid has half the resolution).  It keeps
two float32 (T, H, W + 120, head_dim) tables per cos/sin, built with
``.cuda()`` at construction (870 MB for the 14B config).

Here one pass per tensor rotates all three segments (a Triton kernel on CUDA,
chunked PyTorch elsewhere), reading the angles from small per-axis tables:
every channel pair ("slot") of a head belongs to exactly one axis, so its
angle depends on the token's t, h or w coordinate alone -- and so does the
2x2 mean of the pose tables, whose other two coordinates are constant.

Two rounding modes:

* ``exact``: upstream's arithmetic -- float32 angles and cos/sin evaluated on
  the CPU, pose means by ``avg_pool2d`` on the input's device, tables rounded
  to the input dtype, each product and the sum rounded to it -- so the result
  is bitwise equal to upstream's mixin.
* ``fp32`` (default): the same frequencies, angles, cos/sin and means in
  float64 stored as float32, the rotation in float32, one rounding to the
  input dtype.

The mixin class needs sat (its base class), so it is built on first access
of ``scail_win.model.kernels.rope3d.Rotary3DPositionEmbeddingMixin``, the name to put as
``pos_embed_config.target`` in the model config, with ``rope_mode`` (and
optionally ``rope_inplace``) among its params.  This module imports no SCAIL
code.
"""
import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scail_win import rotary

MODES = ("fp32", "exact")

# Upstream's width table has 120 columns beyond the latent width so that the
# pose tokens (placed at global_rope_W = 120) stay inside it.
_WIDTH_MARGIN = 120
_CACHED_TABLES = 8


@dataclass(frozen=True)
class Rope3DLayout:
    """Where the tokens of one forward sit (the DiT's rope_* kwargs).

    The sequence is ref_length reference tokens (one H x W frame), then
    seq_length video tokens (T x H x W), then pose_length pose tokens
    (T x H/2 x W/2, rounded down).
    """

    frames: int
    height: int
    width: int
    ref_length: int
    seq_length: int
    pose_length: int
    h_shift: int = 0
    w_shift: int = 0
    pose_h: int = 0  # upstream's global_rope_H
    pose_w: int = 120  # upstream's global_rope_W

    @classmethod
    def from_kwargs(cls, kwargs) -> "Rope3DLayout":
        """Read the layout from the kwargs the DiT passes to attention_fn."""
        names = {
            "frames": "rope_T", "height": "rope_H", "width": "rope_W",
            "ref_length": "ref_length", "seq_length": "seq_length", "pose_length": "pose_length",
            "h_shift": "rope_H_shift", "w_shift": "rope_W_shift",
            "pose_h": "global_rope_H", "pose_w": "global_rope_W",
        }
        missing = [key for key in names.values() if key not in kwargs]
        if missing:
            raise ValueError(f"3D RoPE: attention kwargs lack {', '.join(missing)}")
        return cls(**{field: int(kwargs[key]) for field, key in names.items()})

    @property
    def total(self) -> int:
        return self.ref_length + self.seq_length + self.pose_length


class Rope3D:
    """SCAIL's 3D RoPE for one head size and table extent.

    head_dim, height, width, frames, theta, interleaved: as upstream's mixin
    (height/width in patches, frames = compressed_num_frames).  Tables are
    built per device, dtype (exact mode) and layout on first use and cached.
    """

    def __init__(self, head_dim: int, *, height: int, width: int, frames: int,
                 theta: float = 10000, interleaved: bool = False, mode: str = "fp32"):
        if mode not in MODES:
            raise ValueError(f"3D RoPE mode must be one of {', '.join(MODES)}, got {mode!r}")
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"3D RoPE needs an even head dim, got {head_dim}")
        self.head_dim, self.height, self.width, self.frames = head_dim, height, width, frames
        self.interleaved, self.mode = interleaved, mode
        dim_hw = 2 * (head_dim // 6)
        dim_t = head_dim - 2 * dim_hw
        # Upstream's float32 frequencies, bit for bit (same ops, on the CPU).
        self.freqs = tuple(
            1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)) for dim in (dim_t, dim_hw, dim_hw)
        )
        self._tables = OrderedDict()

    def __call__(self, x: torch.Tensor, layout: Rope3DLayout, *, inplace: bool = False) -> torch.Tensor:
        """Rotate x (batch, heads, tokens, head_dim); a new tensor unless inplace."""
        self._check(x, layout)
        entry = self._entry(x, layout)
        out = x if inplace else torch.empty_like(x)
        exact = self.mode == "exact"
        if rotary.select_backend(x, headdim=self.head_dim) == "triton":
            rotary.triton_kernels().rope3d(x, out, entry["table"], entry["rows"], interleaved=self.interleaved,
                                           exact=exact)
        else:
            if entry["per_token"] is None:
                entry["per_token"] = _per_token(entry["table"], entry["rows"], layout.total,
                                                x.dtype if exact else None)
            _rope3d_torch(x, out, entry["per_token"], self.interleaved, exact)
        return out

    def _check(self, x, layout):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("3D RoPE: the input must be a floating-point tensor")
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"3D RoPE: expected (batch, heads, tokens, {self.head_dim}), got {tuple(x.shape)}")
        lay = layout
        if min(lay.frames, lay.height // 2, lay.width // 2) < 1:
            raise ValueError(f"3D RoPE: need at least 1 frame and a 2x2 patch grid, got {lay}")
        if min(lay.h_shift, lay.w_shift, lay.pose_h, lay.pose_w) < 0:
            raise ValueError(f"3D RoPE: shifts and pose origin must be >= 0, got {lay}")
        plane = lay.height * lay.width
        expected = (plane, lay.frames * plane, lay.frames * (lay.height // 2) * (lay.width // 2))
        if (lay.ref_length, lay.seq_length, lay.pose_length) != expected:
            raise ValueError(
                f"3D RoPE: ref/video/pose lengths {lay.ref_length}/{lay.seq_length}/{lay.pose_length} do not "
                f"match a {lay.frames}x{lay.height}x{lay.width} grid ({expected[0]}/{expected[1]}/{expected[2]})"
            )
        if x.shape[2] != lay.total:
            raise ValueError(f"3D RoPE: {x.shape[2]} tokens, but ref + video + pose = {lay.total}")
        # The extents of upstream's tables, which it would overrun.
        if (lay.frames > self.frames
                or max(lay.h_shift, lay.pose_h + lay.h_shift) + lay.height > self.height
                or lay.w_shift + lay.width > self.width
                or lay.pose_w + lay.w_shift + lay.width > self.width + _WIDTH_MARGIN):
            raise ValueError(
                f"3D RoPE: a {lay.frames}x{lay.height}x{lay.width} patch grid (shifts {lay.h_shift},{lay.w_shift}, "
                f"pose at {lay.pose_h},{lay.pose_w}) exceeds the tables for {self.frames}x{self.height}x{self.width}; "
                "lower the resolution or frame count, or raise num_frames/latent_height/latent_width in the model config"
            )

    def tables(self, x: torch.Tensor, layout: Rope3DLayout):
        """(table, rows) the kernel reads for x and layout, built and cached on first use.

        table: float32 (2, R, head_dim/2), cos then sin; rows: row offsets and
        grid sizes (see _build_table).  For callers that launch the kernel
        themselves: tests, benchmarks.
        """
        entry = self._entry(x, layout)
        return entry["table"], entry["rows"]

    def _entry(self, x, layout):
        """The cached tables for x's device (and dtype, in exact mode) and layout."""
        dtype = x.dtype if self.mode == "exact" else None
        key = (x.device, dtype, layout)
        entry = self._tables.get(key)
        if entry is None:
            table, rows = self._build_table(x.device, dtype, layout)
            rows["pose_start"] = layout.ref_length + layout.seq_length
            # per_token: the PyTorch path's (2, tokens, head_dim/2) gather of
            # the table, built on its first use (the kernel indexes the table).
            entry = {"table": table, "rows": rows, "per_token": None}
            self._tables[key] = entry
            if len(self._tables) > _CACHED_TABLES:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return entry

    def _build_table(self, device, dtype, lay):
        """cos/sin of every axis coordinate the layout uses, as (2, rows, head_dim/2).

        Rows, in order: t = 0..T (reference, video frames), pooled t of the
        pose frames, h of the grid, pooled h of the pose grid, then w, pooled
        w.  A row fills only its axis's slots; the others stay zero.
        """
        exact = dtype is not None
        wide = torch.float32 if exact else torch.float64
        ft, fh, fw = (f.to(wide) for f in self.freqs)
        hp, wp = lay.height // 2, lay.width // 2

        def cos_sin(freqs, first, count):
            # Upstream: float32 coordinate grid * freq, cos/sin on the CPU.
            angles = torch.arange(first, first + count, dtype=wide)[:, None] * freqs[None, :]
            return torch.stack((angles.cos(), angles.sin())).to(device)

        t_rows = cos_sin(ft, 0, lay.frames + 1)
        h_rows = cos_sin(fh, lay.h_shift, lay.height)
        w_rows = cos_sin(fw, lay.w_shift, lay.width)
        pose_t, pose_h, pose_w = _pooled(
            t_rows[:, 1:],
            cos_sin(fh, lay.pose_h + lay.h_shift, 2 * hp),
            cos_sin(fw, lay.pose_w + lay.w_shift, 2 * wp),
        )

        nt, nh = len(ft), len(fh)
        slots = ((0, nt), (nt, nt + nh), (nt + nh, self.head_dim // 2))
        blocks = [(t_rows, 0), (pose_t, 0), (h_rows, 1), (pose_h, 1), (w_rows, 2), (pose_w, 2)]
        table = torch.zeros(2, sum(b.shape[1] for b, _ in blocks), self.head_dim // 2, dtype=torch.float32,
                            device=device)
        starts = []
        row = 0
        for values, axis in blocks:
            if exact:
                values = values.to(dtype)  # upstream casts the tables to the input dtype
            lo, hi = slots[axis]
            table[:, row: row + values.shape[1], lo:hi] = values.to(torch.float32)
            starts.append(row)
            row += values.shape[1]
        rows = {
            "t_pose": starts[1], "h": starts[2], "h_pose": starts[3], "w": starts[4], "w_pose": starts[5],
            "grid_w": lay.width, "grid_hw": lay.height * lay.width, "pose_w": wp, "pose_hw": hp * wp,
            "slots_t": nt, "slots_h": nh,
        }
        return table, rows


def _pooled(t_vals, h_vals, w_vals):
    """Per-axis 2x2 means of the pose window, by upstream's own avg_pool2d.

    Builds the (T, 2Hp, 2Wp, slots) cos/sin grid exactly as upstream lays it
    out (channels last) and pools it, so the summation order is the pooling
    kernel's; then reads each axis's slots back at the other axes' origin.
    """
    frames, rows_h, rows_w = t_vals.shape[1], h_vals.shape[1], w_vals.shape[1]
    nt, nh = t_vals.shape[2], h_vals.shape[2]
    out = []
    for i in range(2):  # cos, then sin
        grid = torch.cat(
            (
                t_vals[i][:, None, None, :].expand(frames, rows_h, rows_w, -1),
                h_vals[i][None, :, None, :].expand(frames, rows_h, rows_w, -1),
                w_vals[i][None, None, :, :].expand(frames, rows_h, rows_w, -1),
            ),
            dim=-1,
        )
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)
        out.append((pooled[:, 0, 0, :nt], pooled[0, :, 0, nt: nt + nh], pooled[0, 0, :, nt + nh:]))
    return tuple(torch.stack((c, s)) for c, s in zip(*out))


def _token_rows(tok, rows):
    """Table rows (t, h, w) of each token index in tok; the kernel's arithmetic."""
    is_pose = tok >= rows["pose_start"]
    p = torch.where(is_pose, tok - rows["pose_start"], tok)
    plane = torch.where(is_pose, rows["pose_hw"], rows["grid_hw"])
    width = torch.where(is_pose, rows["pose_w"], rows["grid_w"])
    frame = p // plane
    rem = p - frame * plane
    hh = rem // width
    ww = rem - hh * width
    rt = torch.where(is_pose, rows["t_pose"] + frame, frame)
    rh = torch.where(is_pose, rows["h_pose"], rows["h"]) + hh
    rw = torch.where(is_pose, rows["w_pose"], rows["w"]) + ww
    return rt, rh, rw


def _per_token(table, rows, tokens, dtype):
    """cos/sin of every token and slot, (2, tokens, head_dim/2); in dtype if given (exact mode)."""
    device = table.device
    slot = torch.arange(table.shape[2], device=device)
    rt, rh, rw = _token_rows(torch.arange(tokens, device=device), rows)
    row = torch.where(slot < rows["slots_t"], rt[:, None],
                      torch.where(slot < rows["slots_t"] + rows["slots_h"], rh[:, None], rw[:, None]))
    per_token = table[:, row, slot]
    return per_token if dtype is None else per_token.to(dtype)


def _rope3d_torch(x, out, per_token, interleaved, exact):
    """PyTorch path: the kernel's math a chunk of tokens at a time."""
    batch, heads, tokens, head_dim = x.shape
    half = head_dim // 2
    step = max(1, rotary.TORCH_CHUNK_ELEMENTS // max(1, batch * heads * head_dim))
    for start in range(0, tokens, step):
        stop = min(tokens, start + step)
        c, s = per_token[0, start:stop], per_token[1, start:stop]
        x0, x1 = rotary._pair_views(x[:, :, start:stop], half, interleaved)
        o0, o1 = rotary._pair_views(out[:, :, start:stop], half, interleaved)
        if exact:
            # In the input dtype, op by op, as upstream: x*cos + rotate_half(x)*sin.
            r0 = x0 * c - x1 * s
            r1 = x1 * c + x0 * s
            o0.copy_(r0)
            o1.copy_(r1)
        else:
            rotary.rotate_pairs_fp32(x0, x1, c, s, o0, o1)


@functools.lru_cache(maxsize=1)
def _mixin_class():
    """Build the mixin on sat's BaseMixin (sat imported only now)."""
    from sat.model.base_model import BaseMixin, non_conflict
    from sat.transformer_defaults import attention_fn_default

    class Rotary3DPositionEmbeddingMixin(BaseMixin):
        """Upstream's constructor and hooks, with the fused rotation.

        Holds no parameters or buffers (upstream's tables are plain
        attributes, never in the state dict either).  rope_mode: "fp32" or
        "exact"; rope_inplace: rotate q and k (and v) in their own storage,
        which the DiT never reads again -- saves two activations of memory.
        """

        def __init__(self, height, width, compressed_num_frames, hidden_size, hidden_size_head,
                     theta=10000, rot_v=False, pnp=False, height_interpolation=1.0, width_interpolation=1.0,
                     time_interpolation=1.0, learnable_pos_embed=False, patch_size=None, interleaved_rope=False,
                     rope_mode="fp32", rope_inplace=False):
            super().__init__()
            if pnp:
                # Upstream's pnp branch reads self.freqs, which it never sets.
                raise ValueError("3D RoPE: pnp=True is not supported (it does not run upstream either)")
            self.rot_v = rot_v
            self.pnp = pnp
            self.interleaved_rope = interleaved_rope
            self.rope_inplace = rope_inplace
            self.rope = Rope3D(hidden_size_head, height=height, width=width, frames=compressed_num_frames,
                               theta=theta, interleaved=interleaved_rope, mode=rope_mode)

        def reinit(self, parent_model=None):
            # As upstream: the transformer's learned position table is unused.
            del self.transformer.position_embeddings

        def position_embedding_forward(self, position_ids, **kwargs):
            return None

        @non_conflict
        def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                         log_attention_weights=None, scaling_attention_score=True,
                         old_impl=attention_fn_default, **kwargs):
            if not kwargs.get("cross_attention", False):  # self-attention only, as upstream
                layout = Rope3DLayout.from_kwargs(kwargs)
                query_layer = self.rope(query_layer, layout, inplace=self.rope_inplace)
                key_layer = self.rope(key_layer, layout, inplace=self.rope_inplace)
                if self.rot_v:
                    value_layer = self.rope(value_layer, layout, inplace=self.rope_inplace)
            return old_impl(query_layer, key_layer, value_layer, attention_mask,
                            attention_dropout=attention_dropout, log_attention_weights=log_attention_weights,
                            scaling_attention_score=scaling_attention_score, **kwargs)

    Rotary3DPositionEmbeddingMixin.__module__ = __name__
    Rotary3DPositionEmbeddingMixin.__qualname__ = "Rotary3DPositionEmbeddingMixin"
    return Rotary3DPositionEmbeddingMixin


def __getattr__(name):
    if name == "Rotary3DPositionEmbeddingMixin":
        return _mixin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
