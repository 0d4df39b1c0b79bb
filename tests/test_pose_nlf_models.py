"""nlf.py (TorchScript loading, crops, batching) and models.py (folders, file checks)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch

import pose_models_fixtures as fx
from scail_win.errors import UserError
from scail_win.pose import models, nlf


class Recorder(torch.nn.Module):
    """Reports what it was given: joint 0 = (non-zero values, value sum, batch size)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images

    @torch.jit.export
    def detect_smpl_batched(self, images: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        out: List[torch.Tensor] = []
        for i in range(images.shape[0]):
            j = torch.zeros((1, 24, 3))
            j[0, 0, 0] = float((images[i] != 0).sum())
            j[0, 0, 1] = float(images[i].to(torch.float64).sum())
            j[0, 0, 2] = float(images.shape[0])
            out.append(j)
        return {"joints3d_nonparam": out}


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    path = tmp_path_factory.mktemp("nlf") / "recorder.torchscript"
    torch.jit.save(torch.jit.script(Recorder()), str(path))
    return nlf.load_nlf(path, "cpu")


def test_box_grown_by_the_nlf_margins_and_clipped():
    assert nlf.box_pixels([0.25, 0.25, 0.5, 0.75], 64, 112) == (25, 12, 59, 52)
    assert nlf.box_pixels([0.0, 0.0, 1.0, 1.0], 64, 112) == (0, 0, 112, 64)


def test_frame_masked_to_the_box(recorder):
    frames = torch.full((1, 64, 112, 3), 255, dtype=torch.uint8)
    joints = nlf.run_nlf(recorder, frames, [[[0.25, 0.25, 0.5, 0.75]]], "cpu", progress=False)
    seen = joints[0][0][0, 0]
    assert seen[0] == (59 - 25) * (52 - 12) * 3
    assert seen[1] == seen[0] * 255


def test_batches_regrouped_per_frame_and_box(recorder):
    frames = torch.stack([torch.full((32, 48, 3), t + 1, dtype=torch.uint8) for t in range(3)])
    full = [0.0, 0.0, 1.0, 1.0]
    boxes = [[full, full], [], [full, full, full]]
    joints = nlf.run_nlf(recorder, frames, boxes, "cpu", batch_size=2, progress=False)
    assert [len(j) for j in joints] == [2, 0, 3]
    pixels = 32 * 48 * 3
    for t, per_box in enumerate(joints):
        for arr in per_box:
            assert arr.shape == (1, 24, 3) and arr.dtype == np.float32
            assert arr[0, 0, 1] == pixels * (t + 1)
    # Five crops in batches of two: 2, 2, 1.
    assert [a[0, 0, 2] for per_box in joints for a in per_box] == [2, 2, 2, 2, 1]


def test_first_person_single_person_rules():
    person = fx.standing_person()
    people = nlf.first_person([[np.stack([person, person + 1])], [], [np.zeros((0, 24, 3), np.float32)]])
    np.testing.assert_array_equal(people[0][0], person)
    assert people[1] == []
    assert len(people[2]) == 1 and not people[2][0].any()


def test_stand_in_loads_and_finds_the_bright_person(tmp_path):
    model = nlf.load_nlf(fx.make_nlf(tmp_path / "nlf.torchscript"), "cpu")
    frames = torch.from_numpy(fx.person_frames(2))
    joints = nlf.run_nlf(model, frames, [[[0.3, 0.2, 0.7, 0.8]], [[0.0, 0.0, 0.1, 0.1]]], "cpu", progress=False)
    np.testing.assert_allclose(joints[0][0][0], fx.standing_person())
    assert joints[1][0].shape == (0, 24, 3)


def test_unloadable_nlf_names_the_file(tmp_path):
    bad = tmp_path / "nlf_l_multi_0.3.2.torchscript"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="nlf_l_multi_0.3.2.torchscript"):
        nlf.load_nlf(bad, "cpu")


