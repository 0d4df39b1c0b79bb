"""Small stand-ins for the pose models, with the real models' signatures and known outputs.

* YOLOX (``yolox_l.onnx``): ``images`` float32 1x3x640x640 -> ``output``
  1x8400x85 (centre offsets and log sizes on the 8/16/32 grids,
  objectness, 80 class scores).  One person box, its objectness 1 when the
  image has a pixel brighter than 200 and 0 otherwise (the letterbox grey is
  114, so an all-dark frame has nobody); a weaker overlapping person box that
  NMS must drop, and a box of another class that must be ignored.
* DWPose (``dw-ll_ucoco_384.onnx``): ``input`` float32 1x3x384x288 ->
  ``simcc_x`` 1x133x576, ``simcc_y`` 1x133x768, each keypoint's peak at a
  known bin.
* NLF (``nlf_l_multi_0.3.2.torchscript``): a scripted module whose
  ``detect_smpl_batched(uint8 Bx3xHxW)`` returns ``{"joints3d_nonparam": [...]}``,
  one (1, 24, 3) standing person per image that holds a bright pixel, else (0, 24, 3).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

YOLOX_ANCHORS = 80 * 80 + 40 * 40 + 20 * 20
# The person box in letterboxed 640x640 pixels: centre x, y, width, height.
PERSON_BOX_640 = (320.0, 180.0, 200.0, 300.0)
PERSON_SCORE = 0.9
DW_IN = (288, 384)       # (w, h)
DW_BINS = (576, 768)     # simcc x, y bins (split ratio 2)
HIDDEN_POINTS = (3, 40, 100, 120)  # keypoints given a low score (0.1)


def _anchor(cx: float, cy: float, stride: int = 8) -> int:
    return int(cy // stride) * (640 // stride) + int(cx // stride)


def yolox_raw(person: bool = True) -> np.ndarray:
    """The (8400, 85) output the YOLOX stand-in gives (person: a bright image)."""
    out = np.zeros((YOLOX_ANCHORS, 85), np.float32)
    out[:, 2:4] = np.log(4.0 / 8)  # tiny boxes, zero scores: background
    for (cx, cy, w, h), obj, cls, score in (
            (PERSON_BOX_640, 1.0, 0, PERSON_SCORE),
            ((PERSON_BOX_640[0] + 6, PERSON_BOX_640[1] + 4, 196.0, 296.0), 1.0, 0, 0.6),  # NMS drops it
            ((100.0, 500.0, 64.0, 64.0), 1.0, 3, 0.95)):  # a car: not a person
        k = _anchor(cx, cy)
        out[k, 0], out[k, 1] = cx / 8 - int(cx // 8), cy / 8 - int(cy // 8)
        out[k, 2], out[k, 3] = np.log(w / 8), np.log(h / 8)
        out[k, 4] = obj if person else 0.0
        out[k, 5 + cls] = score
    return out


def dwpose_peaks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each keypoint's (x bin, y bin) and score in the DWPose stand-in."""
    k = np.arange(133)
    xbin = (40 + (k * 37) % 500).astype(np.int64)
    ybin = (60 + (k * 53) % 650).astype(np.int64)
    score = np.full(133, 0.9, np.float32)
    score[list(HIDDEN_POINTS)] = 0.1
    return xbin, ybin, score


def _onnx():
    import pytest

    return pytest.importorskip("onnx", reason="building the stand-in ONNX models needs the onnx package")


def _save(onnx, graph, path: Path) -> Path:
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_yolox(path: Path) -> Path:
    onnx = _onnx()
    h, t = onnx.helper, onnx.TensorProto
    person = yolox_raw(True)
    base = yolox_raw(False)
    mask = (person - base)[None]
    nodes = [
        h.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
        h.make_node("Sub", ["peak", "threshold"], ["over"]),
        h.make_node("Relu", ["over"], ["pos"]),
        h.make_node("Min", ["pos", "one"], ["obj"]),
        h.make_node("Mul", ["mask", "obj"], ["person"]),
        h.make_node("Add", ["base", "person"], ["output"]),
    ]
    inits = [h.make_tensor("threshold", t.FLOAT, [], [200.0]), h.make_tensor("one", t.FLOAT, [], [1.0]),
             onnx.numpy_helper.from_array(mask.astype(np.float32), "mask"),
             onnx.numpy_helper.from_array(base[None], "base")]
    graph = h.make_graph(nodes, "yolox_standin",
                         [h.make_tensor_value_info("images", t.FLOAT, [1, 3, 640, 640])],
                         [h.make_tensor_value_info("output", t.FLOAT, [1, YOLOX_ANCHORS, 85])], inits)
    return _save(onnx, graph, path)


