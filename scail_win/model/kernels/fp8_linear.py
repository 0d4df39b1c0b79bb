"""fp8 matmuls for the DiT's fp8-stored linears (``args.fp8_matmul``).

Converted fp8 checkpoints hold each per-layer Linear weight as
float8_e4m3fn with a float32 scale per output channel
(:mod:`scail_win.weights.checkpoint`). By default those are upcast to bf16 where they
land on the GPU. With fp8 matmul on a GPU with fp8 tensor cores (sm_89 and
newer) the weights stay fp8 on the GPU (half the memory and copy) and each
linear runs ``torch._scaled_mm``: the activation is quantized per row (per
token) to e4m3 with a dynamic scale, the weight keeps its per-channel scale,
the output is bf16 with the bias added in the same kernel.

The hook is per module: :func:`install_fp8_linears` replaces the ``forward``
of each chosen linear (sat's Column/RowParallelLinear or torch's Linear) with
one that takes the fp8 path when its weight is fp8 at call time and the call
suits ``_scaled_mm``, and otherwise upcasts the weight for the module's own
forward (exactly the upcast path); :meth:`Fp8Linears.remove` puts the
original forwards back. Block swapping needs nothing else: the swap's
``materialize`` keeps these weights fp8 (``CheckpointWeights(keep_fp8=...)``)
and the hook finds whatever weight the module holds when it runs.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from scail_win.weights.checkpoint import FP8_MAX, dequantize, is_fp8_candidate, relative_error

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have fp8 tensor cores
# _scaled_mm needs K and N (the weight's two sizes) to be multiples of 16.
ALIGN = 16
# Where the quantization goes through float32, rows are done in chunks of
# about this many elements: the float32 copy of a whole FFN activation
# would need twice its bf16 size.
QUANT_CHUNK_ELEMENTS = 1 << 24
PROBE_TOLERANCE = 0.1  # relative error of the probe's fp8 product vs its bf16 upcast
_LINEAR_FORWARDS = ("ColumnParallelLinear.forward", "RowParallelLinear.forward", "Linear.forward")

_support: dict = {}  # device -> None or why not


def _row_scales(rows: torch.Tensor) -> torch.Tensor:
    # The inf-norm is max |x|: one read, exact in any float dtype.
    amax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True).float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


_fused_division: dict = {}  # device type -> whether a division can write e4m3 directly


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with q float8_e4m3fn (rows, K) for ``x`` (..., K) and scale float32 (rows, 1).

    Row r of ``x.reshape(-1, K)`` is ``q[r] * scale[r]`` within e4m3's
    rounding; ``scale = amax(|row|) / 448`` (1 for an all-zero row), as
    :func:`scail_win.weights.checkpoint.quantize_fp8` scales a weight's channels.
    Each value is rounded once: the quotient is computed in float32 and
    written as e4m3 by the division itself (one read of ``x``, no float32
    copy); where a device cannot, in chunks of rows through float32.
    """
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"quantize_rows needs a floating tensor of at least one dimension, got {x.dtype}")
    rows = x.reshape(-1, x.shape[-1])
    q = torch.empty(rows.shape, dtype=FP8, device=x.device)
    scale = _row_scales(rows)
    # |row| / scale <= 448 up to one float32 rounding, which e4m3 rounds back to 448.
    if _fused_division.get(x.device.type, True):
        try:
            torch.div(rows, scale, out=q)
            _fused_division[x.device.type] = True
            return q, scale
        except (RuntimeError, TypeError) as exc:
            log.info("fp8 matmul: a division cannot write e4m3 on %s (%s); quantizing through float32",
                     x.device.type, exc)
            _fused_division[x.device.type] = False
    step = max(1, QUANT_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        q[start:start + step] = rows[start:start + step].float() / scale[start:start + step]
    return q, scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with ``torch._scaled_mm`` (x quantized per row).

    ``weight``: (N, K) float8_e4m3fn; ``weight_scale``: float32, N values.
    """
    q, x_scale = quantize_rows(x)
    out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1).float(),
                           bias=bias, out_dtype=out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _probe(device: torch.device) -> Optional[str]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    # 37 rows: the token count is anything; K and N are multiples of 16.
    x = torch.randn(37, 64, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(48, 64, generator=gen)
    bias = torch.randn(48, generator=gen).to(device, torch.bfloat16)
    from scail_win.weights.checkpoint import quantize_fp8

    wq, ws = quantize_fp8(w)
    wq, ws = wq.to(device), ws.to(device)
    try:
        out = scaled_linear(x, wq, ws, bias)
    except Exception as exc:  # unsupported arch/build raises RuntimeError or NotImplementedError
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"torch._scaled_mm failed its probe ({type(exc).__name__}: {first})"
    err = relative_error(out, nn.functional.linear(x, dequantize(wq, ws, torch.bfloat16), bias))
    if not err <= PROBE_TOLERANCE:
        return f"torch._scaled_mm's probe is {err:.3g} off the upcast product"
    return None


def fp8_matmul_support(device) -> Optional[str]:
    """Why fp8 matmuls cannot run on ``device`` (None: they can); probed once per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the DiT runs on {device}; fp8 matmuls need a CUDA GPU"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}) has no fp8 tensor "
                f"cores (sm_89 or newer)")
    if device not in _support:
        _support[device] = _probe(device)
    return _support[device]


