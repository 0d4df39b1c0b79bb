"""Build large modules without allocating or initialising their weights.

Upstream builds the 16 B-parameter DiT on the CPU in fp32 and randomly
initialises it (sat's CrossAttention ignores ``skip_init``), only for the
checkpoint to overwrite every value: 109 s and 63 GiB of host RAM on the
H200 host. Under :func:`empty_weights` every parameter lands on the ``meta``
device as soon as it is registered and ``torch.nn.init`` does nothing, so
construction takes seconds and no memory; the weights loader then assigns
real tensors where each one will live.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# Initialisers that sat, sgm and torch.nn layers call while building.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
    "kaiming_normal_", "orthogonal_", "sparse_",
)


def _return_tensor(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` functions no-ops (weights stay uninitialised)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    saved_reset = nn.Linear.reset_parameters, nn.Conv3d.reset_parameters, nn.Conv2d.reset_parameters
    try:
        for name in saved:
            setattr(nn.init, name, _return_tensor)
        nn.Linear.reset_parameters = nn.Conv3d.reset_parameters = nn.Conv2d.reset_parameters = _noop
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
        nn.Linear.reset_parameters, nn.Conv3d.reset_parameters, nn.Conv2d.reset_parameters = saved_reset


def _noop(self) -> None:
    return None


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters registered inside the block live on ``meta``; buffers stay real.

    Buffers (RoPE tables, positional embeddings) are computed, not loaded, so
    they are kept; parameters are moved to ``meta`` at registration, which
    frees the (never touched) CPU storage immediately.
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter
    try:
        with skip_init():
            yield
    finally:
        nn.Module.register_parameter = original


def materialize_(module: nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
    """Give every meta parameter real (uninitialised) storage on ``device``."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta":
                data = torch.empty(p.shape, dtype=dtype or p.dtype, device=device)
                sub._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)
