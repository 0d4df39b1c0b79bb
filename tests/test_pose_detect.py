"""detect.py: YOLOX + DWPose through onnxruntime's CPU provider on stand-in models with the real signatures."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the pose extra (onnxruntime) is not installed")
pytest.importorskip("cv2", reason="the pose extra (opencv-python-headless) is not installed")

import pose_models_fixtures as fx  # noqa: E402
import upstream_pose  # noqa: E402
from scail_win.errors import UserError  # noqa: E402
from scail_win.pose import detect  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return fx.make_models(tmp_path_factory.mktemp("pose-models"))


@pytest.fixture(scope="module")
def detector(models):
    return detect.WholebodyDetector(models / "DWPose" / "yolox_l.onnx", models / "DWPose" / "dw-ll_ucoco_384.onnx",
                                    detect.choose_providers("cpu"))


def test_yolox_box_decoded_nms_and_class_filter(detector):
    frame = fx.person_frames(1)[0]
    boxes = detector.boxes(np.ascontiguousarray(frame[..., ::-1]))
    ratio = min(640 / 64, 640 / 112)
    cx, cy, w, h = fx.PERSON_BOX_640
    expected = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]]) / ratio
    # One box: the weaker overlapping one is suppressed, the car is not a person.
    assert boxes.shape == (1, 4)
    np.testing.assert_allclose(boxes, expected, rtol=1e-5)


def test_dark_frame_has_no_box_but_is_posed_whole(detector):
    result = detector(fx.person_frames(1, person=False)[0])
    assert result.boxes == []
    # Upstream poses the whole frame when YOLOX finds nobody.
    assert result.pose["faces"].shape == (1, 68, 2)


def test_simcc_keypoints_mapped_back_through_the_box(detector):
    frame = fx.person_frames(1)[0]
    bgr = np.ascontiguousarray(frame[..., ::-1])
    boxes = detector.boxes(bgr)
    keypoints, scores = detector.keypoints(bgr, boxes)
    xbin, ybin, score = fx.dwpose_peaks()
    center, scale = detect.box_center_scale(boxes[0])
    scale = detect.fit_aspect(scale, fx.DW_IN[0] / fx.DW_IN[1])
    expected = np.stack([xbin, ybin], -1) / 2.0 / np.array(fx.DW_IN) * scale + center - scale / 2
    np.testing.assert_allclose(keypoints[0], expected, rtol=1e-6)
    np.testing.assert_allclose(scores[0], score, rtol=1e-6)


def test_dwpose_dict_layout(detector):
    frame = fx.person_frames(1)[0]
    result = detector(frame)
    pose = result.pose
    assert pose["bodies"]["candidate"].shape == (1, 24, 2)
    assert pose["bodies"]["subset"].shape == (1, 24)
    assert pose["faces"].shape == (1, 68, 2) and pose["hands"].shape == (2, 21, 2)
    subset = pose["bodies"]["subset"][0]
    # Visible body points carry their index, hidden ones -1.
    assert set(subset[subset >= 0].astype(int)) | set(np.where(subset < 0)[0]) == set(range(24))
    assert (subset == -1).sum() >= 1
    # Hidden face/hand points (score 0.1 in the stand-in) are -1. The neck
    # inserted at 17 moves wholebody point k to k + 1: point 40 is face point
    # 41 - 24, point 120 is point 121 - 113 of the second hand.
    assert np.all(pose["faces"][0, 41 - 24] == -1)
    assert np.all(pose["hands"][1, 121 - 113] == -1)
    assert np.all(pose["faces"][0, 0] != -1)
    assert np.all((pose["faces"][0] >= -1) & (pose["faces"][0] <= 2))


def test_neck_is_the_shoulders_mean(detector):
    frame = fx.person_frames(1)[0]
    bgr = np.ascontiguousarray(frame[..., ::-1])
    boxes = detector.boxes(bgr)
    keypoints, scores = detector.keypoints(bgr, boxes)
    pose, _ = detect.to_dwpose_dict(keypoints, scores, boxes, 64, 112)
    neck = (keypoints[0, 5] + keypoints[0, 6]) / 2 / np.array([112, 64])
    np.testing.assert_allclose(pose["bodies"]["candidate"][0, 1], neck)


def test_missing_provider_is_one_clear_error():
    import onnxruntime

    if "DmlExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has DirectML")
    with pytest.raises(UserError, match="onnxruntime-directml"):
        detect.choose_providers("directml")


def test_auto_provider_ends_with_cpu():
    providers = detect.choose_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"


def test_broken_onnx_file_names_it(tmp_path):
    bad = tmp_path / "yolox_l.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    with pytest.raises(UserError, match="yolox_l.onnx"):
        detect.open_session(bad, ["CPUExecutionProvider"])


def test_matches_scail_pose_detector(monkeypatch, models, detector):
    """Same boxes, keypoints and dict as SCAIL-Pose's DWposeDetector on the same ONNX sessions."""
    from PIL import Image

    upstream = upstream_pose.dwpose(monkeypatch)
    wholebody = upstream.Wholebody.__new__(upstream.Wholebody)
    wholebody.session_det, wholebody.session_pose, wholebody.use_batch = detector.det, detector.pose, False
    theirs = upstream.DWposeDetector()
    theirs.pose_estimation = wholebody
    for frame in (fx.person_frames(1)[0], fx.person_frames(1, person=False)[0]):
        pose, score, boxes = theirs(Image.fromarray(frame))
        ours = detector(frame)
        np.testing.assert_allclose(np.array(ours.boxes).reshape(-1, 4), np.array(boxes).reshape(-1, 4))
        for key in ("candidate", "subset"):
            np.testing.assert_array_equal(ours.pose["bodies"][key], pose["bodies"][key])
        np.testing.assert_array_equal(ours.pose["faces"], pose["faces"])
        np.testing.assert_array_equal(ours.pose["hands"], pose["hands"])


def test_preprocessing_matches_scail_pose(monkeypatch):
    """Letterbox and the DWPose affine crop give SCAIL-Pose's exact model inputs on a noisy image."""
    upstream = upstream_pose.dwpose(monkeypatch)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)
    theirs, their_ratio = upstream.onnxdet.preprocess(image, (640, 640))
    ours, ratio = detect.letterbox(image)
    assert ratio == their_ratio
    np.testing.assert_array_equal(ours, theirs)
    box = [20.5, 10.25, 90.0, 85.5]
    crops, centers, scales = upstream.onnxpose.preprocess(image, [box], (288, 384))
    crop, center, scale = detect.crop_for_pose(image, box, (288, 384))
    np.testing.assert_array_equal(crop, np.asarray(crops[0].transpose(2, 0, 1), np.float32))
    np.testing.assert_array_equal(center, centers[0])
    np.testing.assert_array_equal(scale, scales[0])