def make_dwpose(path: Path) -> Path:
    onnx = _onnx()
    h, t = onnx.helper, onnx.TensorProto
    xbin, ybin, score = dwpose_peaks()
    simcc_x = np.zeros((1, 133, DW_BINS[0]), np.float32)
    simcc_y = np.zeros((1, 133, DW_BINS[1]), np.float32)
    simcc_x[0, np.arange(133), xbin] = score
    simcc_y[0, np.arange(133), ybin] = score + 0.05  # the score is the smaller of the two peaks
    nodes = [
        h.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        h.make_node("Mul", ["mean", "zero"], ["nothing"]),  # keeps the input in the graph
        h.make_node("Add", ["cx", "nothing"], ["simcc_x"]),
        h.make_node("Add", ["cy", "nothing"], ["simcc_y"]),
    ]
    inits = [h.make_tensor("zero", t.FLOAT, [], [0.0]), onnx.numpy_helper.from_array(simcc_x, "cx"),
             onnx.numpy_helper.from_array(simcc_y, "cy")]
    graph = h.make_graph(nodes, "dwpose_standin",
                         [h.make_tensor_value_info("input", t.FLOAT, [1, 3, DW_IN[1], DW_IN[0]])],
                         [h.make_tensor_value_info("simcc_x", t.FLOAT, [1, 133, DW_BINS[0]]),
                          h.make_tensor_value_info("simcc_y", t.FLOAT, [1, 133, DW_BINS[1]])], inits)
    return _save(onnx, graph, path)


def standing_person(depth: float = 3000.0) -> np.ndarray:
    """SMPL-24 joints (camera space, mm, y down) of a person standing ``depth`` mm away."""
    j = np.zeros((24, 3), np.float32)
    spots = {0: (0, 0), 1: (90, 80), 2: (-90, 80), 3: (0, -120), 4: (100, 480), 5: (-100, 480), 6: (0, -250),
             7: (100, 860), 8: (-100, 860), 9: (0, -330), 10: (110, 900), 11: (-110, 900), 12: (0, -480),
             13: (70, -420), 14: (-70, -420), 15: (0, -640), 16: (180, -430), 17: (-180, -430),
             18: (330, -230), 19: (-330, -230), 20: (420, -20), 21: (-420, -20), 22: (450, 40), 23: (-450, 40)}
    for k, (x, y) in spots.items():
        j[k] = (x, y, depth + (40.0 if k in (16, 18, 20) else 0.0))
    return j


class NLFStandIn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("person", torch.from_numpy(standing_person()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images

    @torch.jit.export
    def detect_smpl_batched(self, images: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        found: List[torch.Tensor] = []
        for i in range(images.shape[0]):
            if int(images[i].max()) > 200:
                found.append(self.person.unsqueeze(0).clone())
            else:
                found.append(torch.zeros((0, 24, 3)))
        return {"joints3d_nonparam": found}


def make_nlf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(NLFStandIn()), str(path))
    return path


def make_models(folder: Path) -> Path:
    """The three stand-ins in SCAIL-Pose's layout under ``folder``."""
    make_yolox(folder / "DWPose" / "yolox_l.onnx")
    make_dwpose(folder / "DWPose" / "dw-ll_ucoco_384.onnx")
    make_nlf(folder / "nlf_l_multi_0.3.2.torchscript")
    return folder


def person_frames(count: int = 4, height: int = 64, width: int = 112, person: bool = True) -> np.ndarray:
    """uint8 frames: dark, with a bright upright rectangle in the middle when ``person``."""
    frames = np.full((count, height, width, 3), 20, np.uint8)
    if person:
        for t in range(count):
            frames[t, height // 4:3 * height // 4, width // 2 - 8 + t:width // 2 + 8 + t] = (240, 230, 220)
    return frames
