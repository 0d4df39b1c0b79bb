"""``python -m scail_win pose`` end to end on a generated video with the stand-in models, and its errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the pose extra (onnxruntime) is not installed")
pytest.importorskip("cv2", reason="the pose extra (opencv-python-headless) is not installed")

import pose_models_fixtures as fx  # noqa: E402
from PIL import Image  # noqa: E402
from scail_win.io import video as video_io  # noqa: E402
from scail_win.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 5


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return fx.make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def inputs(tmp_path):
    driving = video_io.write_video(fx.person_frames(FRAMES), tmp_path / "driving.mp4", 25)
    ref = tmp_path / "character.jpg"
    Image.fromarray(fx.person_frames(1)[0]).save(ref, quality=95)
    return driving, ref


def _args(driving, ref, out, models, *extra):
    return ["pose", str(driving), "--ref", str(ref), "--out", str(out), "--models", str(models),
            "--resolution", "64", "112", "--pose-device", "cpu", "--quiet", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_command_writes_rendered_video_and_ref(tmp_path, inputs, stand_ins):
    driving, ref = inputs
    out = tmp_path / "examples" / "mine"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "scail_win", *_args(driving, ref, out, stand_ins)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = video_io.probe_video(out / "rendered.mp4")
    assert (info.frames, info.height, info.width, info.fps) == (FRAMES, 64, 112, 16.0)
    assert (out / "ref.jpg").read_bytes() == ref.read_bytes()
    frames, _ = video_io.read_video(out / "rendered.mp4")
    # Limbs were drawn (the background is black) and not everywhere.
    lit = (frames.numpy().max(axis=-1) > 40).mean()
    assert 0.01 < lit < 0.6


def test_align_and_portrait(tmp_path, stand_ins, capsys):
    portrait = np.ascontiguousarray(fx.person_frames(3, height=112, width=64))
    driving = video_io.write_video(portrait, tmp_path / "tall.mp4", 30)
    ref = tmp_path / "ref.png"
    Image.fromarray(portrait[0]).save(ref)
    out = tmp_path / "out"
    assert main(_args(driving, ref, out, stand_ins, "--align")) == 0, capsys.readouterr().err
    info = video_io.probe_video(out / "rendered_aligned.mp4")
    # Portrait input: the pose size is swapped, as process_pose.py does.
    assert (info.frames, info.height, info.width) == (3, 112, 64)
    assert (out / "ref.png").read_bytes() == ref.read_bytes()
    assert not (out / "rendered.mp4").exists()


def test_missing_model_names_it_and_where_to_get_it(tmp_path, inputs, stand_ins, capsys):
    models = tmp_path / "models"
    (models / "DWPose").mkdir(parents=True)
    for name in ("DWPose/yolox_l.onnx", "DWPose/dw-ll_ucoco_384.onnx"):
        (models / name).write_bytes((stand_ins / name).read_bytes())
    driving, ref = inputs
    assert main(_args(driving, ref, tmp_path / "out", models)) == 2
    line = _error_line(capsys)
    assert "nlf_l_multi_0.3.2.torchscript" in line
    assert "https://github.com/isarandi/nlf/releases/download/v0.3.2/nlf_l_multi_0.3.2.torchscript" in line
    assert not (tmp_path / "out").exists()


def test_unreadable_video(tmp_path, inputs, stand_ins, capsys):
    _, ref = inputs
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    assert main(_args(bad, ref, tmp_path / "out", stand_ins)) == 2
    assert "broken.mp4" in _error_line(capsys)


def test_no_person_found(tmp_path, inputs, stand_ins, capsys):
    _, ref = inputs
    dark = video_io.write_video(fx.person_frames(3, person=False), tmp_path / "empty.mp4", 25)
    assert main(_args(dark, ref, tmp_path / "out", stand_ins)) == 2
    line = _error_line(capsys)
    assert "no person found" in line and "empty.mp4" in line
    assert not (tmp_path / "out" / "rendered.mp4").exists()


def test_existing_output_is_never_overwritten(tmp_path, inputs, stand_ins, capsys):
    driving, ref = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "rendered.mp4").write_bytes(b"keep me")
    assert main(_args(driving, ref, out, stand_ins)) == 2
    assert "another --out" in _error_line(capsys)
    assert (out / "rendered.mp4").read_bytes() == b"keep me"
    assert not (out / "ref.jpg").exists()


def test_missing_extra_says_how_to_install(tmp_path, inputs, stand_ins, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    driving, ref = inputs
    assert main(_args(driving, ref, tmp_path / "out", stand_ins)) == 2
    line = _error_line(capsys)
    assert "pip install scail-win[pose]" in line and "onnxruntime-gpu" in line


def test_bad_flag_combination(inputs, stand_ins, tmp_path, capsys):
    driving, ref = inputs
    with pytest.raises(SystemExit) as exc:
        main(_args(driving, ref, tmp_path / "out", stand_ins)[:-1] + ["--quiet", "--resolution", "63", "112"])
    assert exc.value.code == 2
    assert "--resolution" in capsys.readouterr().err


def test_help_names_the_model_files_and_the_extra(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pose", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx", "nlf_l_multi_0.3.2.torchscript",
                   "pip install scail-win[pose]", "--align", "(default: auto)"):
        assert needle in text


def test_out_must_be_a_folder(tmp_path, inputs, stand_ins, capsys):
    driving, ref = inputs
    taken = tmp_path / "afile"
    taken.write_text("x")
    assert main(_args(driving, ref, taken, stand_ins)) == 2
    assert "--out" in _error_line(capsys)


@pytest.mark.gpu
def test_gpu_run_leaves_no_torch_memory(tmp_path, inputs, stand_ins):
    import torch

    from scail_win.pose.pipeline import PoseJob, run_pose

    driving, ref = inputs
    result = run_pose(PoseJob(driving=driving, ref=ref, out_dir=tmp_path / "out", models_dir=stand_ins,
                              resolution=(64, 112), pose_device="auto", progress=False))
    assert result.frames == FRAMES
    assert torch.cuda.memory_allocated() == 0
