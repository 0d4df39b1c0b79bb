"""align.py: the exact camera solve (against scipy where installed), face scaling, the 2D shift."""
from __future__ import annotations

import numpy as np
import pytest

import pose_models_fixtures as fx
import upstream_pose
from scail_win.pose import align

H, W = 512, 896


def _coco(joints):
    mapping = {15: 0, 12: 1, 17: 2, 19: 3, 21: 4, 16: 5, 18: 6, 20: 7, 2: 8, 5: 9, 8: 10, 1: 11, 4: 12, 7: 13}
    out = np.zeros((18, 3))
    for src, dst in mapping.items():
        out[dst] = joints[src]
    return out


def _project(points, camera):
    return np.stack([camera[0, 0] * points[:, 0] / points[:, 2] + camera[0, 2],
                     camera[1, 1] * points[:, 1] / points[:, 2] + camera[1, 2]], -1)


def test_intrinsics_from_fov():
    camera = align.intrinsics_from_fov(H, W)
    focal = W / (2 * np.tan(np.deg2rad(27.5)))
    np.testing.assert_allclose(camera, [[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]])
    assert align.intrinsics_from_fov(W, H)[0, 0] == pytest.approx(focal)


def test_recovers_a_camera_inside_the_bounds():
    points = _coco(fx.standing_person())[[1, 0, 2, 3, 5, 6]]
    focal = align.intrinsics_from_fov(H, W)[0, 0]
    truth = np.array([[focal * 1.2, 0, W / 2 + 30], [0, focal * 1.2 * 0.9, H / 2 - 12], [0, 0, 1]])
    camera, m, s = align.solve_camera(points, focal, H, W, _project(points, truth), 8.0, 1.0)
    np.testing.assert_allclose(camera, truth, atol=1e-6)
    assert m == pytest.approx(1.2) and s == pytest.approx(0.9)


def test_bounds_hold_when_the_target_is_out_of_reach():
    points = _coco(fx.standing_person())[[1, 9, 10, 12, 13]]
    focal = align.intrinsics_from_fov(H, W)[0, 0]
    truth = np.array([[focal * 2.5, 0, W / 2], [0, focal * 2.5 * 1.5, H / 2], [0, 0, 1]])
    _, m, s = align.solve_camera(points, focal, H, W, _project(points, truth), 1.0, 4.0)
    assert align.M_BOUNDS[0] <= m <= align.M_BOUNDS[1] + 1e-12
    assert align.S_BOUNDS[0] - 1e-12 <= s <= align.S_BOUNDS[1] + 1e-12
    assert m == pytest.approx(1.4)


