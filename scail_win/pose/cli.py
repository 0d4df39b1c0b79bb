"""``scail-win pose DRIVING.mp4 --ref REF.jpg --out DIR``: SCAIL's pose video from a driving video."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from scail_win.cli.support import HelpFormatter, run_cli, setup_logging

log = logging.getLogger("scail_win")

EPILOG = """\
Writes DIR/rendered.mp4 (DIR/rendered_aligned.mp4 with --align) and copies
the reference there as ref.jpg or ref.png, so that
`scail-win sample --input-dir DIR` can follow. Nothing is overwritten.

Model files (not downloaded for you), in --models or the default folder
($SCAIL_WIN_POSE_MODELS, else <SCAIL checkout>/SCAIL-Pose/pretrained_weights,
else scail-win's per-user folder):
  DWPose/yolox_l.onnx, DWPose/dw-ll_ucoco_384.onnx   huggingface.co/yzd-v/DWPose
  nlf_l_multi_0.3.2.torchscript                      github.com/isarandi/nlf/releases (v0.3.2)
Needs the pose extra: pip install scail-win[pose]
"""


def build_parser() -> argparse.ArgumentParser:
    from scail_win.pose.pipeline import DEFAULT_RESOLUTION

    p = argparse.ArgumentParser(prog="scail-win pose",
                                description="Make SCAIL's pose video (rendered.mp4) from a driving video, "
                                            "as SCAIL-Pose does for one person.",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("driving", help="the driving video (any format FFmpeg reads)")
    p.add_argument("--ref", required=True, help="the reference image of the character")
    p.add_argument("--out", required=True, help="the example folder to write (created if missing)")
    p.add_argument("--models", help="folder of the pose model files (default: see below)")
    p.add_argument("--align", action="store_true",
                   help="fit the driving pose to the reference character's body and face size (SCAIL-Pose's --use_align)")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), default=list(DEFAULT_RESOLUTION),
                   help="pose video size for landscape videos (swapped for portrait ones); SCAIL expects the default")
    p.add_argument("--pose-device", choices=("auto", "cuda", "directml", "cpu"), default="auto",
                   help="where the ONNX models run (auto: CUDA, else DirectML, else CPU); NLF and the renderer "
                        "use CUDA unless this is cpu or torch has no CUDA")
    p.add_argument("--nlf-batch", type=int, default=16, help="person crops per NLF call (lower it to save VRAM)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    verbosity.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.resolution) < 2 or any(v % 2 for v in args.resolution):
        parser.error(f"--resolution {args.resolution[0]} {args.resolution[1]}: both sides must be even and at least 2")
    if args.nlf_batch < 1:
        parser.error(f"--nlf-batch {args.nlf_batch}: must be at least 1")
    setup_logging(quiet=args.quiet, debug=args.debug)

    def body() -> int:
        from scail_win.pose.pipeline import PoseJob, run_pose

        job = PoseJob(driving=Path(args.driving), ref=Path(args.ref), out_dir=Path(args.out),
                      models_dir=args.models, align=args.align, resolution=tuple(args.resolution),
                      pose_device=args.pose_device, nlf_batch=args.nlf_batch, progress=not args.quiet)
        result = run_pose(job)
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
        log.info("%d frames -> %s (%s)", result.frames, result.video, timings)
        return 0

    return run_cli(body, debug=args.debug)
