"""bench_pose.py's model stages: YOLOX, DWPose, NLF and the whole ``scail-win pose`` job.

    python benchmarks/bench_pose.py --stages detect dwpose nlf [--models DIR | --stand-in]
                                    [--video DRIVING.mp4] [--pose-device auto] [--nlf-batch 16]
    python benchmarks/bench_pose.py --stages pipeline --video examples/001/driving.mp4
                                    --ref examples/001/ref.jpg --reference-video examples/001/rendered.mp4

Frames are the driving video (default: the SCAIL checkout's
examples/001/driving.mp4, else synthetic frames) resize-cropped exactly as
the pipeline does, repeated to --frames.  Models: the real files from
--models (default: the pipeline's default folder), or with --stand-in the
small test models of tests/pose_models_fixtures.py (same signatures,
meaningless weights: timings then say nothing about the real models; every
row says which were used).

"GPU MiB" for these stages is the device's memory in use, polled every 2 ms
while the stage runs (torch.cuda.mem_get_info: all allocations on the card,
onnxruntime's and the CUDA contexts included, other processes too), minus
nothing: it is the number the 4 GiB target is about.  ``pipeline`` runs
run_pose end to end into a temporary folder and, with --reference-video,
compares its frames with that video (e.g. SCAIL-Pose's own rendered.mp4 of
the same driving video): mean and max absolute difference (RGB, 0-255) and
the share of pixels off by more than 8.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

MiB = 1 << 20


class DevicePeak:
    """Peak memory in use on a CUDA device while the block runs (polled)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = device, interval, None
        self._stop = threading.Event()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            self.peak = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._used()) / MiB
        return False


def add_arguments(parser):
    parser.add_argument("--models", help="folder of the real pose models (default: the pipeline's default folder)")
    parser.add_argument("--stand-in", action="store_true",
                        help="use the small test models instead of the real ones (timings meaningless)")
    parser.add_argument("--video", help="driving video for the model stages (default: SCAIL's examples/001/driving.mp4)")
    parser.add_argument("--ref", help="reference image for --stages pipeline with --align")
    parser.add_argument("--align", action="store_true", help="--stages pipeline: run with --align")
    parser.add_argument("--reference-video", help="--stages pipeline: compare our rendered.mp4 with this video")
    parser.add_argument("--pose-device", default="auto", choices=("auto", "cuda", "directml", "cpu"))
    parser.add_argument("--nlf-batch", type=int, default=16)


def _models(args) -> tuple[Path, str]:
    from scail_win.pose import models

    if args.stand_in:
        if getattr(args, "_stand_in_dir", None) is None:
            import pose_models_fixtures

            args._stand_in_dir = Path(tempfile.mkdtemp(prefix="pose-stand-ins-"))
            pose_models_fixtures.make_models(args._stand_in_dir)
        return args._stand_in_dir, "stand-in models"
    return models.resolve_models_dir(args.models), "real models"


def _video(args) -> Path | None:
    if args.video:
        return Path(args.video)
    root = os.environ.get("SCAIL_ROOT")
    example = Path(root) / "examples" / "001" / "driving.mp4" if root else None
    return example if example and example.is_file() else None


