"""The PyTorch-or-Triton choice for a family of scail-win's kernels.

Each family (rotary embeddings, the DiT layer's norms) has a PyTorch path
that runs anywhere and Triton kernels in a module of their own, imported
only when a call could use them: Triton has no Windows wheel, and a broken
install fails in many ways.  An environment variable per family forces a
path: ``auto`` (the default), ``torch`` or ``triton`` (then a reason Triton
cannot run is an error instead of a fallback).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Optional

import torch

from scail_win.errors import UserError

logger = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelBackend:
    """``select(x)`` answers "torch" or "triton" for one call; ``kernels()`` is the Triton module."""

    def __init__(self, env: str, module: str, what: str):
        self.env = env
        self.module = module
        self.what = what
        self._loaded: Optional[tuple] = None
        self._lock = threading.Lock()

    def requested(self) -> str:
        """The path named by the environment variable (``auto`` when unset)."""
        value = os.environ.get(self.env, "").strip().lower() or "auto"
        if value not in CHOICES:
            raise UserError(f"{self.env}={value!r} is not valid; set it to one of {', '.join(CHOICES)} or unset it")
        return value

    def _load(self) -> tuple:
        """(module, None) or (None, why not); imported once."""
        with self._lock:
            if self._loaded is None:
                try:
                    self._loaded = (importlib.import_module(self.module), None)
                except Exception as exc:  # any failure means "not usable"
                    reason = f"Triton kernels unavailable ({type(exc).__name__}: {exc})"
                    logger.info("%s; %s run on PyTorch", reason, self.what)
                    self._loaded = (None, reason)
            return self._loaded

    def kernels(self):
        """The Triton module; only call after :meth:`select` answered "triton"."""
        return self._load()[0]

    def select(self, x: torch.Tensor, problem: Optional[str] = None) -> str:
        """The path for a call on ``x``; ``problem``: the caller's own reason Triton cannot take it.

        auto takes Triton when it imports, x is a CUDA tensor of a kernel
        dtype, no autograd graph is recorded through x (the kernels have no
        backward) and the caller has no problem of its own.
        """
        choice = self.requested()
        if choice == "torch":
            return "torch"
        if not x.is_cuda:
            problem = f"the tensor is on {x.device}, the Triton kernels need a CUDA tensor"
        elif x.dtype not in TRITON_DTYPES:
            problem = f"dtype {x.dtype} is not one of float16, bfloat16, float32"
        elif problem is None and x.requires_grad and torch.is_grad_enabled():
            problem = "autograd is recording through the input and the kernels have no backward"
        if problem is None:
            # Only now: importing Triton costs about a second.
            problem = self._load()[1]
        if problem is None:
            return "triton"
        if choice == "triton":
            raise UserError(f"{self.env}=triton but {problem}; unset {self.env} to fall back to PyTorch")
        return "torch"