@pytest.mark.parametrize("weights, fn", [((8.0, 1.0), "solve_new_camera_params_central"),
                                         ((1.0, 4.0), "solve_new_camera_params_down")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_minimum_as_scail_pose_scipy_solve(monkeypatch, weights, fn, seed):
    upstream = upstream_pose.align3d(monkeypatch)
    rng = np.random.default_rng(seed)
    points = _coco(fx.standing_person())[[1, 0, 2, 3, 5, 6]] + rng.normal(0, 30, (6, 3))
    focal = align.intrinsics_from_fov(H, W)[0, 0]
    target = _project(points, align.intrinsics_from_fov(H, W)) * rng.uniform(0.8, 1.5, 2) + rng.normal(0, 20, (6, 2))
    ours, m, s = align.solve_camera(points, focal, H, W, target, *weights)
    theirs, their_m, their_s = getattr(upstream, fn)(points, focal, [H, W], target)

    def cost(camera):
        err = (_project(points, camera) - target) ** 2
        return weights[0] * err[0].sum() + weights[1] * err[1:].sum()

    # Exact here, iterative there: ours is never worse and lands on the same camera.
    assert cost(ours) <= cost(theirs) * (1 + 1e-9) + 1e-9
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.01)  # pixels


def _pose(face_scale=1.0, offset=(0.5, 0.5)):
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = np.stack([np.cos(angles), np.sin(angles)], -1) * 0.05 * face_scale + offset
    face[30] = offset
    body = np.tile(np.array(offset), (24, 1)) + np.linspace(0, 0.2, 24)[:, None]
    hands = np.tile(np.array(offset), (2, 21, 1)) + np.linspace(0, 0.05, 21)[None, :, None]
    return {"bodies": {"candidate": body[None].copy(), "subset": np.arange(24.0)[None]},
            "faces": face[None].copy(), "hands": hands.copy()}


def test_scale_faces_to_the_reference_size():
    poses = [_pose(1.0), _pose(1.0, (0.4, 0.6))]
    factor = align.scale_faces(poses, _pose(1.3))
    assert factor == pytest.approx(1.3)
    spread = np.linalg.norm(poses[1]["faces"][0] - poses[1]["faces"][0][30], axis=1)
    assert np.delete(spread, 30).mean() == pytest.approx(0.05 * 1.3)
    # Clipped to [0.8, 1.5].
    assert align.scale_faces([_pose(1.0)], _pose(3.0)) == pytest.approx(1.5)


def test_shift_follows_the_head_and_wrists():
    person = fx.standing_person()
    camera = align.intrinsics_from_fov(H, W)
    moved = camera.copy()
    moved[0, 2] += 40
    moved[1, 2] -= 20
    pose = _pose()
    before = {k: np.copy(pose[k]) for k in ("faces", "hands")}
    align.shift_to_camera([[person]], [pose], camera, moved, H, W, scale_x=1.0, scale_y=1.0)
    np.testing.assert_allclose(pose["faces"] - before["faces"], np.broadcast_to([40 / W, -20 / H], (1, 68, 2)))
    np.testing.assert_allclose(pose["hands"] - before["hands"], np.broadcast_to([40 / W, -20 / H], (2, 21, 2)))


def test_hands_scale_about_the_wrist():
    person = fx.standing_person()
    camera = align.intrinsics_from_fov(H, W)
    pose = _pose()
    wrist = pose["hands"][0, 0].copy()
    tip = pose["hands"][0, 20].copy()
    align.shift_to_camera([[person]], [pose], camera, camera, H, W, scale_x=2.0, scale_y=0.5)
    np.testing.assert_allclose(pose["hands"][0, 0], wrist)
    np.testing.assert_allclose(pose["hands"][0, 20], wrist + (tip - wrist) * [2.0, 0.5])


def test_first_person_poses_keeps_scail_pose_cut():
    two = _pose()
    two["faces"] = np.concatenate([two["faces"], two["faces"] + 1])
    two["hands"] = np.concatenate([two["hands"], two["hands"] + 1])
    cut = align.first_person_poses([two])[0]
    assert cut["faces"].shape == (1, 68, 2) and cut["hands"].shape == (2, 21, 2)
    assert cut["bodies"]["candidate"].shape == (1, 24, 2)


def test_align_steps_match_scail_pose(monkeypatch):
    """scale_faces, the first-person cut and the 2D shift as process_pose.py / nlf_render.py run them."""
    import copy

    import torch

    from scail_win.pose import nlf

    up = upstream_pose.functions(monkeypatch, "NLFPoseExtract/process_pose.py", ("scale_faces", "recollect_dwposes"))
    up.update(upstream_pose.functions(monkeypatch, "NLFPoseExtract/nlf_render.py",
                                      ("p3d_single_p2d", "scale_around_center", "shift_dwpose_according_to_nlf",
                                       "collect_smpl_poses")))
    rng = np.random.default_rng(3)

    def pose(people):
        faces = rng.uniform(0.2, 0.8, (people, 68, 2))
        faces[:, ::7] = -1  # hidden points take part upstream too
        return {"bodies": {"candidate": rng.uniform(0.2, 0.8, (people, 24, 2)),
                           "subset": np.tile(np.arange(24.0), (people, 1))},
                "faces": faces, "hands": rng.uniform(0.2, 0.8, (2 * people, 21, 2))}

    poses = [pose(2), pose(1), pose(2)]
    ref = pose(1)
    person = fx.standing_person()
    nlf_per_frame = [[np.stack([person, person * 1.01]), np.stack([person])], [np.zeros((0, 24, 3), np.float32)], []]
    camera = align.intrinsics_from_fov(H, W)
    moved = camera.copy()
    moved[0, 0] *= 1.1
    moved[1, 1] *= 1.1 * 0.95
    moved[0, 2] += 25

    theirs = copy.deepcopy(poses)
    their_scale = up["scale_faces"](theirs, [copy.deepcopy(ref)])
    theirs = up["recollect_dwposes"](theirs)
    data = [{"nlfpose": [torch.from_numpy(j) for j in per_box][:1]} for per_box in nlf_per_frame]
    up["shift_dwpose_according_to_nlf"](up["collect_smpl_poses"](data), theirs, camera, moved, H, W,
                                        scale_x=1.1, scale_y=1.1 * 0.95)

    ours = copy.deepcopy(poses)
    assert align.scale_faces(ours, copy.deepcopy(ref)) == pytest.approx(their_scale)
    ours = align.first_person_poses(ours)
    align.shift_to_camera(nlf.first_person(nlf_per_frame), ours, camera, moved, H, W, scale_x=1.1, scale_y=1.1 * 0.95)
    for a, b in zip(ours, theirs):
        for key in ("faces", "hands"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["bodies"]["candidate"], b["bodies"]["candidate"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a["bodies"]["subset"], b["bodies"]["subset"])