def _frames(args) -> tuple[torch.Tensor, str]:
    from scail_win.pose import pipeline

    video = _video(args)
    if video is None:
        import pose_models_fixtures

        frames = torch.from_numpy(pose_models_fixtures.person_frames(1, args.height, args.width))
        source = "synthetic frames"
    else:
        frames, _ = pipeline.read_frames(video, (args.height, args.width))
        source = video.name
    reps = -(-args.frames // frames.shape[0])
    return frames.repeat(reps, 1, 1, 1)[:args.frames].contiguous(), source


def _detector(args, files):
    from scail_win.pose import detect

    return detect.WholebodyDetector(files["yolox"], files["dwpose"], detect.choose_providers(args.pose_device))


def _row(device, **row):
    if device.type == "cuda":
        row["note"] += "; peak = memory in use on the whole card"
    return row


def _timed(fn, device):
    with DevicePeak(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, peak.peak, result


def _setup(args):
    from scail_win.pose import models, pipeline

    folder, which = _models(args)
    files = models.check_models(folder)
    frames, source = _frames(args)
    device = pipeline.torch_device(args.pose_device)
    return files, frames, f"{which}, {source}", device


def stage_detect(args, device):
    files, frames, note, torch_dev = _setup(args)
    detector = _detector(args, files)
    bgr = [np.ascontiguousarray(f.numpy()[..., ::-1]) for f in frames]
    [detector.boxes(b) for b in bgr[:2]]
    seconds, peak, boxes = _timed(lambda: [detector.boxes(b) for b in bgr], torch_dev)
    found = sum(len(b) > 0 for b in boxes)
    args._boxes = boxes
    return [_row(torch_dev, stage=f"YOLOX ({detector.det.get_providers()[0][:-17]})", frames=len(bgr),
                 seconds=seconds, peak=peak, note=f"{note}; a person in {found}/{len(bgr)} frames")]


def stage_dwpose(args, device):
    files, frames, note, torch_dev = _setup(args)
    detector = _detector(args, files)
    bgr = [np.ascontiguousarray(f.numpy()[..., ::-1]) for f in frames]
    boxes = getattr(args, "_boxes", None) or [detector.boxes(b) for b in bgr]
    detector.keypoints(bgr[0], boxes[0])
    seconds, peak, _ = _timed(lambda: [detector.keypoints(b, k) for b, k in zip(bgr, boxes)], torch_dev)
    crops = sum(max(len(k), 1) for k in boxes)
    return [_row(torch_dev, stage=f"DWPose ({detector.pose.get_providers()[0][:-17]})", frames=len(bgr),
                 seconds=seconds, peak=peak, note=f"{note}; {crops} crops")]


def stage_nlf(args, device):
    from scail_win.pose import nlf

    files, frames, note, torch_dev = _setup(args)
    boxes = getattr(args, "_boxes", None)
    if boxes is None:
        detector = _detector(args, files)
        boxes = [[list(map(float, b)) for b in detector(f.numpy()).boxes] for f in frames]
        del detector
    else:
        height, width = frames.shape[1:3]
        boxes = [[[b[0] / width, b[1] / height, b[2] / width, b[3] / height] for b in k] for k in boxes]
    if not any(boxes):
        return [dict(stage="NLF", note=f"skipped: YOLOX found nobody ({note})")]
    model = nlf.load_nlf(files["nlf"], torch_dev)
    nlf.run_nlf(model, frames[:2], boxes[:2], torch_dev, batch_size=args.nlf_batch, progress=False)
    if torch_dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, peak, _ = _timed(lambda: nlf.run_nlf(model, frames, boxes, torch_dev, batch_size=args.nlf_batch,
                                                  progress=False), torch_dev)
    torch_peak = f", torch peak {torch.cuda.max_memory_allocated() / MiB:.0f} MiB" if torch_dev.type == "cuda" else ""
    return [_row(torch_dev, stage=f"NLF (torch {torch_dev.type}, batch {args.nlf_batch})", frames=len(frames),
                 seconds=seconds, peak=peak, note=f"{note}{torch_peak}")]


def stage_pipeline(args, device):
    from scail_win.io import video as video_io
    from scail_win.pose import pipeline

    folder, which = _models(args)
    video = _video(args)
    if video is None:
        return [dict(stage="pipeline", note="skipped: give --video (or SCAIL_ROOT with examples/001)")]
    ref = Path(args.ref) if args.ref else video.with_name("ref.jpg")
    out = Path(tempfile.mkdtemp(prefix="pose-bench-")) / "example"
    job = pipeline.PoseJob(driving=video, ref=ref, out_dir=out, models_dir=folder, align=args.align,
                           resolution=(args.height, args.width), pose_device=args.pose_device,
                           nlf_batch=args.nlf_batch, progress=False)
    torch_dev = pipeline.torch_device(args.pose_device)
    seconds, peak, result = _timed(lambda: pipeline.run_pose(job), torch_dev)
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    rows = [_row(torch_dev, stage="pipeline" + (" --align" if args.align else ""), frames=result.frames,
                 seconds=seconds, peak=peak, note=f"{which}, {video.name}; {parts}")]
    if args.reference_video:
        ours, _ = video_io.read_video(result.video)
        theirs, _ = video_io.read_video(args.reference_video)
        if ours.shape != theirs.shape:
            rows.append(dict(stage="vs reference video", note=f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}"))
        else:
            diff = (ours.to(torch.int16) - theirs.to(torch.int16)).abs()
            rows.append(dict(stage="vs reference video",
                             note=f"{Path(args.reference_video).name}: mean |diff| {diff.float().mean():.3f}, "
                                  f"max {int(diff.max())}, {100 * (diff.amax(-1) > 8).float().mean():.3f}% "
                                  f"of pixels off by > 8"))
    return rows


def _skipping(stage, name):
    """The stage, or one "skipped" row saying why (missing models or extra, no video)."""
    from scail_win.errors import UserError

    def run(args, device):
        try:
            return stage(args, device)
        except UserError as exc:
            return [dict(stage=name, note=f"skipped: {exc}")]
    return run


MODEL_STAGES = {"detect": _skipping(stage_detect, "YOLOX"), "dwpose": _skipping(stage_dwpose, "DWPose"),
                "nlf": _skipping(stage_nlf, "NLF"), "pipeline": _skipping(stage_pipeline, "pipeline")}
