"""Self-attention for SCAIL's DiT in a single process, on a chosen kernel.

Upstream's ``UlyessAttentionMixin`` sends q, k, v and the output through
``all_to_all_single`` even with one process (identities there, but each is
a copy, and with gloo -- Windows' only backend -- a trip through the host),
and sat's ``attention_fn_default`` turns the mask into two Python bools
(two host syncs per call) and copies k and v with ``.contiguous()``.
With sequence parallel size 1 none of that changes the result, so this
mixin calls an attention kernel directly. Its constructor also does not
query the CUDA device, so the DiT can be built on a machine without one.

The kernel (``--attention`` / ``SCAIL_WIN_ATTENTION``) is one of

* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (upstream's math);
* ``flash``: flash-attn's ``flash_attn_func``, where it is installed;
* ``sage``: SageAttention's ``sageattn`` (8-bit q/k), where it is installed;
* ``auto``: sage, else flash, else sdpa -- each only where it imports and a
  tiny probe on the run's device and dtype matches SDPA; always sdpa on
  the CPU.

:func:`select_backend` makes that choice once per (name, device, dtype) in
a process and logs it. A chosen kernel that cannot take a call (fp32,
an unsupported head size, dropout, a CPU tensor) hands it to SDPA.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from scail_win.errors import UserError

log = logging.getLogger(__name__)

ENV = "SCAIL_WIN_ATTENTION"
FLAG = "--attention"
CHOICES = ("auto", "sdpa", "flash", "sage")
# auto's order of preference.
PREFERENCE = ("sage", "flash")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
SAGE_HEAD_DIMS = (64, 128)  # what SageAttention 1.x and 2.x both compile
# Relative L2 error vs SDPA a probe may show: flash is exact up to bf16
# rounding; SageAttention quantizes q and k to int8 (about 1 % here).
PROBE_TOLERANCE = {"flash": 0.02, "sage": 0.05}
INSTALL_HINT = {
    "flash": "flash-attn needs a wheel built for this torch, CUDA and Python (pip install flash-attn "
             "builds from source, which takes an hour and a CUDA toolkit)",
    "sage": "pip install sageattention (on Windows: pip install triton-windows sageattention)",
}
PACKAGES = {"flash": ("flash_attn", "flash_attn_func"), "sage": ("sageattention", "sageattn")}


def requested_backend(name: Optional[str] = None) -> str:
    """The backend asked for: ``name`` (``args.attention``), else ``SCAIL_WIN_ATTENTION``, else auto.

    An explicit ``name`` other than ``auto`` wins over the environment
    variable; the variable overrides ``auto`` (the flag's default).
    """
    chosen = (name or "auto").strip().lower()
    if chosen not in CHOICES:
        raise UserError(f"{FLAG} {name!r} is not valid; use one of {', '.join(CHOICES)}")
    if chosen != "auto":
        return chosen
    env = os.environ.get(ENV, "").strip().lower() or "auto"
    if env not in CHOICES:
        raise UserError(f"{ENV}={env!r} is not valid; set it to one of {', '.join(CHOICES)} or unset it")
    return env


def _sdpa(query, key, value, dropout_p: float = 0.0):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=dropout_p)


def _flash_call(fn):
    def call(query, key, value):
        # flash-attn's layout is (batch, seq, heads, dim): q, k, v here are
        # (batch, heads, seq, dim) views of such tensors, so no copy.
        out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                 dropout_p=0.0, softmax_scale=1.0 / math.sqrt(query.shape[-1]), causal=False)
        return out.transpose(1, 2)
    return call


def _sage_call(fn):
    def call(query, key, value):
        # SageAttention indexes its inputs as contiguous tensors of the
        # layout it is told. The DiT's q is a (batch, heads, seq, dim) view of
        # a (batch, seq, heads, dim) tensor: hand that over as "NHD", no copy.
        if query.transpose(1, 2).is_contiguous():
            q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
            return fn(q, k, v, tensor_layout="NHD", is_causal=False).transpose(1, 2)
        q, k, v = (t.contiguous() for t in (query, key, value))
        return fn(q, k, v, tensor_layout="HND", is_causal=False)
    return call


def _unsupported(name: str, query, key, value) -> Optional[str]:
    """Why kernel ``name`` cannot take this call (None when it can)."""
    if not query.is_cuda:
        return f"a tensor on {query.device}"
    if query.dtype not in KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return "q, k and v of different head sizes"
    if name == "flash" and (head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8):
        return f"head size {head_dim}"
    if name == "sage" and head_dim not in SAGE_HEAD_DIMS:
        return f"head size {head_dim}"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "a head dimension with a stride"
    return None


@dataclass
class Backend:
    """An attention kernel over (batch, heads, seq, head_dim) tensors; ``reason``: why it was chosen."""

    name: str
    reason: str
    kernel: Optional[Callable] = None  # None for sdpa
    _fallback_logged: bool = field(default=False, repr=False, compare=False)

    def __call__(self, query, key, value, dropout_p: float = 0.0):
        if self.kernel is None:
            return _sdpa(query, key, value, dropout_p)
        problem = "dropout" if dropout_p else _unsupported(self.name, query, key, value)
        if problem is not None:
            if not self._fallback_logged:
                log.info("attention: %s cannot take %s; those calls run on sdpa", self.name, problem)
                self._fallback_logged = True
            return _sdpa(query, key, value, dropout_p)
        return self.kernel(query, key, value)


_lock = threading.Lock()
_kernels: dict = {}  # name -> (callable or None, why not)
_probes: dict = {}  # (name, device, dtype) -> None or why not
_selected: dict = {}  # (requested, device, dtype) -> Backend


def load_kernel(name: str) -> tuple[Optional[Callable], Optional[str]]:
    """(call, None) for kernel ``name`` ("flash" or "sage"), or (None, why not); imported once."""
    with _lock:
        if name not in _kernels:
            module_name, attr = PACKAGES[name]
            try:
                module = importlib.import_module(module_name)
                fn = getattr(module, attr)
            except Exception as exc:  # a broken install fails in many ways; any means "not usable"
                missing = isinstance(exc, ModuleNotFoundError) and exc.name == module_name
                why = "is not installed" if missing else f"does not import ({type(exc).__name__}: {exc})"
                _kernels[name] = (None, why)
            else:
                wrap = _flash_call if name == "flash" else _sage_call
                _kernels[name] = (wrap(fn), None)
        return _kernels[name]


def relative_l2(approx: torch.Tensor, reference: torch.Tensor) -> float:
    """||approx - reference|| / ||reference||, in float32."""
    a, r = approx.float(), reference.float()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run kernel ``name`` on tiny self- and cross-attention inputs; None when it matches SDPA."""
    kernel, why = load_kernel(name)
    if kernel is None:
        return why
    gen = torch.Generator(device="cpu").manual_seed(0)
    worst = 0.0
    try:
        for kv_tokens in (256, 77):  # self-attention, and text-length keys as in cross-attention
            # (batch, heads, seq, dim) views of (batch, seq, heads, dim) tensors, as the DiT passes them.
            q, k, v = (torch.randn(1, n, 2, 128, generator=gen).to(device, dtype).transpose(1, 2)
                       for n in (256, kv_tokens, kv_tokens))
            out = kernel(q, k, v)
            if tuple(out.shape) != tuple(q.shape):
                return f"returned shape {tuple(out.shape)} for {tuple(q.shape)} in its probe"
            worst = max(worst, relative_l2(out, _sdpa(q, k, v)))
    except Exception as exc:  # a kernel that cannot run here raises anything (compile, launch, arch)
        return f"failed its probe ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not worst <= PROBE_TOLERANCE[name]:
        return f"is {worst:.3g} off SDPA in its probe (relative; limit {PROBE_TOLERANCE[name]})"
    return None


def probe(name: str, device, dtype: torch.dtype) -> Optional[str]:
    """Why kernel ``name`` is unusable on ``device`` with ``dtype`` (None: it works); cached."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"needs a CUDA device, not {device}"
    if dtype not in KERNEL_DTYPES:
        return f"needs float16 or bfloat16, not {dtype}"
    key = (name, device, dtype)
    if key not in _probes:
        _probes[key] = _probe(name, device, dtype)
    return _probes[key]


def select_backend(name: Optional[str], device, dtype: torch.dtype) -> Backend:
    """The attention backend for ``--attention name`` on ``device``/``dtype``; chosen and logged once.

    ``name`` is resolved with :func:`requested_backend`. A forced flash or
    sage that is missing or fails its probe raises UserError; forced with an
    fp32 model, it is probed in bf16 and its fp32 calls run on SDPA.
    """
    requested = requested_backend(name)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    key = (requested, device, dtype)
    if key in _selected:
        return _selected[key]
    if requested == "sdpa":
        backend = Backend("sdpa", f"{FLAG} sdpa")
    elif requested == "auto":
        backend = _auto(device, dtype)
    else:
        # A model dtype the kernels lack (fp32) is not the install's fault:
        # probe in bf16, and the backend hands those calls to SDPA.
        why = probe(requested, device, dtype if dtype in KERNEL_DTYPES else torch.bfloat16)
        if why is not None:
            # Installed but failing here wants another build, not an install.
            hint = INSTALL_HINT[requested] if load_kernel(requested)[1] is not None else \
                f"its installed build does not work on this GPU; try another release of {PACKAGES[requested][0]}"
            raise UserError(f"{FLAG} {requested}: {PACKAGES[requested][0]} {why}; {hint}, or use {FLAG} auto")
        backend = Backend(requested, f"{FLAG} {requested}", load_kernel(requested)[0])
    log.info("attention: %s (%s)", backend.name, backend.reason)
    _selected[key] = backend
    return backend


def _auto(device: torch.device, dtype: torch.dtype) -> Backend:
    if device.type != "cuda":
        return Backend("sdpa", f"auto: {device} always runs PyTorch's kernel")
    skipped = []
    for name in PREFERENCE:
        why = probe(name, device, dtype)
        if why is None:
            works = f"{PACKAGES[name][0]} works here"
            return Backend(name, "auto: " + "; ".join(skipped + [works]), load_kernel(name)[0])
        skipped.append(f"{PACKAGES[name][0]} {why}")
    return Backend("sdpa", "auto: " + "; ".join(skipped))


def available_backends() -> dict[str, str]:
    """name -> "available" or why its package is not (imported, not probed: for the doctor)."""
    out = {"sdpa": "available"}
    for name in PREFERENCE:
        kernel, why = load_kernel(name)
        out[name] = "available" if kernel is not None else why
    return out


_requested: list = ["auto"]  # the process's --attention, set by the engine


def configure(name: Optional[str]) -> str:
    """Set the process's ``--attention`` (the mixin's choice); returns the resolved name.

    A forced flash or sage whose package does not import fails here, before
    the model loads; its GPU probe runs on the first attention call.
    """
    requested = requested_backend(name)
    if requested in PREFERENCE:
        _, why = load_kernel(requested)
        if why is not None:
            raise UserError(f"{FLAG} {requested}: {PACKAGES[requested][0]} {why}; "
                            f"{INSTALL_HINT[requested]}, or use {FLAG} auto")
    _requested[0] = requested
    return requested


def single_process_attention(query_layer, key_layer, value_layer, attention_mask,
                             attention_dropout=None, log_attention_weights=None,
                             scaling_attention_score=True, **kwargs):
    """Full (non-causal) attention over (batch, heads, seq, head_dim) tensors.

    The DiT passes a dummy all-ones mask and no dropout at inference, which is
    what makes sat's default take the same scaled_dot_product_attention path.
    """
    if log_attention_weights is not None or not scaling_attention_score:
        raise ValueError("single-process attention supports plain scaled attention only")
    if attention_mask is not None and attention_mask.device.type == "cpu" \
            and not bool((attention_mask.float() > 0).all()):
        # The DiT's masks are all-ones CPU tensors (sat casts them to its
        # first parameter's dtype: fp8 when that layer is stored in fp8), so
        # this check costs no device sync; anything else would need sat's
        # masked path.
        raise ValueError("single-process attention got a partial attention mask")
    dropout_p = 0.0
    if attention_dropout is not None and attention_dropout.training:
        dropout_p = attention_dropout.p
    num_q, num_kv = query_layer.shape[1], key_layer.shape[1]
    if num_kv != num_q:
        # Multi-query layouts: expand k/v heads as sat does.
        key_layer = key_layer.repeat_interleave(num_q // num_kv, dim=1)
        value_layer = value_layer.repeat_interleave(num_q // num_kv, dim=1)
    backend = select_backend(_requested[0], query_layer.device, query_layer.dtype)
    return backend(query_layer, key_layer, value_layer, dropout_p)


def make_single_process_mixin_class():
    """A sat ``BaseMixin`` subclass standing in for ``UlyessAttentionMixin``.

    Built on demand because sat must be importable first (it is the user's
    SCAIL tree or PyPI's SwissArmyTransformer).
    """
    from sat.model.mixins import BaseMixin

    class SingleProcessAttentionMixin(BaseMixin):
        def attention_fn(self, query_layer, key_layer, value_layer, attention_mask,
                         attention_dropout=None, log_attention_weights=None,
                         scaling_attention_score=True, **kwargs):
            return single_process_attention(query_layer, key_layer, value_layer, attention_mask,
                                            attention_dropout, log_attention_weights,
                                            scaling_attention_score)

    return SingleProcessAttentionMixin