def _is_linear(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    weight = getattr(module, "weight", None)
    return (getattr(forward, "__qualname__", None) in _LINEAR_FORWARDS and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def fp8_linear_weights(model: nn.Module) -> set[str]:
    """Names (as in ``model.state_dict()``) of the linear weights fp8 matmuls can take.

    Those fp8 checkpoints store in fp8 (:func:`scail_win.weights.checkpoint.is_fp8_candidate`)
    whose sizes are multiples of 16. Works on a model built on ``meta``.
    """
    names = set()
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        weight_name = f"{name}.weight" if name else "weight"
        shape = tuple(module.weight.shape)
        if is_fp8_candidate(weight_name, shape) and all(n % ALIGN == 0 for n in shape):
            names.add(weight_name)
    return names


def plan_fp8_matmul(model: nn.Module, device, enabled: bool, weights_fp8: bool) -> set[str]:
    """The weights to keep in fp8 for fp8 matmuls: all eligible ones, or none (logged once, with why)."""
    if not enabled:
        return set()
    why = None
    if not weights_fp8:
        why = "the DiT weights are not fp8 (convert them with `scail-win convert --dtype fp8_e4m3fn`)"
    else:
        from scail_win.diffusion_video import _model_parallel_size

        why = "model parallel runs split linears" if _model_parallel_size() > 1 else fp8_matmul_support(device)
    if why is not None:
        log.info("fp8 matmul off: %s; fp8 weights are upcast to bf16 on the GPU", why)
        return set()
    names = fp8_linear_weights(model)
    log.info("fp8 matmul on: %d linears keep fp8 weights on the GPU (torch._scaled_mm)", len(names))
    return names


class Fp8Linears:
    """The linears' fp8 forwards (``fp8_linears`` in the model's :class:`HookRegistry`); :meth:`remove` restores theirs."""

    name = "fp8_linears"
    slot = None  # each linear's own forward, not the model's

    def __init__(self, model: nn.Module, modules: Iterable[nn.Module], use_scaled_mm: bool):
        from ...placement.registry import HookRegistry

        self.model = model
        self.use_scaled_mm = use_scaled_mm
        self._fallback_logged = False
        self.modules = list(modules)
        self.installed = False
        for module in self.modules:
            if "forward" in module.__dict__:
                raise ValueError(f"{type(module).__name__} already has an instance forward; remove that first")
        HookRegistry.of(model).add(self)

    def on_add(self, model) -> None:
        for module in self.modules:
            module.forward = self._forward_for(module)
        self.installed = True

    def on_remove(self, model) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.modules.clear()
        self.installed = False

    def _forward_for(self, module: nn.Module):
        original = type(module).forward.__get__(module)

        def forward(x, *args, **kwargs):
            weight = module.weight
            if weight.dtype != FP8:
                return original(x, *args, **kwargs)
            scale = getattr(module, "weight_scale", None)
            if scale is None:
                raise ValueError(f"{type(module).__name__} holds an fp8 weight without its weight_scale buffer")
            if self.use_scaled_mm:
                why = self._unsuitable(x, weight, args, kwargs)
                if why is None:
                    return scaled_linear(x, weight, scale, module.bias)
                if not self._fallback_logged:
                    log.info("fp8 matmul: %s; such calls upcast the fp8 weight", why)
                    self._fallback_logged = True
            return self._upcast(module, original, weight, scale, x, args, kwargs)

        return forward

    @staticmethod
    def _unsuitable(x, weight, args, kwargs) -> Optional[str]:
        if args or kwargs:
            return "a linear was called with extra arguments"
        if not x.is_cuda or x.device != weight.device:
            return f"an input on {x.device} for a weight on {weight.device}"
        if x.dtype != torch.bfloat16:
            return f"a {x.dtype} input (the fp8 path makes bf16)"
        if x.shape[-1] != weight.shape[1]:
            return f"an input of {x.shape[-1]} features for a weight of {weight.shape[1]}"
        return None

    @staticmethod
    def _upcast(module, original, weight, scale, x, args, kwargs):
        # The module's own forward on the upcast weight: what the upcast path computes.
        dtype = x.dtype if x.is_floating_point() and x.dtype != FP8 else torch.bfloat16
        module._parameters["weight"] = dequantize(weight, scale, dtype)
        try:
            return original(x, *args, **kwargs)
        finally:
            module._parameters["weight"] = weight

    def remove(self) -> None:
        from ...placement.registry import HookRegistry

        if self.installed:
            HookRegistry.of(self.model).remove(self.name)


def install_fp8_linears(model: nn.Module, names: Iterable[str], device=None) -> Fp8Linears:
    """Hook the linears whose weights are ``names``; fp8 matmuls where ``device`` supports them.

    ``device`` None (or one without fp8 tensor cores) installs only the
    upcasting forward: correct, and still fp8 in memory.
    """
    wanted = set(names)
    owners = {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules() if _is_linear(m)}
    missing = sorted(wanted - owners.keys())
    if missing:
        raise ValueError(f"no linear owns {missing[0]}")
    modules = [owners[name] for name in sorted(wanted)]
    use = device is not None and fp8_matmul_support(device) is None
    return Fp8Linears(model, modules, use)
