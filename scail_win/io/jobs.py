"""Sampling jobs: what one video needs, read and checked before any model loads.

A job is a prompt and an example folder (upstream's ``<prompt>@@<dir>``
lines). :func:`validate_job` finds the reference image and pose video by
upstream's names, probes them, and settles the frame count, the sampling
size and the output name, so that a typo costs a second, not minutes of
loading. Used by the CLI (:mod:`scail_win.cli.sample`) and by the drop-in
stdin loop (:mod:`scail_win.sample_video`).
"""

from __future__ import annotations

import locale
import logging
import os
import sys
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Optional, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from ..model.spec import ModelSpec

log = logging.getLogger(__name__)

# Upstream's file names, in upstream's order of preference.
REF_IMAGE_NAMES = ("ref.jpg", "ref.png", "ref_image.jpg", "ref_image.png")
POSE_VIDEO_NAMES = ("rendered_aligned.mp4", "rendered.mp4")
OUTPUT_NAME = "{name}_output_000000.mp4"
INTERACTIVE_PROMPT = ("Please input in format like <prompt>@@<example_dir>, "
                      "e.g. the girl is dancing@@examples/001 (Ctrl-D quit): ")



@dataclass(frozen=True)
class Job:
    """One video to make.

    ``prompt`` and ``input_dir`` come from the user; ``validate_job`` fills
    the rest: the input files, the number of pose frames to use (``frames``,
    1 + 4k, at most the model's limit), the pose video's exact frame rate
    (``fps``, also the output's), the (H, W) the inputs are resized to
    (``size``, after upstream's portrait swap) and upstream's output name
    (``output_path``; the writer numbers it if taken).
    """

    prompt: str
    input_dir: Path
    line: Optional[int] = None
    source: str = ""
    ref_image: Optional[Path] = None
    pose_video: Optional[Path] = None
    pose_frames: Optional[int] = None
    frames: Optional[int] = None
    fps: Optional[Fraction] = None
    size: Optional[tuple[int, int]] = None
    output_path: Optional[Path] = None

    @property
    def name(self) -> str:
        """The output folder and file stem: the example folder's name."""
        return Path(self.input_dir).name or Path(self.input_dir).resolve().name

    @property
    def validated(self) -> bool:
        return self.output_path is not None


@dataclass(frozen=True)
class ModelLimits:
    """What the model's shapes allow (:meth:`from_spec`); the defaults are SCAIL-Preview's."""

    max_frames: int = 81       # DiT num_frames: RoPE and AdaLN tables hold 21 latent frames
    frame_group: int = 4       # VAE temporal compression: 1 + 4k frames -> 1 + k latents
    size_multiple: int = 32    # VAE 8 x patch 2, x2 for the half-size pose video
    max_height: int = 2400     # RoPE table: latent_height 300 / patch 2 = 150 patches of 16 px
    max_width: int = 2400

    @classmethod
    def from_spec(cls, spec: "ModelSpec") -> "ModelLimits":
        return cls(max_frames=spec.max_frames, frame_group=spec.vae_stride[0], size_multiple=spec.size_multiple,
                   max_height=spec.max_height, max_width=spec.max_width)


# -- configuration ----------------------------------------------------------------------


def config_resolution(config) -> tuple[int, int]:
    from omegaconf import OmegaConf

    value = OmegaConf.select(config, "args.sampling_image_size", default=None)
    if value is None:
        raise UserError("the config sets no args.sampling_image_size; pass --resolution HxW")
    size = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f"the config's args.sampling_image_size must be [height, width], got {size!r}; "
                        f"pass --resolution HxW")
    return int(size[0]), int(size[1])


def check_resolution(resolution: tuple[int, int], limits: ModelLimits, what: str = "--resolution") -> None:
    """Sizes the model can take; ``what`` names where the size came from in the message."""
    height, width = resolution
    unit = limits.size_multiple
    if height % unit or width % unit:
        near = [max(unit, round(v / unit) * unit) for v in (height, width)]
        raise UserError(f"{what} {height}x{width}: height and width must be multiples of {unit} "
                        f"for this model; try --resolution {near[0]}x{near[1]}")
    # Portrait references swap the two, so each side must fit either way.
    longest, limit = max(height, width), min(limits.max_height, limits.max_width)
    if longest > limit:
        raise UserError(f"{what} {height}x{width}: the model's position tables reach {limit} pixels "
                        f"per side; use a smaller --resolution")


def resolve_max_frames(requested: Optional[int], limits: ModelLimits) -> int:
    """The most pose frames a job may use: 1 + k groups, within the model's limit."""
    group = limits.frame_group
    if requested is None:
        return limits.max_frames
    if requested > limits.max_frames:
        raise UserError(f"--max-frames {requested}: the model takes at most {limits.max_frames} frames "
                        f"(longer clips fail upstream with a tensor size error); split the pose video")
    if requested < 1 + group:
        raise UserError(f"--max-frames {requested}: at least {1 + group} frames are needed "
                        f"(the first frame plus one group of {group})")
    usable = 1 + (requested - 1) // group * group
    if usable != requested:
        log.info("--max-frames %d -> %d: frames go in groups of %d after the first", requested, usable, group)
    return usable


# -- jobs ---------------------------------------------------------------------------------


