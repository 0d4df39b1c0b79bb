"""The pipeline's phases, one name each: the memory plan's peaks, the engine's placement, the messages.

A phase is a string (``Phase.DENOISE == "denoise"``, same hash), so plan
fields and logs read as plain names.
"""
from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    """One phase of a video, in the order a video runs them."""

    VAE_ENCODE = "vae_encode"
    CLIP = "clip"
    TEXT = "text"
    DENOISE = "denoise"
    VAE_DECODE = "vae_decode"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    @property
    def title(self) -> str:
        """What the phase does, for messages ("out of GPU memory during ...")."""
        return _TITLES[self]

    @property
    def vae_op(self) -> str:
        """``encode`` or ``decode`` for a VAE phase (the VAE's method and tiling op); ValueError otherwise."""
        if self not in _VAE_OPS:
            raise ValueError(f"{self.value} is not a VAE phase")
        return _VAE_OPS[self]

    @classmethod
    def for_vae_op(cls, op: str) -> "Phase":
        """The VAE phase of ``op`` (``encode`` or ``decode``)."""
        for phase, name in _VAE_OPS.items():
            if name == op:
                return phase
        raise ValueError(f"VAE op must be 'encode' or 'decode', got {op!r}")


_TITLES = {
    Phase.VAE_ENCODE: "VAE encoding",
    Phase.CLIP: "image encoding",
    Phase.TEXT: "text encoding",
    Phase.DENOISE: "denoising",
    Phase.VAE_DECODE: "VAE decoding",
}
_VAE_OPS = {Phase.VAE_ENCODE: "encode", Phase.VAE_DECODE: "decode"}
