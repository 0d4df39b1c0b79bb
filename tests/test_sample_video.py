"""scail_win.sample_video's batch handling, without SCAIL's classes: failures and the summary."""
import types
from pathlib import Path

import torch

from scail_win import pipeline, sample_video
from scail_win.errors import UserError
from scail_win.io.jobs import Job
from scail_win.phases import Phase


def fake_model(phase, budget_gb=6.0):
    plan = types.SimpleNamespace(budget_gb=budget_gb)
    return types.SimpleNamespace(current_phase=phase, memory_plan=plan)


def test_out_of_memory_names_the_phase_and_what_would_fit():
    text = sample_video.out_of_memory_message(fake_model(Phase.VAE_DECODE), None)
    assert text.startswith("out of GPU memory during VAE decoding; try --vae-tiling on")
    assert "--vram-budget 5 (now 6.0)" in text and "no output was written" in text
    text = sample_video.out_of_memory_message(fake_model("denoise", None), None)
    assert "during denoising" in text and "--blocks-on-gpu 0" in text


def test_a_batch_goes_on_after_a_failure_and_summarizes(monkeypatch, tmp_path, caplog):
    jobs = [Job("a", Path("one")), Job("b", Path("two")), Job("c", Path("three"))]

    def run_one(model, job, args, cache):
        if job.prompt == "a":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if job.prompt == "b":
            raise UserError("two: pose video unreadable")
        out = tmp_path / "three.mp4"
        out.write_bytes(b"video")
        return out

    monkeypatch.setattr(pipeline, "run_job", run_one)
    model = fake_model("denoise")
    with caplog.at_level("INFO", logger="scail_win.sample_video"):
        results = sample_video.run_batch(model, jobs, types.SimpleNamespace(), None)
        assert sample_video.summarize(results) == 1
    assert [r.error is None for r in results] == [False, False, True]
    assert "during denoising" in results[0].error and results[1].error == "two: pose video unreadable"
    assert "1 succeeded, 2 failed" in caplog.text
    assert sample_video.summarize(results[2:]) == 0