def test_model_without_the_method_is_rejected(tmp_path):
    path = tmp_path / "plain.torchscript"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    with pytest.raises(UserError, match="detect_smpl_batched"):
        nlf.load_nlf(path, "cpu")


def test_missing_model_names_file_and_url(tmp_path):
    with pytest.raises(UserError) as err:
        models.check_models(tmp_path)
    text = str(err.value)
    assert "yolox_l.onnx" in text and "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx" in text
    assert "\n" not in text


@pytest.mark.parametrize("content, why", [(b"", "empty"),
                                          (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "LFS"),
                                          (b"<!DOCTYPE html><html>rate limited</html>", "text file")])
def test_broken_downloads_are_caught(tmp_path, content, why):
    fx.make_models(tmp_path)
    (tmp_path / models.NLF.relpath).write_bytes(content)
    with pytest.raises(UserError, match=why) as err:
        models.check_models(tmp_path)
    assert models.NLF.url in str(err.value)


def test_all_present(tmp_path):
    fx.make_models(tmp_path)
    found = models.check_models(tmp_path)
    assert found["nlf"] == tmp_path / "nlf_l_multi_0.3.2.torchscript"
    assert found["dwpose"] == tmp_path / "DWPose" / "dw-ll_ucoco_384.onnx"


def test_default_folder_order(tmp_path, monkeypatch):
    monkeypatch.delenv(models.ENV_VAR, raising=False)
    monkeypatch.setenv("SCAIL_WIN_CACHE", str(tmp_path / "cache"))
    scail = tmp_path / "SCAIL"
    monkeypatch.setenv("SCAIL_ROOT", str(scail))
    assert models.default_models_dir()[0] == tmp_path / "cache" / "pose-models"
    (scail / "SCAIL-Pose" / "pretrained_weights").mkdir(parents=True)
    assert models.default_models_dir()[0] == scail / "SCAIL-Pose" / "pretrained_weights"
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path / "mine"))
    assert models.default_models_dir()[0] == tmp_path / "mine"
    assert models.resolve_models_dir(None) == tmp_path / "mine"


def test_models_flag_must_be_a_folder(tmp_path):
    with pytest.raises(UserError, match="--models"):
        models.resolve_models_dir(tmp_path / "nope")


def test_crops_match_scail_pose_process_video_nlf(monkeypatch, recorder):
    """The masked frames NLF sees equal those of SCAIL-Pose's process_video_nlf (run on the CPU here)."""
    import ast
    import math

    import upstream_pose

    path = upstream_pose.root() / "NLFPoseExtract" / "extract_nlfpose_batch.py"
    node = next(n for n in ast.parse(path.read_text(encoding="utf-8")).body
                if isinstance(n, ast.FunctionDef) and n.name == "process_video_nlf")
    # Upstream pins everything to CUDA; the same code on the CPU.
    source = ast.unparse(node).replace(".cuda()", ".cpu()").replace("'cuda'", "'cpu'")
    source = source.replace("torch.cuda.empty_cache()", "None")
    namespace = {"torch": torch, "math": math}
    exec(compile(source, str(path), "exec"), namespace)
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(1, 256, (3, 40, 72, 3), dtype=np.uint8))
    boxes = [[[0.1, 0.2, 0.5, 0.9], [0.6, 0.0, 1.0, 0.4]], [], [[0.33, 0.41, 0.77, 0.52]]]
    theirs = namespace["process_video_nlf"](recorder, frames, boxes)
    ours = nlf.run_nlf(recorder, frames, boxes, "cpu", batch_size=2, progress=False)
    for frame_theirs, frame_ours in zip(theirs, ours):
        assert len(frame_theirs["nlfpose"]) == len(frame_ours)
        for a, b in zip(frame_theirs["nlfpose"], frame_ours):
            # Non-zero count and pixel sum of the masked frame (the batch size differs: 64 there).
            np.testing.assert_array_equal(a.numpy()[0, 0, :2], b[0, 0, :2])
