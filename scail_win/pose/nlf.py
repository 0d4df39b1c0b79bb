"""NLF 3D joints (SMPL-24) for each detected person, as SCAIL-Pose's ``process_video_nlf``.

Each person box (normalised, from :mod:`scail_win.pose.detect`) is grown by
2.5 % of the frame width and 5 % of its height on each side; the frame is
blanked outside it and the whole masked frame, uint8, goes to the model's
``detect_smpl_batched`` in batches.  NLF finds the person again inside the
mask; its ``joints3d_nonparam`` for that image (camera space, in the
model's own units) is kept per box.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from scail_win.errors import UserError

JOINTS = 24
MARGIN_X, MARGIN_Y = 0.025, 0.05


def load_nlf(path, device: torch.device | str):
    """The NLF TorchScript model on ``device``; UserError naming the file if it does not load."""
    try:
        # The released model's graph calls torchvision::nms; importing
        # torchvision registers that operator. Stand-ins need no torchvision.
        import torchvision  # noqa: F401
    except ImportError:
        torchvision = None
    try:
        # Through a file object: paths with non-ASCII letters load on Windows too.
        with open(path, "rb") as handle:
            model = torch.jit.load(handle, map_location=device)
    except OSError as exc:
        raise UserError(f"cannot read NLF model {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        text = str(exc)
        if "torchvision" in text and torchvision is None:
            raise UserError(f"{path} needs torchvision: pip install the torchvision build that matches "
                            f"torch {torch.__version__}") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise UserError(f"cannot load NLF model {path}: {first}; download it again") from None
    if not hasattr(model, "detect_smpl_batched"):
        raise UserError(f"{path} has no detect_smpl_batched method; is it nlf_l_multi_0.3.2.torchscript?")
    return model.eval()


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """A normalised box grown by the NLF margins, in whole pixels clipped to the frame: x1, y1, x2, y2."""
    x1, y1, x2, y2 = box
    return (max(0, math.floor(x1 * width - width * MARGIN_X)), max(0, math.floor(y1 * height - height * MARGIN_Y)),
            min(width, math.ceil(x2 * width + width * MARGIN_X)), min(height, math.ceil(y2 * height + height * MARGIN_Y)))


def run_nlf(model, frames: torch.Tensor, boxes_per_frame: Sequence[Sequence], device: torch.device | str,
            batch_size: int = 16, progress: bool = True) -> list[list[np.ndarray]]:
    """Joints of every box: per frame, per box, an (n, 24, 3) float32 array (n people NLF found, may be 0).

    ``frames``: uint8 T x H x W x 3 (CPU); frames go to ``device`` one batch
    at a time.  The result does not depend on ``batch_size`` beyond what the
    model's own batching changes.
    """
    if batch_size < 1:
        raise UserError(f"--nlf-batch must be at least 1, got {batch_size}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 T x H x W x 3, got {frames.dtype} {tuple(frames.shape)}")
    if len(boxes_per_frame) != frames.shape[0]:
        raise ValueError(f"{len(boxes_per_frame)} box lists for {frames.shape[0]} frames")
    height, width = frames.shape[1:3]
    jobs = [(t, box) for t, boxes in enumerate(boxes_per_frame) for box in boxes]
    joints: list[np.ndarray] = []
    buffer = torch.zeros((min(batch_size, max(len(jobs), 1)), height, width, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode(), tqdm(total=len(jobs), desc="NLF 3D joints", unit="person",
                                      disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            buffer.zero_()
            for slot, (t, box) in enumerate(chunk):
                x1, y1, x2, y2 = box_pixels(box, height, width)
                buffer[slot, y1:y2, x1:x2] = frames[t, y1:y2, x1:x2].to(device)
            try:
                pred = model.detect_smpl_batched(buffer[:len(chunk)].permute(0, 3, 1, 2))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                hint = ("; the released NLF model is reported to need a CUDA GPU" if torch.device(device).type == "cpu"
                        else "; try a smaller --nlf-batch" if "out of memory" in first.lower() else "")
                raise UserError(f"NLF failed on {device}: {first}{hint}") from None
            found = pred.get("joints3d_nonparam") if isinstance(pred, dict) else None
            if found is None or len(found) != len(chunk):
                raise UserError("the NLF model's detect_smpl_batched gave no joints3d_nonparam per image; "
                                "is it nlf_l_multi_0.3.2.torchscript?")
            for item in found:
                arr = item.detach().to("cpu", torch.float32).numpy()
                if arr.ndim != 3 or arr.shape[1:] != (JOINTS, 3):
                    raise UserError(f"the NLF model gave joints of shape {arr.shape}, expected (n, 24, 3)")
                joints.append(arr)
            bar.update(len(chunk))
    del buffer
    out: list[list[np.ndarray]] = []
    index = 0
    for boxes in boxes_per_frame:
        out.append(joints[index:index + len(boxes)])
        index += len(boxes)
    return out


def first_person(nlf_per_frame: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    """SCAIL-Pose's single-person joints: the first box's first NLF person per frame.

    A frame without a box has no person; a box where NLF found no one
    gives an all-zero (24, 3) person, which draws nothing.
    """
    people = []
    for per_box in nlf_per_frame:
        if not per_box:
            people.append([])
        elif len(per_box[0]):
            people.append([per_box[0][0]])
        else:
            people.append([np.zeros((JOINTS, 3), dtype=np.float32)])
    return people
