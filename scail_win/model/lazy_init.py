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

from ..upstream.patches import META_PARAMETERS, SKIP_INIT, all_applied


def skip_init() -> contextlib.AbstractContextManager:
    """Make ``torch.nn.init`` functions and the layers' ``reset_parameters`` no-ops (weights stay uninitialised)."""
    return all_applied(SKIP_INIT)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters registered inside the block live on ``meta``; buffers stay real.

    Buffers (RoPE tables, positional embeddings) are computed, not loaded, so
    they are kept; parameters are moved to ``meta`` at registration, which
    frees the (never touched) CPU storage immediately.
    """
    with META_PARAMETERS.applied(), skip_init():
        yield


def materialize_(module: nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
    """Give every meta parameter real (uninitialised) storage on ``device``."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta":
                data = torch.empty(p.shape, dtype=dtype or p.dtype, device=device)
                sub._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)
