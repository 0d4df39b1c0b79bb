"""Person boxes (YOLOX) and 133 wholebody keypoints (DWPose) through onnxruntime.

The numbers are SCAIL-Pose's ``DWposeDetector`` (DWPoseProcess/dwpose): the
frame goes in as BGR, YOLOX sees it letterboxed into 640x640 on grey 114
(cv2 bilinear resize), boxes are decoded on the 8/16/32 stride grids, kept
by NMS at IoU 0.45 and a person score above 0.3; each box, padded 1.25x and
widened to 3:4, is warped (cv2 bilinear affine) to DWPose's input, and its
SimCC outputs are decoded by argmax at split ratio 2.  The 133 COCO-WholeBody
points become the DWPose dict SCAIL-Pose draws from: 24 body points in
OpenPose order with the neck inserted (score-thresholded ``subset``), 68
face points, hands stacked as SCAIL-Pose stacks them, all divided by the
frame size, invisible face/hand points set to -1.  Its quirks are kept on
purpose (a frame without a box is posed on the whole frame; the hand stack
order) because the renderer draws what they give.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from scail_win.errors import UserError
from scail_win.pose import extras

log = logging.getLogger(__name__)

DETECTOR_SIZE = (640, 640)  # (H, W) of YOLOX's input
_STRIDES = (8, 16, 32)
NMS_IOU = 0.45
CANDIDATE_SCORE = 0.1
PERSON_SCORE = 0.3
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0
# DWPose's normalisation (applied, as upstream does, to the BGR crop).
_MEAN = np.array([123.675, 116.28, 103.53])
_STD = np.array([58.395, 57.12, 57.375])
VISIBLE = 0.3
_MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
_OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]

PROVIDERS = {"cuda": "CUDAExecutionProvider", "directml": "DmlExecutionProvider", "cpu": "CPUExecutionProvider"}
_PROVIDER_HELP = {"cuda": "install onnxruntime-gpu (and CUDA/cuDNN as its docs say) instead of onnxruntime",
                  "directml": "install onnxruntime-directml instead of onnxruntime (Windows)"}


def choose_providers(pose_device: str = "auto") -> list:
    """onnxruntime providers for ``--pose-device`` (auto: CUDA, else DirectML, else CPU)."""
    ort = extras.onnxruntime()
    available = set(ort.get_available_providers())
    if pose_device == "auto":
        order = [name for name in ("cuda", "directml") if PROVIDERS[name] in available] + ["cpu"]
    elif pose_device in PROVIDERS:
        if PROVIDERS[pose_device] not in available:
            raise UserError(f"--pose-device {pose_device}: this onnxruntime has no {PROVIDERS[pose_device]} "
                            f"(it offers {', '.join(sorted(available))}); {_PROVIDER_HELP[pose_device]}")
        order = [pose_device] if pose_device == "cpu" else [pose_device, "cpu"]
    else:
        raise ValueError(f"unknown pose device {pose_device!r}")
    providers = []
    for name in order:
        if name == "cuda":
            # Grow the memory arena only as asked: the default doubling keeps
            # far more VRAM than two models of this size need.
            providers.append((PROVIDERS[name], {"arena_extend_strategy": "kSameAsRequested"}))
        else:
            providers.append(PROVIDERS[name])
    return providers


def open_session(path, providers):
    """An onnxruntime session of ``path``; UserError naming the file if it does not load."""
    ort = extras.onnxruntime()
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ONNX model {path}: {first}; download it again") from None


# --- YOLOX -------------------------------------------------------------------

def letterbox(image: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> tuple[np.ndarray, float]:
    """``image`` scaled into the top-left of a ``size`` grey-114 canvas: 3 x H x W float32, and the scale."""
    cv2 = extras.cv2()
    canvas = np.ones((size[0], size[1], 3), dtype=np.uint8) * 114
    ratio = min(size[0] / image.shape[0], size[1] / image.shape[1])
    new_w, new_h = int(image.shape[1] * ratio), int(image.shape[0] * ratio)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def decode_yolox(raw: np.ndarray, size: tuple[int, int] = DETECTOR_SIZE) -> np.ndarray:
    """(N, 5 + classes) grid outputs -> (N, 5 + classes) with centre/size in input pixels."""
    grids, strides = [], []
    for stride in _STRIDES:
        h, w = size[0] // stride, size[1] // stride
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((h * w, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if raw.shape[0] != grid.shape[0]:
        raise UserError(f"the YOLOX model gave {raw.shape[0]} predictions where a {size[1]}x{size[0]} "
                        f"input has {grid.shape[0]}; is it yolox_l.onnx?")
    out = raw.copy()
    out[:, :2] = (out[:, :2] + grid) * stride
    out[:, 2:4] = np.exp(out[:, 2:4]) * stride
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS as YOLOX's demo does it (pixel-inclusive areas, +1)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= iou)[0] + 1]
    return keep


def person_boxes(raw: np.ndarray, ratio: float, size: tuple[int, int] = DETECTOR_SIZE) -> np.ndarray:
    """(K, 4) x1 y1 x2 y2 person boxes in frame pixels, best first, from YOLOX's (N, 85) output.

    NMS is per class upstream; only the person class (0) is kept at the end,
    so only it is computed.
    """
    pred = decode_yolox(raw, size)
    centre, wh = pred[:, :2], pred[:, 2:4]
    boxes = np.concatenate([centre - wh / 2.0, centre + wh / 2.0], axis=1) / ratio
    scores = pred[:, 4] * pred[:, 5]
    mask = scores > CANDIDATE_SCORE
    if not mask.any():
        return np.zeros((0, 4))
    boxes, scores = boxes[mask], scores[mask]
    keep = nms(boxes, scores, NMS_IOU)
    boxes, scores = boxes[keep].astype(np.float64), scores[keep]
    return boxes[scores > PERSON_SCORE]


# --- DWPose ------------------------------------------------------------------

def box_center_scale(box: Sequence[float], padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([x1 + x2, y1 + y2]) * 0.5, np.array([x2 - x1, y2 - y1]) * padding


def fit_aspect(scale: np.ndarray, aspect: float) -> np.ndarray:
    """Widen or heighten (w, h) to the ratio ``aspect`` = w / h."""
    w, h = scale
    return np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])


def warp_matrix(center: np.ndarray, scale: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """2 x 3 affine mapping the box (``center``, ``scale`` = w, h) onto ``out_size`` = (w, h), unrotated.

    Built from the same three float32 point pairs as mmpose's
    ``get_warp_matrix`` so that cv2 solves the identical matrix.
    """
    cv2 = extras.cv2()
    dst_w, dst_h = out_size
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, scale[0] * -0.5])
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([0.0, dst_w * -0.5])
    for pts in (src, dst):  # the third point: (p0 - p1) turned 90 degrees about p1
        d = pts[0] - pts[1]
        pts[2] = pts[1] + np.r_[-d[1], d[0]]
    return cv2.getAffineTransform(src, dst)


def crop_for_pose(image: np.ndarray, box, in_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normalised 3 x h x w float32 crop of ``box`` for DWPose, and the box's centre and scale."""
    cv2 = extras.cv2()
    w, h = in_size
    center, scale = box_center_scale(box)
    scale = fit_aspect(scale, w / h)
    crop = cv2.warpAffine(image, warp_matrix(center, scale, (w, h)), (int(w), int(h)), flags=cv2.INTER_LINEAR)
    crop = (crop - _MEAN) / _STD
    # float64 math as upstream, cast to the model's float32 as onnxruntime does there.
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32), center, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, Wx), (N, K, Wy) -> keypoints (N, K, 2) in input pixels and scores (N, K)."""
    n, k, _ = simcc_x.shape
    flat_x, flat_y = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(flat_x, axis=1), np.argmax(flat_y, axis=1)), axis=-1).astype(np.float32)
    vals = np.minimum(np.amax(flat_x, axis=1), np.amax(flat_y, axis=1))
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / split, vals.reshape(n, k)


def to_dwpose_dict(keypoints: np.ndarray, scores: np.ndarray, boxes: np.ndarray, height: int, width: int):
    """133 wholebody points of N people -> (pose dict, normalised boxes), as DWposeDetector returns them."""
    info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(info[:, 5, 2:4] > VISIBLE, info[:, 6, 2:4] > VISIBLE).astype(int)
    info = np.insert(info, 17, neck, axis=1)
    info[:, _OPENPOSE_IDX] = info[:, _MMPOSE_IDX]
    candidate, score = info[..., :2].copy(), info[..., 2].copy()
    candidate[..., 0] /= float(width)
    candidate[..., 1] /= float(height)
    body = candidate[:, :24].copy()
    # The subset holds each visible point's index, -1 otherwise.
    subset = np.where(score[:, :24] > VISIBLE, np.arange(24, dtype=score.dtype), -1.0)
    hidden = score < VISIBLE
    # Upstream writes the indices into the scores before thresholding them,
    # so its body points all count as hidden there; only face and hands use this.
    hidden[:, :24] = subset < VISIBLE
    candidate[hidden] = -1
    faces = candidate[:, 24:92]
    hands = np.vstack([candidate[:, 92:113], candidate[:, 113:]])
    pose = {"bodies": {"candidate": body, "subset": subset}, "hands": hands, "faces": faces}
    norm_boxes = [[float(x1 / width), float(y1 / height), float(x2 / width), float(y2 / height)]
                  for x1, y1, x2, y2 in boxes]
    return pose, norm_boxes


@dataclass
class Detection:
    pose: dict          # DWPose dict, normalised coordinates
    boxes: list         # person boxes [x1, y1, x2, y2] / frame size, best first


class WholebodyDetector:
    """YOLOX + DWPose on RGB frames, one frame at a time (as upstream)."""

    def __init__(self, yolox_path, dwpose_path, providers):
        self.det = open_session(yolox_path, providers)
        self.pose = open_session(dwpose_path, providers)
        self.det_input = self.det.get_inputs()[0].name
        self.pose_input = self.pose.get_inputs()[0].name
        self.pose_outputs = [o.name for o in self.pose.get_outputs()]
        shape = self.pose.get_inputs()[0].shape
        if len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:]) or len(self.pose_outputs) != 2:
            raise UserError(f"{dwpose_path} is not a DWPose model (input {shape}, outputs {self.pose_outputs})")
        self.pose_size = (shape[3], shape[2])  # (w, h)
        log.info("pose models on %s", self.det.get_providers()[0])

    def boxes(self, bgr: np.ndarray) -> np.ndarray:
        tensor, ratio = letterbox(bgr)
        raw = self.det.run(None, {self.det_input: tensor[None]})[0]
        if raw.ndim != 3 or raw.shape[-1] < 6:
            raise UserError(f"the YOLOX model gave an output of shape {raw.shape}; is it yolox_l.onnx?")
        return person_boxes(raw[0], ratio)

    def keypoints(self, bgr: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # No box: upstream poses the whole frame anyway.
        regions = boxes if len(boxes) else [[0, 0, bgr.shape[1], bgr.shape[0]]]
        all_kp, all_score = [], []
        for box in regions:
            crop, center, scale = crop_for_pose(bgr, box, self.pose_size)
            simcc_x, simcc_y = self.pose.run(self.pose_outputs, {self.pose_input: crop[None]})
            kp, score = decode_simcc(simcc_x, simcc_y)
            kp = kp / self.pose_size * scale + center - scale / 2
            all_kp.append(kp[0])
            all_score.append(score[0])
        return np.array(all_kp), np.array(all_score)

    def __call__(self, rgb: np.ndarray) -> Detection:
        """Detect and pose the people in one H x W x 3 uint8 RGB frame."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        boxes = self.boxes(bgr)
        keypoints, scores = self.keypoints(bgr, boxes)
        pose, norm_boxes = to_dwpose_dict(keypoints, scores, boxes, bgr.shape[0], bgr.shape[1])
        return Detection(pose, norm_boxes)
