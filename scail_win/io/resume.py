"""Save and restore the denoising state so an interrupted run can continue.

Rectified-flow sampling is deterministic after the initial noise, so the
latents after step ``i`` (plus the RNG state, for anything drawn later, and a
multistep solver's history) are all a resumed run needs to give the same
video bit for bit. The state is a safetensors file next to the output,
written atomically; a fingerprint of everything that shapes the result
(prompt, inputs, seed, steps, CFG scale, resolution, weights) guards against
resuming a different job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

FORMAT = "scail-win-resume-1"
# Solver history tensors are stored under this prefix; files written before
# solvers kept state have none and load with an empty solver_state.
SOLVER_PREFIX = "solver/"


def fingerprint(**fields) -> str:
    """A stable hash of the job's settings (values made JSON-serialisable with str)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


@dataclass
class ResumeState:
    step: int            # number of completed denoising steps
    total_steps: int
    latents: torch.Tensor
    cpu_rng: torch.Tensor
    job_fingerprint: str
    solver_state: Dict[str, torch.Tensor] = field(default_factory=dict)  # samplers.Solver.state_dict()


def state_path_for(output_path: Path) -> Path:
    return Path(output_path).with_suffix(".resume.safetensors")


def save_state(path: Path, state: ResumeState) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"latents": state.latents.detach().to("cpu").contiguous(),
               "cpu_rng": state.cpu_rng.contiguous()}
    tensors.update({SOLVER_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.solver_state.items()})
    metadata = {"format": FORMAT, "step": str(state.step), "total_steps": str(state.total_steps),
                "fingerprint": state.job_fingerprint}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_state(path: Path, expected_fingerprint: str) -> Optional[ResumeState]:
    """The saved state at ``path``, or None when there is none.

    A state from a different job, or a damaged file, is a UserError: the
    user asked to resume, and silently starting over would waste hours.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: the saved state is damaged ({exc}); delete it to start this video over")
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not a scail-win resume file; delete it to start this video over")
    if metadata.get("fingerprint") != expected_fingerprint:
        raise UserError(f"{path}: saved for different settings (prompt, inputs, seed, steps, "
                        f"cfg scale, resolution, weights, sampler, shift, LoRAs or speed options); rerun with the original settings, "
                        f"or delete the file to start over")
    return ResumeState(step=int(metadata["step"]), total_steps=int(metadata["total_steps"]),
                       latents=tensors["latents"], cpu_rng=tensors["cpu_rng"],
                       job_fingerprint=expected_fingerprint,
                       solver_state={k[len(SOLVER_PREFIX):]: v for k, v in tensors.items()
                                     if k.startswith(SOLVER_PREFIX)})


def remove_state(path: Path) -> None:
    path = Path(path)
    if path.exists():
        path.unlink()
