"""Triton kernels for the DiT layer's per-token operations; imported only where Triton can run.

One program per token row (a row is the feature vector of one token of one
sample): the row is read once into registers, reduced there and written
once, where PyTorch's composite ops make a float32 copy per step.  Every
kernel rounds where upstream's sequence of PyTorch ops rounds, so results
differ from them only by the order of the float32 sums over a row.

Callers validate arguments (layer_ops.py); these wrappers only launch.
"""
import triton
import triton.language as tl

from scail_win.model.kernels.rotary_triton import _on_device


def _row_launch(x):
    """(grid, BLOCK, warps): one program per row of a (batch, tokens, n) tensor; None when it is empty."""
    batch, tokens, n = x.shape
    if batch * tokens == 0:
        return None
    block = triton.next_power_of_2(n)
    # About 16 elements per thread: a 5120-wide row (8192 lanes) takes 16 warps.
    return (tokens, batch), block, max(1, min(16, block // 512))


@triton.jit
def _rms_norm_kernel(X, W, OUT, n, eps,
                     sxb, sxt, sob, sot,
                     HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + b * sxb + t * sxt + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    if HAS_WEIGHT:
        y = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) * y
    tl.store(OUT + b * sob + t * sot + cols, y.to(OUT.dtype.element_ty), mask=ok)


def rms_norm(x, weight, eps, out):
    """out = RMSNorm(x) over the last dim; x and out (batch, tokens, n), unit feature stride."""
    launch = _row_launch(x)
    if launch is None:
        return
    grid, block, warps = launch
    with _on_device(x):
        _rms_norm_kernel[grid](
            x, weight if weight is not None else x, out, x.shape[2], float(eps),
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=warps,
        )


@triton.jit
def _layer_norm_modulate_kernel(X, W, B, SHIFT, SCALE, OUT, n, eps,
                                sxb, sxt, sob, sot, s_shift, s_scale,
                                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    out_ty = OUT.dtype.element_ty
    x = tl.load(X + b * sxb + t * sxt + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(ok, x - mean, 0.0)
    y = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / n + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    # Rounded as the three ops upstream runs: layer norm, multiply, add.
    y = y.to(out_ty).to(tl.float32)
    scale = tl.load(SCALE + b * s_scale + cols, mask=ok, other=0.0).to(tl.float32)
    y = (y * scale).to(out_ty).to(tl.float32)
    shift = tl.load(SHIFT + b * s_shift + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + b * sob + t * sot + cols, (y + shift).to(out_ty), mask=ok)


def layer_norm_modulate(x, weight, bias, eps, shift, one_plus_scale, out):
    """out = LayerNorm(x) * one_plus_scale + shift; modulation tensors (batch or 1, 1, n)."""
    launch = _row_launch(x)
    if launch is None:
        return
    grid, block, warps = launch
    with _on_device(x):
        _layer_norm_modulate_kernel[grid](
            x, weight if weight is not None else x, bias if bias is not None else x, shift, one_plus_scale, out,
            x.shape[2], float(eps), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            shift.stride(0) if shift.shape[0] > 1 else 0,
            one_plus_scale.stride(0) if one_plus_scale.shape[0] > 1 else 0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=warps,
            # Each product is rounded before the add, as upstream's separate ops do.
            enable_fp_fusion=False,
        )


@triton.jit
def _gated_add_kernel(R, G, U, n, srb, srt, sub, sut, s_gate, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    r_ptrs = R + b * srb + t * srt + cols
    ty = R.dtype.element_ty
    gate = tl.load(G + b * s_gate + cols, mask=ok, other=0.0).to(tl.float32)
    update = tl.load(U + b * sub + t * sut + cols, mask=ok, other=0.0).to(tl.float32)
    product = (gate * update).to(ty).to(tl.float32)
    tl.store(r_ptrs, (tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32) + product).to(ty), mask=ok)


def gated_add_(residual, gate, update):
    """residual += gate * update, in place; gate (batch or 1, 1, n)."""
    batch, tokens, n = residual.shape
    if batch * tokens == 0:
        return
    # No reduction: a program per (token, 1024 features) keeps every lane busy.
    block = min(1024, triton.next_power_of_2(n))
    with _on_device(residual):
        _gated_add_kernel[(tokens, batch, triton.cdiv(n, block))](
            residual, gate, update, n, residual.stride(0), residual.stride(1), update.stride(0), update.stride(1),
            gate.stride(0) if gate.shape[0] > 1 else 0, BLOCK=block, num_warps=4,
            enable_fp_fusion=False,
        )
