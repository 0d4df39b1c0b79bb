"""SCAIL-Pose's 3D skeleton: SMPL-24 joints to the coloured limb cylinders of one frame.

SCAIL-Pose (NLFPoseExtract/nlf_render.py, nlf_draw.py) maps NLF's SMPL-24
joints onto the 18 OpenPose/COCO slots, keeps 17 limbs of that skeleton and
renders each as a capsule of one colour.  The tables below are that mapping,
limb list, draw order and colour table; the model was trained on videos
rendered with exactly these, so they are not a matter of taste.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# SMPL-24 joint -> COCO-18 slot.  Eyes and ears (14-17) have no SMPL joint and
# stay zero, so the four face limbs that need them are never drawn; the nose
# slot is SMPL's head joint.
SMPL_TO_COCO = {
    15: 0,   # head -> nose
    12: 1,   # neck
    17: 2,   # right shoulder
    19: 3,   # right elbow
    21: 4,   # right wrist
    16: 5,   # left shoulder
    18: 6,   # left elbow
    20: 7,   # left wrist
    2: 8,    # right hip
    5: 9,    # right knee
    8: 10,   # right ankle
    1: 11,   # left hip
    4: 12,   # left knee
    7: 13,   # left ankle
}
COCO_JOINTS = 18

# (start, end) COCO slots of each limb, indexed as SCAIL-Pose's limb_seq.
LIMB_SEQ = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7),
    (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# Order the limbs are emitted in (from the neck outwards); on an exact depth
# tie the earlier cylinder keeps the pixel.
DRAW_ORDER = (0, 2, 3, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)

# Limb colours in 0-255 RGB, indexed like LIMB_SEQ.
LIMB_COLORS_255 = (
    (255, 0, 0),      # neck -> right shoulder: red
    (0, 255, 255),    # neck -> left shoulder: cyan
    (255, 85, 0),     # right upper arm: orange
    (255, 170, 0),    # right forearm: golden orange
    (0, 170, 255),    # left upper arm: sky blue
    (0, 85, 255),     # left forearm: medium blue
    (180, 255, 0),    # neck -> right hip: yellow-green
    (0, 255, 0),      # right thigh: bright green
    (0, 255, 85),     # right shin: light green-blue
    (0, 0, 255),      # neck -> left hip: pure blue
    (85, 0, 255),     # left thigh: purple-blue
    (170, 0, 255),    # left shin: medium purple
    (150, 150, 150),  # neck -> nose: grey
    (255, 0, 170),    # nose -> right eye: pink-magenta
    (50, 0, 255),     # right eye -> ear: dark violet
    (255, 0, 170),    # nose -> left eye: pink-magenta
    (50, 0, 255),     # left eye -> ear: dark violet
)
LIMB_ALPHA = 0.8


def limb_rgba(limb: int) -> tuple[float, float, float, float]:
    """The renderer's colour of a limb: SCAIL-Pose lifts each 0-255 channel to c/300 + 0.15."""
    return tuple(c / 300 + 0.15 for c in LIMB_COLORS_255[limb]) + (LIMB_ALPHA,)


LIMB_RGBA = tuple(limb_rgba(i) for i in range(len(LIMB_SEQ)))


def smpl_to_coco18(joints: np.ndarray) -> np.ndarray:
    """(24, D) SMPL joints -> (18, D) COCO slots; slots without an SMPL joint are zero."""
    joints = np.asarray(joints)
    if joints.ndim != 2 or joints.shape[0] != 24:
        raise ValueError(f"expected SMPL joints of shape (24, D), got {joints.shape}")
    coco = np.zeros((COCO_JOINTS, joints.shape[1]), dtype=joints.dtype)
    for src, dst in SMPL_TO_COCO.items():
        coco[dst] = joints[src]
    return coco


Spec = tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]


def cylinder_specs(persons_joints: Sequence[np.ndarray]) -> list[Spec]:
    """The (start xyz, end xyz, rgba) cylinders of one frame, person by person in draw order.

    persons_joints: one (24, 3) array or tensor (camera space, NLF's
    millimetres) per person; an all-zero array is a person NLF did not find and draws nothing.
    As SCAIL-Pose, a limb is left out when either end's coordinates sum to 0.
    """
    specs: list[Spec] = []
    for joints in persons_joints:
        if hasattr(joints, "detach"):  # a torch tensor, maybe on the GPU, as NLF returns them
            joints = joints.detach().cpu().numpy()
        joints = np.asarray(joints, dtype=np.float32)
        if joints.shape != (24, 3):
            raise ValueError(f"expected (24, 3) joints per person, got {joints.shape}")
        coco = smpl_to_coco18(joints)
        for limb in DRAW_ORDER:
            start, end = LIMB_SEQ[limb]
            if np.sum(coco[start]) == 0 or np.sum(coco[end]) == 0:
                continue
            specs.append((coco[start], coco[end], LIMB_RGBA[limb]))
    return specs
