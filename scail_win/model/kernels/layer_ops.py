"""Fused per-token operations of SCAIL's DiT layer: RMSNorm, LayerNorm + modulate, gated residual add.

Upstream runs each as a chain of PyTorch ops; the qk RMSNorm alone makes
four float32 copies of q (and of k) per layer, so on a large GPU these
memory-bound chains cost about as much as a tenth of the step.  Each
function here has a PyTorch reference (the chain, in upstream's order and
dtypes) and a Triton kernel (``layer_ops_triton``) that reads each input
once, computes in float32 and rounds where the chain rounds; one entry point
per operation picks the implementation (:func:`select_backend`).

All tensors are (batch, tokens, features) with unit feature stride; the
modulation tensors (shift, scale, gate) are (batch or 1, 1, features), as
the AdaLN mixin makes them.  :mod:`scail_win.placement.lean_layer` calls these.
"""
from __future__ import annotations

from typing import Optional

import torch

from scail_win.model.kernels.kernel_backend import KernelBackend

BACKEND = KernelBackend("SCAIL_WIN_LAYER_OPS", "scail_win.model.kernels.layer_ops_triton", "layer norms")
BACKEND_ENV = BACKEND.env
# One row lives in registers; wider rows go to PyTorch.
TRITON_MAX_FEATURES = 16384


def select_backend(x: torch.Tensor) -> str:
    """"triton" or "torch" for a call on ``x`` (see kernel_backend.KernelBackend.select); rows must fit.

    ``SCAIL_WIN_LAYER_OPS=triton`` turns a failing condition into an error,
    ``=torch`` always answers "torch".
    """
    features = x.shape[-1] if x.dim() else 0
    problem = f"{features} features are above {TRITON_MAX_FEATURES}" if features > TRITON_MAX_FEATURES else None
    return BACKEND.select(x, problem)


def _check_rows(name: str, t: torch.Tensor, features: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be (batch, tokens, features), got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its features")
    if features is not None and t.shape[-1] != features:
        raise ValueError(f"{name} has {t.shape[-1]} features, expected {features}")


def _check_modulation(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    _check_rows(name, t, x.shape[-1])
    if t.shape[1] != 1 or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} must be ({x.shape[0]} or 1, 1, {x.shape[-1]}), got shape {tuple(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must match the input's dtype and device ({x.dtype}, {x.device}), "
                         f"got {t.dtype} on {t.device}")


def _check_vector(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != x.shape[-1] or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({x.shape[-1]},) tensor")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, the input on {x.device}")


def _output(x: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_rows("out", out, x.shape[-1])
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {tuple(x.shape)} {x.dtype} tensor on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim, as SCAIL's qk-norm computes it; written to ``out`` when given.

    x / sqrt(mean(x^2) + eps) in float32, times ``weight`` (any dtype,
    promoted to float32), rounded once to x's dtype.
    """
    _check_rows("x", x)
    _check_vector("weight", weight, x)
    out = _output(x, out)
    if select_backend(x) == "triton":
        BACKEND.kernels().rms_norm(x, weight, eps, out)
        return out
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = weight * h
    out.copy_(h)
    return out


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, one_plus_scale: torch.Tensor, eps: float,
                        weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm(x) * one_plus_scale + shift, each op rounded to x's dtype as upstream's chain is."""
    _check_rows("x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("one_plus_scale", one_plus_scale, x)
    _check_vector("weight", weight, x)
    _check_vector("bias", bias, x)
    if select_backend(x) == "triton":
        out = _output(x, None)
        BACKEND.kernels().layer_norm_modulate(x, weight, bias, eps, shift, one_plus_scale, out)
        return out
    normed = torch.nn.functional.layer_norm(
        x.float(), (x.shape[-1],), None if weight is None else weight.float(),
        None if bias is None else bias.float(), eps).to(x.dtype)
    return normed * one_plus_scale + shift


def gated_add_(residual: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """residual += gate * update in place (the product rounded first, as upstream's two ops do)."""
    _check_rows("residual", residual)
    _check_modulation("gate", gate, residual)
    _check_rows("update", update, residual.shape[-1])
    if update.shape != residual.shape or update.dtype != residual.dtype:
        raise ValueError(f"update must be a {tuple(residual.shape)} {residual.dtype} tensor, "
                         f"got {tuple(update.shape)} {update.dtype}")
    if select_backend(residual) == "triton":
        BACKEND.kernels().gated_add_(residual, gate, update)
        return residual
    return residual.add_(gate * update)