def parse_job_line(line: str, line_number: Optional[int] = None, source: str = "") -> Job:
    """Upstream's ``<prompt>@@<example_dir>`` line; the prompt ``None`` means an empty one.

    The prompt keeps its inner spacing as upstream passes it to the text
    encoder; only the line's ends and the folder name are trimmed.
    """
    where = " ".join(p for p in (source, f"line {line_number}" if line_number is not None else "") if p)
    prefix = f"{where}: " if where else ""
    text = line.strip()
    if "@@" not in text:
        raise UserError(f"{prefix}expected '<prompt>@@<example_dir>', got {text!r}")
    if text.count("@@") > 1:
        raise UserError(f"{prefix}more than one '@@' in {text!r}; put exactly one between the prompt "
                        f"and the example folder")
    prompt, folder = text.split("@@")
    folder = folder.strip()
    if not folder:
        raise UserError(f"{prefix}the example folder after '@@' is missing")
    if prompt == "None":
        prompt = ""
    return Job(prompt=prompt, input_dir=Path(folder), line=line_number, source=where)


def _find(folder: Path, names: Sequence[str]) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def validate_job(job: Job, *, resolution: Sequence[int], max_frames: int,
                 limits: ModelLimits = ModelLimits(), output_dir: os.PathLike | str = "samples") -> Job:
    """Check ``job``'s inputs without loading a model; the job with its files and sizes filled in.

    ``resolution`` is (H, W) for landscape references; ``max_frames`` the
    most pose frames to use (from ``resolve_max_frames``).  Every problem is a
    one-line UserError naming the file.
    """
    from . import video as video_io

    prefix = f"{job.source}: " if job.source else ""
    folder = Path(job.input_dir)
    if not folder.exists():
        raise UserError(f"{prefix}example folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{prefix}not a folder: {folder}; pass the example folder that holds it")
    ref = _find(folder, REF_IMAGE_NAMES)
    if ref is None:
        raise UserError(f"{prefix}no reference image in {folder}: add one of {', '.join(REF_IMAGE_NAMES)}")
    pose = _find(folder, POSE_VIDEO_NAMES)
    if pose is None:
        raise UserError(f"{prefix}no pose video in {folder}: add {' or '.join(POSE_VIDEO_NAMES)} "
                        f"(render it from the driving video with SCAIL-Pose)")
    try:
        height, width = video_io.probe_image(ref)
        info = video_io.probe_video(pose)
    except UserError as exc:
        raise UserError(f"{prefix}{exc}") from None

    group = limits.frame_group
    if info.frames < 1 + group:
        raise UserError(f"{prefix}pose video {pose} has {info.frames} frame(s); at least {1 + group} "
                        f"are needed (the first frame plus one group of {group})")
    frames = 1 + (min(info.frames, max_frames) - 1) // group * group
    if info.frames > max_frames:
        log.warning("%s%s has %d frames; using the first %d (at most %d per video: split longer "
                    "videos into parts)", prefix, pose, info.frames, frames, max_frames)
    elif frames < info.frames:
        log.info("%s%s: using %d of %d frames (frames go in groups of %d after the first; upstream "
                 "drops the rest too)", prefix, pose, frames, info.frames, group)

    out_folder = Path(output_dir) / job.name
    for path in (Path(output_dir), out_folder):
        if path.exists() and not path.is_dir():
            raise UserError(f"{prefix}output folder {path} is a file; move it or pass another --output-dir")

    return replace(job, ref_image=ref, pose_video=pose, pose_frames=info.frames, frames=frames,
                   fps=info.rate, size=video_io.sampling_size(height, width, resolution),
                   output_path=out_folder / OUTPUT_NAME.format(name=job.name))


def validate_jobs(jobs: Iterable[Job], problems: Sequence[str] = (), **settings) -> List[Job]:
    """Validate every job before any starts; one UserError listing every problem."""
    problems = list(problems)
    ready: List[Job] = []
    for job in jobs:
        try:
            ready.append(validate_job(job, **settings))
        except UserError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        listed = "\n".join(f"  {p}" for p in problems)
        raise UserError(f"{len(problems)} jobs cannot run (nothing was started):\n{listed}")
    if not ready:
        raise UserError("no jobs: pass --input-dir DIR, --input-file FILE, or "
                        "'<prompt>@@<example_dir>' lines on standard input")
    return ready


def parse_job_lines(lines: Iterable[str], source: str) -> tuple[List[Job], List[str]]:
    """Jobs from ``<prompt>@@<dir>`` lines (blank ones skipped), and the problems found."""
    jobs, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            jobs.append(parse_job_line(line, number, source))
        except UserError as exc:
            problems.append(str(exc))
    return jobs, problems


def _decode_text(data: bytes) -> str:
    # Job files are usually UTF-8 (maybe with Notepad's BOM); a legacy
    # Windows code page is the fallback for files saved the old way.
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode(locale.getpreferredencoding(False), errors="replace")


def read_input_file(name: str) -> tuple[List[Job], List[str]]:
    """Jobs from ``--input-file`` (``-``: standard input) and the problems found in its lines."""
    if name == "-":
        return parse_job_lines(_decode_text(sys.stdin.buffer.read()).splitlines(), "stdin")
    path = Path(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--input-file not found: {path}") from None
    except OSError as exc:
        raise UserError(f"--input-file {path}: cannot read it ({exc.strerror or exc})") from None
    return parse_job_lines(_decode_text(data).splitlines(), path.name)


def interactive_jobs(validate: Callable[[Job], Job]) -> Iterator[Job]:
    """Upstream's terminal loop: a line at a time until end of input; bad lines are re-asked."""
    number = 0
    while True:
        try:
            line = input(INTERACTIVE_PROMPT)
        except EOFError:
            return
        number += 1
        if not line.strip():
            continue
        try:
            job = validate(parse_job_line(line, number, "stdin"))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        yield job
