"""benchmarks/bench_pose.py's model stages run on the CPU with the stand-in models and say so."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the pose extra (onnxruntime) is not installed")
pytest.importorskip("cv2", reason="the pose extra (opencv-python-headless) is not installed")
pytest.importorskip("onnx", reason="the stand-in models need the onnx package")

import pose_models_fixtures as fx  # noqa: E402
from PIL import Image  # noqa: E402
from scail_win.io import video as video_io  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pose.py"


def test_model_stages_with_stand_ins(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_pose", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    video = video_io.write_video(fx.person_frames(3), tmp_path / "driving.mp4", 25)
    Image.fromarray(fx.person_frames(1)[0]).save(tmp_path / "ref.jpg")
    bench.main(["--stages", "detect", "dwpose", "nlf", "pipeline", "--stand-in", "--frames", "4",
                "--height", "64", "--width", "112", "--device", "cpu", "--pose-device", "cpu",
                "--video", str(video), "--reference-video", str(video)])
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()[2:]}
    for stage in ("YOLOX (CPU)", "DWPose (CPU)", "NLF (torch cpu, batch 16)", "pipeline"):
        assert stage in rows, out
        assert "stand-in models" in rows[stage]
    assert "a person in 4/4 frames" in rows["YOLOX (CPU)"]
    assert "mean |diff|" in out


def test_model_stages_skip_without_models(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_pose", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--stages", "detect", "--models", str(tmp_path), "--device", "cpu", "--pose-device", "cpu",
                "--height", "64", "--width", "112"])
    out = capsys.readouterr().out
    assert "skipped:" in out and "yolox_l.onnx" in out
