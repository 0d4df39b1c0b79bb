"""Synthetic NLF and DWPose outputs for the pose tests and benchmarks.

A person seen from the front (camera space, millimetres, y down, as NLF
gives them) swinging the arms forward and back and stepping, so that limbs
change depth order over the sequence; and DWPose dicts (normalised
coordinates, -1 for points below the score threshold) with face and hands.
"""

from __future__ import annotations

import math

import numpy as np

# SMPL-24 rest positions (x, y, z offset) in mm around the pelvis, facing the camera:
# the person's right is the image's left (negative x).
_REST = {
    0: (0, 0, 0), 1: (100, 30, 0), 2: (-100, 30, 0), 3: (0, -120, 0),
    4: (110, 440, 0), 5: (-110, 440, 0), 6: (0, -250, 0), 7: (120, 850, 0),
    8: (-120, 850, 0), 9: (0, -330, 0), 10: (130, 900, -80), 11: (-130, 900, -80),
    12: (0, -500, 0), 13: (80, -450, 0), 14: (-80, -450, 0), 15: (0, -690, -20),
    16: (180, -470, 0), 17: (-180, -470, 0), 18: (230, -200, 0), 19: (-230, -200, 0),
    20: (250, 40, 0), 21: (-250, 40, 0), 22: (260, 120, 0), 23: (-260, 120, 0),
}


def walking_person(frames: int, depth: float = 3500.0, x_offset: float = 0.0) -> np.ndarray:
    """(frames, 24, 3) float32 SMPL joints of a person at `depth` mm swinging arms and legs."""
    out = np.zeros((frames, 24, 3), np.float32)
    for f in range(frames):
        phase = 2 * math.pi * f / max(frames, 1)
        swing = math.sin(phase)
        joints = {j: np.array(p, np.float64) for j, p in _REST.items()}
        # Arms swing in depth in opposite phase; the right forearm also comes across the chest.
        for elbow, wrist, hand, sign in ((19, 21, 23, 1.0), (18, 20, 22, -1.0)):
            joints[elbow][2] -= 250 * sign * swing
            joints[wrist][2] -= 450 * sign * swing
            joints[hand][2] -= 480 * sign * swing
        joints[21][0] += 200 * max(swing, 0.0)
        for knee, ankle, sign in ((5, 8, 1.0), (4, 7, -1.0)):
            joints[knee][2] += 200 * sign * swing
            joints[ankle][2] += 300 * sign * swing
        for j, p in joints.items():
            out[f, j] = (p[0] + x_offset, p[1] - 100, p[2] + depth)
    return out


def project(joints: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Pixel coordinates (..., 2) of camera-space points (..., 3)."""
    z = joints[..., 2]
    return np.stack([intrinsics[0, 0] * joints[..., 0] / z + intrinsics[0, 2],
                     intrinsics[1, 1] * joints[..., 1] / z + intrinsics[1, 2]], axis=-1)


def dwpose_frame(face_xy: np.ndarray | None, hands_xy: list | None, height: int, width: int,
                 body_xy: np.ndarray | None = None, body_visible=None) -> dict:
    """One frame of DWposeDetector output for one person.

    face_xy: (68, 2) pixels or None (all below threshold); hands_xy: two
    (21, 2) pixel arrays (or None each); body_xy: (24, 2) pixels with
    body_visible the indices whose score passed (others get subset -1).
    """
    scale = np.array([width, height], np.float64)
    candidate = np.zeros((1, 24, 2))
    subset = -np.ones((1, 24))
    if body_xy is not None:
        candidate[0] = body_xy / scale
        for j in body_visible if body_visible is not None else range(24):
            subset[0, j] = j
    faces = -np.ones((1, 68, 2)) if face_xy is None else (np.asarray(face_xy, np.float64) / scale)[None]
    hands = -np.ones((2, 21, 2))
    for i, hand in enumerate(hands_xy or [None, None]):
        if hand is not None:
            hands[i] = np.asarray(hand, np.float64) / scale
    return {"bodies": {"candidate": candidate, "subset": subset}, "faces": faces, "hands": hands}
