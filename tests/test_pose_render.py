"""The pose renderer: skeleton tables, capsule render, 2D overlay and their composition.

Golden properties run everywhere on small frames; the comparisons with
SCAIL-Pose's own Taichi renderer and OpenCV drawing need a SCAIL-Pose
checkout named by SCAIL_POSE_ROOT (and taichi / matplotlib) and skip without.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pose_fixtures import dwpose_frame, project, walking_person
from scail_win.pose import render, skeleton

SCAIL_POSE_ROOT = os.environ.get("SCAIL_POSE_ROOT")
needs_scail_pose = pytest.mark.skipif(not SCAIL_POSE_ROOT, reason="needs a SCAIL-Pose checkout: set SCAIL_POSE_ROOT")
log = logging.getLogger(__name__)

# 1/4 of SCAIL's 512x896 pose video, with the capsule radius scaled to match.
H, W = 128, 224
RADIUS = 21.5 * 896 / W


def fov_intrinsics(height, width, fov_degrees=55.0):
    focal = max(height, width) / (math.tan(math.radians(fov_degrees) / 2) * 2)
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])


K = fov_intrinsics(H, W)


def render_specs(specs, height=H, width=W, intrinsics=K, **kw):
    return render.render_cylinders(specs, height, width, intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2],
                                   intrinsics[1, 2], radius=kw.pop("radius", RADIUS), **kw)


def person_specs(frames=3):
    a, b = walking_person(frames), walking_person(frames, depth=4200, x_offset=600)
    return [skeleton.cylinder_specs([a[i], b[i]]) for i in range(frames)]


# --- skeleton ---------------------------------------------------------------

def test_coco_mapping_puts_smpl_joints_in_openpose_slots():
    joints = np.arange(72, dtype=np.float32).reshape(24, 3) + 1
    coco = skeleton.smpl_to_coco18(joints)
    assert coco.shape == (18, 3)
    np.testing.assert_array_equal(coco[0], joints[15])  # head -> nose
    np.testing.assert_array_equal(coco[2], joints[17])  # right shoulder
    np.testing.assert_array_equal(coco[13], joints[7])  # left ankle
    assert not coco[14:].any()  # no SMPL eyes or ears


def test_specs_of_one_person_follow_draw_order_and_colours():
    joints = walking_person(1)[0]
    specs = skeleton.cylinder_specs([joints])
    drawn = [limb for limb in skeleton.DRAW_ORDER if limb < 13]  # face limbs need eyes/ears
    assert len(specs) == len(drawn) == 13
    coco = skeleton.smpl_to_coco18(joints)
    for (start, end, rgba), limb in zip(specs, drawn):
        np.testing.assert_array_equal(start, coco[skeleton.LIMB_SEQ[limb][0]])
        np.testing.assert_array_equal(end, coco[skeleton.LIMB_SEQ[limb][1]])
        assert rgba == skeleton.LIMB_RGBA[limb]
    assert specs[0][2] == (1.0, 0.15, 0.15, 0.8)  # neck -> right shoulder: red, lifted by c/300 + 0.15


def test_missing_person_and_missing_joint_draw_nothing():
    assert skeleton.cylinder_specs([np.zeros((24, 3))]) == []
    joints = walking_person(1)[0]
    joints[21] = 0  # right wrist lost: the right forearm goes, the rest stays
    specs = skeleton.cylinder_specs([joints, np.zeros((24, 3))])
    assert len(specs) == 12 and skeleton.LIMB_RGBA[3] not in [s[2] for s in specs]
    with pytest.raises(ValueError, match=r"\(24, 3\)"):
        skeleton.cylinder_specs([np.zeros((17, 3))])


# --- 3D render --------------------------------------------------------------

def test_nearer_limb_occludes_farther_one():
    red, blue = skeleton.LIMB_RGBA[0], skeleton.LIMB_RGBA[9]
    across = (np.array([-300, 0, 1000], np.float32), np.array([300, 0, 1000], np.float32))
    down = (np.array([0, -300, 1400], np.float32), np.array([0, 300, 1400], np.float32))
    for near_first in (True, False):
        specs = [[(*across, red), (*down, blue)]] if near_first else [[(*down, blue), (*across, red)]]
        frame = render_specs(specs)[0].astype(int)
        centre = frame[H // 2, W // 2]
        assert centre[0] > centre[2] + 50, centre  # the red bar in front wins, whatever the list order
        above = frame[H // 2 - 20, W // 2]
        assert above[2] > above[0] + 50, above  # the blue bar shows where it is alone


def test_limb_pixels_have_their_colour_family_and_background_is_zero():
    specs = skeleton.cylinder_specs([walking_person(1)[0]])
    frames = render_specs([[spec] for spec in specs])  # one limb per frame
    table = np.array(skeleton.LIMB_RGBA)[:, :3]
    for frame, (_, _, rgba) in zip(frames, specs):
        hit = frame[..., 3] > 0
        assert hit.sum() > 20
        assert (frame[hit, 3] == 204).all()  # alpha 0.8
        assert not frame[~hit].any()  # background RGBA 0
        # A lit pixel is colour * shade + white highlight (both >= 0); fit both per
        # pixel to every table colour: the limb's own colour must fit best.
        px = frame[hit & (frame[..., :3].max(-1) < 250), :3].astype(np.float64) / 255
        assert len(px) > 10
        residuals = []
        for colour in table:
            basis = np.stack([colour, np.ones(3)], axis=1)
            coef, *_ = np.linalg.lstsq(basis, px.T, rcond=None)
            plausible = (coef[0] > 0).all() and (coef[1] > -2 / 255).all()
            residuals.append(np.abs(basis @ coef - px.T).max() if plausible else np.inf)
        best = table[int(np.argmin(residuals))]
        np.testing.assert_allclose(best, rgba[:3])
        assert min(residuals) < 3 / 255


def test_render_is_deterministic_and_independent_of_batching(monkeypatch):
    specs = person_specs(3)
    first = render_specs(specs)
    np.testing.assert_array_equal(first, render_specs(specs))
    np.testing.assert_array_equal(first, render_specs(specs, batch=1))
    monkeypatch.setattr(render, "CHUNK_ELEMENTS", 26 * 2000)  # a pool of 2000 rays, refilled often
    np.testing.assert_array_equal(first, render_specs(specs, batch=2))


def test_skipping_far_rays_changes_no_pixel(monkeypatch):
    specs = person_specs(2)
    culled = render_specs(specs)

    def every_ray(rays, scene, batch_frames, radius):
        pixels = torch.arange(rays.shape[0]).repeat(batch_frames)
        frames = torch.arange(batch_frames).repeat_interleave(rays.shape[0])
        return frames, pixels

    monkeypatch.setattr(render, "_candidates", every_ray)
    np.testing.assert_array_equal(culled, render_specs(specs))


def test_empty_frames_are_black():
    specs = person_specs(2)
    frames = render_specs([[], specs[0], skeleton.cylinder_specs([np.zeros((24, 3))])])
    assert not frames[0].any() and not frames[2].any() and frames[1].any()
    assert not render_specs([[], []]).any()
    assert render_specs([]).shape == (0, H, W, 4)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    specs = person_specs(3)
    cpu = render_specs(specs).astype(int)
    gpu = render_specs(specs, device="cuda").astype(int)
    diff = np.abs(cpu - gpu)
    assert ((cpu[..., 3] > 0) != (gpu[..., 3] > 0)).mean() < 1e-3
    assert diff.mean() < 0.1, diff.mean()


def load_taichi_reference(monkeypatch):
    """SCAIL-Pose's render_3d/taichi_cylinder.py, its ti.init(arch=ti.cuda) turned into ti.cpu."""
    ti = pytest.importorskip("taichi")
    path = Path(SCAIL_POSE_ROOT) / "render_3d" / "taichi_cylinder.py"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    real_init = ti.init
    monkeypatch.setattr(ti, "init", lambda *a, **kw: real_init(arch=ti.cpu))
    if importlib.util.find_spec("imageio") is None:  # imported but unused by render_whole
        monkeypatch.setitem(sys.modules, "imageio", types.ModuleType("imageio"))
    spec = importlib.util.spec_from_file_location("scail_pose_taichi_cylinder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_scail_pose
def test_matches_scail_pose_taichi_renderer(monkeypatch):
    reference = load_taichi_reference(monkeypatch)
    specs = person_specs(3)
    # SCAIL's camera, and a shifted non-square one as --align produces.
    shifted = K.copy()
    shifted[0, 0] *= 1.1
    shifted[:2, 2] += (9.5, -6.25)
    for intrinsics in (K, shifted):
        fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
        theirs = np.stack(reference.render_whole(specs, H=H, W=W, fx=fx, fy=fy, cx=cx, cy=cy, radius=RADIUS))
        ours = render_specs(specs, intrinsics=intrinsics)
        diff = np.abs(theirs.astype(int) - ours.astype(int))
        coverage = ((theirs[..., 3] > 0) != (ours[..., 3] > 0)).mean()
        log.warning("vs Taichi: mean |diff| %.4f, max %d, pixels off by > 8: %.4f%%, coverage mismatch %.4f%%",
                    diff.mean(), diff.max(), 100 * (diff.max(-1) > 8).mean(), 100 * coverage)
        assert coverage < 2e-4
        assert diff.mean() < 0.1
        assert (diff.max(-1) > 8).mean() < 1e-3  # big differences only where two limbs tie at a joint


# --- 2D overlay -------------------------------------------------------------

def face_and_hands(height, width):
    face = np.stack([np.linspace(0.4, 0.6, 68) * width, np.full(68, 0.3 * height)], axis=1)
    right = np.stack([np.linspace(0.2, 0.3, 21) * width, np.linspace(0.5, 0.7, 21) * height], axis=1)
    left = right + [0.5 * width, 0]
    return face, right, left


def test_overlay_draws_given_face_and_hand_points_and_skips_missing_ones():
    from scail_win.pose import draw2d

    pytest.importorskip("cv2")
    height, width = 512, 896
    face, right, left = face_and_hands(height, width)
    frame = draw2d.draw_frame(dwpose_frame(face, [right, None], height, width), height, width)
    for i, (x, y) in enumerate(face.astype(int)):
        if 17 <= i < 27 or i >= 36:  # brows, eyes, nose, mouth; not the jaw
            assert tuple(frame[y, x]) == (255, 255, 255), i
        elif i % 4 == 0:
            assert tuple(frame[y, x]) != (255, 255, 255), i
    for x, y in right.astype(int):
        assert tuple(frame[y, x]) == (0, 0, 255)  # DWPose hand dots are blue
    lx, ly = left.astype(int).T
    assert not frame[ly.min() - 3:ly.max() + 3, lx.min() - 3:lx.max() + 3].any()  # the -1 hand
    assert not draw2d.draw_frame(dwpose_frame(None, None, height, width), height, width).any()


def test_overlay_cheek_needs_visible_nose_eyes_ears():
    from scail_win.pose import draw2d

    pytest.importorskip("cv2")
    height, width = 256, 448
    body = np.zeros((24, 2))
    body[0] = (200, 100)  # nose
    body[14:18] = [(190, 92), (210, 92), (178, 96), (222, 96)]  # eyes, ears
    body[2] = (150, 160)  # a shoulder: never drawn with the body hidden
    visible = draw2d.draw_frame(dwpose_frame(None, None, height, width, body, [0, 2, 14, 15, 16, 17]),
                                height, width)
    assert tuple(visible[100, 200]) == (255, 0, 0)  # nose dot, OpenPose red, drawn after the 60% dim
    assert visible[92, 190].any() and not visible[160, 150].any()
    low_score = draw2d.draw_frame(dwpose_frame(None, None, height, width, body, [2]), height, width)
    assert not low_score.any()


def load_scail_pose_draw():
    """SCAIL-Pose's draw_pose with its pose_draw.draw_utils (the draw_pose function compiled alone)."""
    pytest.importorskip("cv2")
    pytest.importorskip("matplotlib")
    root = Path(SCAIL_POSE_ROOT) / "pose_draw"
    spec = importlib.util.spec_from_file_location("scail_pose_draw_utils", root / "draw_utils.py")
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    source = (root / "draw_pose_utils.py").read_text(encoding="utf-8")
    body = [n for n in ast.parse(source).body if getattr(n, "name", None) == "draw_pose"]
    import cv2

    namespace = dict(np=np, cv2=cv2, util=util)
    exec(compile(ast.Module(body=body, type_ignores=[]), "draw_pose_utils.py", "exec"), namespace)
    return namespace["draw_pose"]


@needs_scail_pose
def test_overlay_matches_scail_pose_drawing():
    from scail_win.pose import draw2d

    draw_pose = load_scail_pose_draw()
    height, width = 512, 896
    rng = np.random.default_rng(0)
    face, right, left = face_and_hands(height, width)
    body = rng.uniform(0.2, 0.8, (24, 2)) * [width, height]
    poses = [dwpose_frame(face + rng.normal(0, 3, face.shape), [right, left], height, width, body,
                          [0, 1, 2, 14, 15, 16, 17]),
             dwpose_frame(None, [None, left], height, width, body, [0, 14, 16])]
    # A second person in the same frame: SCAIL-Pose adds the canvases.
    two = dwpose_frame(face * 0.8, [left * 0.9, right], height, width, body * 0.9, list(range(24)))
    poses.append({"bodies": {k: np.concatenate([poses[0]["bodies"][k], two["bodies"][k]])
                             for k in ("candidate", "subset")},
                  "faces": np.concatenate([poses[0]["faces"], two["faces"]]),
                  "hands": np.concatenate([poses[0]["hands"], two["hands"]])})
    as_float32 = lambda pose: {"bodies": {k: v.astype(np.float32) for k, v in pose["bodies"].items()},  # noqa: E731
                               "faces": pose["faces"].astype(np.float32), "hands": pose["hands"].astype(np.float32)}
    for pose in poses + [as_float32(pose) for pose in poses]:  # DWPose itself gives float32
        theirs = draw_pose(pose, height, width, show_body=False, show_cheek=True, dw_hand=True, optimized_face=True)
        np.testing.assert_array_equal(draw2d.draw_frame(pose, height, width), theirs)


# --- composition ------------------------------------------------------------

def test_pose_video_overlays_2d_per_channel_and_drops_alpha():
    pytest.importorskip("cv2")
    from scail_win.pose import compose, draw2d

    joints = np.stack([walking_person(2)], axis=1)  # (T, persons, 24, 3)
    wrist = project(joints[0, 0, 21], K)
    hand = np.tile(wrist, (21, 1)) + np.linspace(0, 20, 21)[:, None]
    poses = [dwpose_frame(None, [hand, None], H, W) for _ in range(2)]
    video = compose.render_pose_video(joints, poses, K, H, W, radius=RADIUS)
    assert video.shape == (2, H, W, 3) and video.dtype == np.uint8
    rgba = render_specs([skeleton.cylinder_specs(j) for j in joints])
    overlay = draw2d.draw_overlay(poses, H, W)
    expected = rgba[..., :3].copy()
    expected[overlay != 0] = overlay[overlay != 0]
    np.testing.assert_array_equal(video, expected)
    # A blue hand dot over a limb keeps that limb's red and green.
    over_limb = (overlay[0] == (0, 0, 255)).all(-1) & (rgba[0, ..., 3] > 0)
    assert over_limb.any()
    assert (video[0][over_limb][:, :2] == rgba[0][over_limb][:, :2]).all()
    np.testing.assert_array_equal(compose.render_pose_video(joints, None, K, H, W, radius=RADIUS), rgba[..., :3])


def test_pose_video_rejects_a_bad_camera_or_mismatched_frames():
    from scail_win.pose import compose

    joints = walking_person(2)[:, None]
    with pytest.raises(ValueError, match="3x3"):
        compose.render_pose_video(joints, None, np.eye(4), H, W)
    with pytest.raises(ValueError, match="2 frames of joints but 1 of DWPose"):
        compose.render_pose_video(joints, [dwpose_frame(None, None, H, W)], K, H, W)


# --- benchmark ----------------------------------------------------------------

def test_bench_pose_render_stage_prints_its_table(capsys):
    pytest.importorskip("cv2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_pose

    bench_pose.main(["--stages", "render", "--device", "cpu", "--frames", "2", "--height", "48", "--width", "84",
                     "--scail-pose-root", ""])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scail-win pose stages at 48x84 on CPU")
    assert lines[1].split()[:4] == ["stage", "frames", "seconds", "frames/s"]
    rows = {line[:32].strip(): line[32:].split() for line in lines[2:]}
    assert set(rows) == {"render 3D (ours)", "render 3D + 2D (ours)"}
    assert all(float(cells[2]) > 0 and cells[3] == "-" for cells in rows.values())
