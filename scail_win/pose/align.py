"""``--align``: fit the driving pose to the reference character (SCAIL-Pose's align3d.py path).

A new camera (focal scale ``m``, vertical aspect ``s``, principal-point
shift ``p``, ``q``) is solved so that the first driving frame's 3D joints
project onto the reference image's 2D body points; the driving 2D face is
rescaled to the reference face's size; the 2D face and hands are then
moved by how far the new camera moves their 3D anchor joints
(``shift_dwpose_according_to_nlf``).

Upstream solves the camera with scipy's bounded ``minimize`` (L-BFGS-B).
The error is a sum of squares that is quadratic in ``a = f*m`` with ``p``
and in ``b = f*m*s`` with ``q``, so here it is solved exactly: the offsets
in closed form, then the convex problem in (a, b) over the bounds' region
(its interior optimum, else the best point of its four edges).  Same
minimum, no scipy; upstream's iterative result can differ from it by its
convergence tolerance.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from scail_win.errors import UserError

log = logging.getLogger(__name__)

FOV_DEGREES = 55.0  # NLF's default field of view
M_BOUNDS = (0.7, 1.4)
S_BOUNDS = (0.8, 1.15)
UPPER_BODY = (0, 2, 3, 5, 6)
LOWER_BODY = (9, 10, 12, 13)
NECK = 1
FACE_CENTER = 30
FACE_SCALE_BOUNDS = (0.8, 1.5)
# SMPL joints that carry the 2D overlay: head (face), right and left wrist (hands).
HEAD, RIGHT_WRIST, LEFT_WRIST = 15, 20, 21


def intrinsics_from_fov(height: int, width: int, fov_degrees: float = FOV_DEGREES) -> np.ndarray:
    """The 3x3 camera SCAIL-Pose renders with: the field of view across the longer side, centred."""
    focal = max(height, width) / (np.tan(np.deg2rad(fov_degrees) / 2) * 2)
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])


def _best_on_segment(alpha: float, beta: float, lo: float, hi: float) -> float:
    """argmin of alpha*t^2 - 2*beta*t over [lo, hi]."""
    if alpha > 0:
        return float(np.clip(beta / alpha, lo, hi))
    return lo if alpha * lo * lo - 2 * beta * lo <= alpha * hi * hi - 2 * beta * hi else hi


def solve_camera(points3d: np.ndarray, focal: float, height: int, width: int, points2d: np.ndarray,
                 first_weight: float, rest_weight: float) -> tuple[np.ndarray, float, float]:
    """The new 3x3 camera and its ``m``, ``s``: weighted least squares of projected ``points3d`` onto ``points2d``.

    Point 0 is weighted ``first_weight``, the others ``rest_weight``
    (upstream: 8 and 1 when fitting the upper body, 1 and 4 for the feet).
    """
    points3d = np.asarray(points3d, np.float64)
    points2d = np.asarray(points2d, np.float64)
    if points3d.shape[0] != points2d.shape[0] or points3d.shape[0] < 2:
        raise ValueError(f"need matching 3D and 2D points (at least 2), got {points3d.shape} and {points2d.shape}")
    if np.any(points3d[:, 2] <= 0):
        raise UserError("--align: a joint of the first driving frame is behind the camera; run without --align")
    weights = np.full(len(points3d), float(rest_weight))
    weights[0] = first_weight
    rays = points3d[:, :2] / points3d[:, 2:3]           # x = X/Z, y = Y/Z
    centre = np.array([width / 2, height / 2])
    target = points2d - centre                           # a*x + p (u), b*y + q (v)
    mean_ray = weights @ rays / weights.sum()
    mean_target = weights @ target / weights.sum()
    dr, dt = rays - mean_ray, target - mean_target
    alpha = weights @ (dr * dr)                          # per axis: E(a) = alpha a^2 - 2 beta a + const
    beta = weights @ (dr * dt)
    a_lo, a_hi = focal * M_BOUNDS[0], focal * M_BOUNDS[1]
    s_lo, s_hi = S_BOUNDS

    def cost(a, b):
        return alpha[0] * a * a - 2 * beta[0] * a + alpha[1] * b * b - 2 * beta[1] * b

    free = [beta[k] / alpha[k] if alpha[k] > 0 else None for k in (0, 1)]
    if free[0] is not None and free[1] is not None and a_lo <= free[0] <= a_hi and s_lo * free[0] <= free[1] <= s_hi * free[0]:
        a, b = free
    else:
        candidates = []
        for a_edge in (a_lo, a_hi):  # a fixed, b within its aspect bounds
            candidates.append((a_edge, _best_on_segment(alpha[1], beta[1], s_lo * a_edge, s_hi * a_edge)))
        for s_edge in (s_lo, s_hi):  # b = s * a along the aspect bounds
            a_edge = _best_on_segment(alpha[0] + s_edge * s_edge * alpha[1], beta[0] + s_edge * beta[1], a_lo, a_hi)
            candidates.append((a_edge, s_edge * a_edge))
        a, b = min(candidates, key=lambda ab: cost(*ab))
    p = float(np.clip(mean_target[0] - a * mean_ray[0], -width, width))
    q = float(np.clip(mean_target[1] - b * mean_ray[1], -height, height))
    m, s = a / focal, b / a
    log.debug("aligned camera: m=%.4f s=%.4f p=%.2f q=%.2f", m, s, p, q)
    camera = np.array([[a, 0, width / 2 + p], [0, b, height / 2 + q], [0, 0, 1]])
    return camera, m, s


def fit_camera(driving_coco: np.ndarray, ref_pose: dict, focal: float, height: int, width: int) -> tuple[np.ndarray, float, float]:
    """process_pose.py's choice of points and weights, then :func:`solve_camera`.

    ``driving_coco``: the first driving frame's (18, 3) COCO joints; ``ref_pose``:
    the reference image's DWPose dict (first person used).  The feet are
    fitted when the reference shows all four leg points the driving frame
    has, else the upper body; the neck always takes part.
    """
    ref_xy = np.array(ref_pose["bodies"]["candidate"][0][:14], np.float64) * np.array([width, height])
    ref_subset = np.asarray(ref_pose["bodies"]["subset"][0][:14])
    joints = np.asarray(driving_coco, np.float64)[:14]

    def usable(group):
        return [i for i in group if ref_subset[i] != -1.0 and np.sum(joints[i]) != 0]

    lower = usable(LOWER_BODY)
    feet = len(lower) >= 4
    indices = [NECK] + (lower if feet else usable(UPPER_BODY))
    log.info("--align: fitting the %s", "feet" if feet else "upper body")
    first, rest = (1.0, 4.0) if feet else (8.0, 1.0)
    return solve_camera(joints[indices], focal, height, width, ref_xy[indices], first, rest)


def scale_faces(poses: Sequence[dict], ref_pose: dict) -> float:
    """Scale every frame's first face and body to the reference face's size (in place); returns the factor.

    The factor is the reference's mean distance from face point 30 to the
    other face points over the first driving frame's, clipped to [0.8, 1.5].
    """
    def spread(face):
        face = np.array(face, np.float64)
        dist = np.delete(np.linalg.norm(face - face[FACE_CENTER], axis=1), FACE_CENTER)
        return np.mean(dist)

    driving, ref = spread(poses[0]["faces"][0]), spread(ref_pose["faces"][0])
    factor = 1.0 if driving < 1e-6 else ref / driving
    factor = float(np.clip(factor, *FACE_SCALE_BOUNDS))
    for pose in poses:
        face = np.array(pose["faces"][0])
        pose["faces"][0] = (face - face[FACE_CENTER]) * factor + face[FACE_CENTER]
        body = np.array(pose["bodies"]["candidate"][0])
        pose["bodies"]["candidate"][0] = (body - body[0]) * factor + body[0]
    return factor


def first_person_poses(poses: Sequence[dict]) -> list[dict]:
    """Each frame's DWPose dict cut to its first person (SCAIL-Pose's ``recollect_dwposes``)."""
    return [{"bodies": {"candidate": pose["bodies"]["candidate"][0:1], "subset": pose["bodies"]["subset"][0:1]},
             "faces": pose["faces"][0:1], "hands": pose["hands"][0:2]} for pose in poses]


def _project(joint: np.ndarray, camera: np.ndarray) -> np.ndarray:
    return np.array([camera[0, 0] * joint[0] / joint[2] + camera[0, 2], camera[1, 1] * joint[1] / joint[2] + camera[1, 2]])


def shift_to_camera(people_per_frame: Sequence[Sequence[np.ndarray]], poses: Sequence[dict], camera: np.ndarray,
                    new_camera: np.ndarray, height: int, width: int, scale_x: float, scale_y: float) -> None:
    """Move each person's 2D face, hands and body by how far the new camera moves their 3D anchors (in place).

    Face and body follow the head joint, each hand its wrist; hands are
    then scaled about their wrist point by (``scale_x``, ``scale_y``).  An
    anchor with depth <= 0.01 does not move anything.
    """
    for people, pose in zip(people_per_frame, poses):
        for k, joints in enumerate(people):
            joints = np.asarray(joints, np.float64)

            def shift(j):
                if joints[j, 2] > 0.01:
                    return _project(joints[j], new_camera) - _project(joints[j], camera)
                return np.zeros(2)

            face, body = pose["faces"][k], pose["bodies"]["candidate"][k]
            right, left = pose["hands"][2 * k], pose["hands"][2 * k + 1]
            for points, delta in ((face, shift(HEAD)), (right, shift(RIGHT_WRIST)), (left, shift(LEFT_WRIST)),
                                  (body, shift(HEAD))):
                points[:, 0] += delta[0] / width
                points[:, 1] += delta[1] / height
            for hand in (right, left):
                for dim, factor in ((0, scale_x), (1, scale_y)):
                    hand[:, dim] = (hand[:, dim] - hand[0, dim]) * factor + hand[0, dim]
