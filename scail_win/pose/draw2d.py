"""The 2D layer SCAIL-Pose draws over its 3D render: cheeks, hands and face from DWPose.

This is pose_draw's ``draw_pose_to_canvas_np(poses, ..., show_body_flag=False,
show_cheek_flag=True, dw_hand=True)`` as ``render_nlf_as_images`` calls it:
per person, on a black canvas, the four nose-eye-ear sticks (OpenPose
colours), the canvas dimmed to 60 %, the nose/eye/ear dots; then the hands
(DWPose's HSV-coloured bones and blue dots) and the face landmarks 17-26 and
36-67 (eyebrows, eyes, nose, mouth; not the jaw) as white dots.  Persons are
summed into the frame as uint8, wrapping as numpy does upstream.  A point is
drawn only where both pixel coordinates truncate to at least 1, which drops
DWPose's -1 (below score threshold) points; a body point needs its subset
entry, which is -1 when its score was low.

OpenCV does the rasterising (ellipse polygons, anti-alias-free lines and
filled circles) so that every pixel is the one SCAIL-Pose's OpenCV draws.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from scail_win.errors import UserError

_EPS = 0.01
_BODY_STICK = 4
_BODY_DOT = 4
_DIM = 0.6
# OpenPose limbs (1-based joint pairs) and colours, as pose_draw uses them;
# only the four cheek limbs (13-16) are drawn when the body is hidden.
_OPENPOSE_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
                   (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
_CHEEK_LIMBS = (13, 14, 15, 16)
_CHEEK_DOTS = (0, 14, 15, 16, 17)
_OPENPOSE_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
               (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_HAND_DOT_COLOR = (0, 0, 255)
_FACE_POINTS = frozenset(list(range(17, 27)) + list(range(36, 70)))
_FACE_COLOR = (255, 255, 255)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("the pose command needs OpenCV: pip install scail-win[pose]") from None
    return cv2


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    """matplotlib.colors.hsv_to_rgb for one colour, with its arithmetic (float64)."""
    i = int(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i % 6]


_HAND_COLORS = tuple(tuple(c * 255 for c in _hsv_to_rgb(ie / len(_HAND_EDGES), 1.0, 1.0))
                     for ie in range(len(_HAND_EDGES)))


def _thin(height: int, width: int) -> int:
    return min(max(int(min(height, width) / 300), 1), 2)


def _draw_cheek(cv2, canvas, candidate, subset):
    height, width = canvas.shape[:2]
    for limb in _CHEEK_LIMBS:
        index = subset[np.array(_OPENPOSE_LIMBS[limb]) - 1]
        if -1 in index:
            continue
        xs = candidate[index.astype(int), 0] * float(width)
        ys = candidate[index.astype(int), 1] * float(height)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), _BODY_STICK),
                                   int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, _OPENPOSE_COLORS[limb])
    canvas = (canvas * _DIM).astype(np.uint8)
    for joint in _CHEEK_DOTS:
        index = int(subset[joint])
        if index == -1:
            continue
        x, y = candidate[index][0:2]
        cv2.circle(canvas, (int(x * width), int(y * height)), _BODY_DOT, _OPENPOSE_COLORS[joint], thickness=-1)
    return canvas


def _draw_hands(cv2, canvas, hands):
    height, width = canvas.shape[:2]
    thin = _thin(height, width)
    for peaks in hands:
        peaks = np.asarray(peaks)
        for ie, (e0, e1) in enumerate(_HAND_EDGES):
            x1, y1 = int(peaks[e0][0] * width), int(peaks[e0][1] * height)
            x2, y2 = int(peaks[e1][0] * width), int(peaks[e1][1] * height)
            if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
                cv2.line(canvas, (x1, y1), (x2, y2), _HAND_COLORS[ie], thickness=thin)
        for x, y in peaks:
            x, y = int(x * width), int(y * height)
            if x > _EPS and y > _EPS:
                cv2.circle(canvas, (x, y), thin, _HAND_DOT_COLOR, thickness=-1)


def _draw_face(cv2, canvas, faces):
    height, width = canvas.shape[:2]
    thin = _thin(height, width)
    for landmarks in faces:
        for i, (x, y) in enumerate(np.asarray(landmarks)):
            x, y = int(x * width), int(y * height)
            if x > _EPS and y > _EPS and i in _FACE_POINTS:
                cv2.circle(canvas, (x, y), thin, _FACE_COLOR, thickness=-1)


def draw_frame(pose: dict, height: int, width: int) -> np.ndarray:
    """The (height, width, 3) uint8 RGB overlay of one frame's DWPose dict."""
    cv2 = _cv2()
    final = np.zeros((height, width, 3), np.uint8)
    bodies = pose["bodies"]
    for i in range(len(bodies["candidate"])):
        # Keep DWPose's dtype (float32): pixel coordinates truncate as upstream's do.
        candidate = np.asarray(bodies["candidate"][i])
        subset = np.asarray(bodies["subset"][i])
        canvas = _draw_cheek(cv2, np.zeros((height, width, 3), np.uint8), candidate, subset)
        _draw_hands(cv2, canvas, pose["hands"][2 * i:2 * i + 2])
        _draw_face(cv2, canvas, pose["faces"][i:i + 1])
        final = final + canvas
    return final


def draw_overlay(poses: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(T, height, width, 3) uint8 RGB: draw_frame of each frame's DWPose dict."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    out = np.zeros((len(poses), height, width, 3), np.uint8)
    for t, pose in enumerate(poses):
        out[t] = draw_frame(pose, height, width)
    return out
