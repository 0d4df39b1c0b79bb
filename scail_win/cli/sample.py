"""``scail-win sample``: animate a reference image with a pose video.

Parses the options, checks every job's inputs before any model is loaded
(so a typo costs a second, not minutes of loading), then hands the jobs to
:func:`scail_win.sample_video.run_jobs`.  Nothing heavy is imported before
the options are parsed, so ``--help`` is instant.

Jobs come from ``--input-dir`` (with ``--prompt``), from ``--input-file``
(upstream's ``<prompt>@@<example_dir>`` lines; ``-`` reads them from
standard input), or, with neither, from standard input as upstream reads
them: all lines when piped, one at a time at a terminal.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Iterable, List, Optional

from .support import HelpFormatter, run_cli, setup_logging
from ..errors import UserError
from .. import run_config
from ..run_config import ATTENTION_CHOICES, DEFAULT_SAVE_EVERY, DEFAULT_SEED, SAMPLER_CHOICES
from ..io.jobs import (Job, ModelLimits, check_resolution, config_resolution, interactive_jobs,
                   read_input_file, resolve_max_frames, validate_job, validate_jobs)
from ..model.spec import ModelSpec
from ..testing.smoke import SMOKE_FRAMES, SMOKE_SIZE, SMOKE_STEPS

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_CFG_SCALE = 4.0
# Step-distill LoRAs for Wan2.1-14B (e.g. LightX2V's) are trained for 4 steps at guidance 1.
FAST_STEPS = 4


# -- option parsing ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX*]\s*(\d+)\s*$")


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x896"`` -> (512, 896), as (height, width)."""
    match = _RESOLUTION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 512x896, got {text!r}")
    height, width = int(match[1]), int(match[2])
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"height and width must be positive, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scail-win sample",
        formatter_class=HelpFormatter,
        description="Animate a reference image with a rendered pose video (SCAIL).\n\n"
                    "Each example folder holds ref.jpg|png and rendered.mp4 (or rendered_aligned.mp4).\n"
                    "The video goes to OUTPUT_DIR/<folder>/<folder>_output_000000.mp4 at the pose\n"
                    "video's frame rate; an existing file is never overwritten (the counter goes up).",
        epilog="examples:\n"
               "  scail-win sample --input-dir examples/001 --prompt \"the girl is dancing\"\n"
               "  scail-win sample --input-file jobs.txt      (lines: <prompt>@@<example_dir>)\n"
               "  echo \"the girl is dancing@@examples/001\" | scail-win sample",
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--input-dir", action="append", metavar="DIR",
                        help="example folder to animate; repeat for several")
    inputs.add_argument("--prompt", metavar="TEXT",
                        help="prompt for the --input-dir jobs (empty if not given; SCAIL works best "
                             "with a long, detailed one)")
    inputs.add_argument("--input-file", metavar="FILE",
                        help="file of '<prompt>@@<example_dir>' lines ('-' reads standard input); "
                             "with no --input-dir or --input-file, lines are read from standard input")
    inputs.add_argument("--max-frames", type=_positive_int, metavar="N",
                        help="use at most the first N pose frames (default: the model's limit, 81)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=run_config.default("output_dir"), metavar="DIR",
                        help="where videos go")
    output.add_argument("--save-every", type=_non_negative_int, default=DEFAULT_SAVE_EVERY, metavar="N",
                        help="save the denoising state every N steps so --resume can continue (0: never)")
    output.add_argument("--resume", action="store_true",
                        help="continue each job from its saved denoising state, if it has one")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--base", nargs="*", metavar="YAML",
                          help="config files, merged in order (default: the packaged SCAIL config)")
    sampling.add_argument("--weights", metavar="DIR",
                          help="the SCAIL-Preview folder (default: the config's args.weights, else the "
                               "SCAIL_WEIGHTS environment variable, else ./SCAIL-Preview)")
    sampling.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    sampling.add_argument("--steps", type=_positive_int,
                          help=f"denoising steps; {FAST_STEPS} with --fast, {SMOKE_STEPS} with --smoke "
                               f"(default: {DEFAULT_STEPS})")
    sampling.add_argument("--cfg-scale", type=_non_negative_number, metavar="SCALE",
                          help=f"classifier-free guidance scale; 1 skips the unconditional pass (half the "
                               f"work); 1 with --fast (default: {DEFAULT_CFG_SCALE})")
    sampling.add_argument("--sampler", choices=SAMPLER_CHOICES, default=run_config.default("sampler"),
                          help="ODE solver: euler is upstream's, bit for bit; unipc and dpmpp_2m are "
                               "higher-order flow solvers for 20-30 steps")
    sampling.add_argument("--shift", type=_positive_number, metavar="S",
                          help="sigma schedule shift (default: the config's, 5)")
    sampling.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                          help="merge a LoRA (.safetensors) into the DiT as it loads; repeat for several "
                               "(strength default 1)")
    sampling.add_argument("--fast", action="store_true",
                          help=f"preset for a step-distill LoRA (give it with --lora): {FAST_STEPS} steps at "
                               "guidance 1 unless --steps/--cfg-scale say otherwise")
    sampling.add_argument("--resolution", type=parse_resolution, metavar="HxW",
                          help="size for landscape references, swapped for portrait or square ones "
                               "(default: the config's, 512x896)")

    memory = parser.add_argument_group("memory")
    memory.add_argument("--vram-budget", type=_positive_number, metavar="GB",
                        help="GPU memory to plan for (default: what the GPU has free)")
    memory.add_argument("--blocks-on-gpu", type=_non_negative_int, metavar="N",
                        help="transformer blocks kept on the GPU; the rest are streamed (default: planned)")
    memory.add_argument("--ram-budget", type=_positive_number, metavar="GB",
                        help="host memory to plan for (default: what is available)")
    memory.add_argument("--t5-cpu", action="store_true", help="run the text encoder on the CPU")
    memory.add_argument("--vae-tiling", choices=("on", "off", "auto"), default=run_config.default("vae_tiling"),
                        help="decode and encode video in tiles to save GPU memory")
    memory.add_argument("--offload", choices=("auto", "none"), default=run_config.default("offload"),
                        help="auto: plan GPU/CPU placement from the budgets; none: keep every component "
                             "where upstream puts it")
    speed = parser.add_argument_group("speed and caching")
    speed.add_argument("--rope-mode", choices=("fp32", "exact"), default=run_config.default("rope_mode"),
                       help="3D RoPE arithmetic: fp32 rounds once; exact reproduces upstream's bf16 "
                            "rounding bit for bit")
    speed.add_argument("--attention", choices=ATTENTION_CHOICES, default=run_config.default("attention"),
                       help="attention kernel: auto takes SageAttention or flash-attn where installed and "
                            "working, else PyTorch's SDPA")
    speed.add_argument("--fp8-matmul", action="store_true",
                       help="with fp8 weights (convert --dtype fp8_e4m3fn) on a GPU with fp8 tensor cores "
                            "(sm 8.9+: RTX 40xx and newer), multiply in fp8 instead of upcasting")
    speed.add_argument("--step-cache", type=_non_negative_number, default=run_config.default("step_cache"),
                       metavar="THRESHOLD",
                       help="skip the DiT's blocks on steps whose first block changes less than THRESHOLD "
                            "(relative L1; about 0.05-0.1); 0 is off")
    speed.add_argument("--embed-cache", metavar="DIR",
                       help="folder for cached text embeddings ('off' disables the cache; "
                            "default: scail-win's per-user cache folder)")

    run = parser.add_argument_group("run")
    run.add_argument("--smoke", action="store_true",
                     help="check the whole pipeline in seconds on a tiny SCAIL with random weights (no "
                          "weights folder; needs SCAIL's code): runs the given jobs, or a generated "
                          f"example, at --resolution (default {SMOKE_SIZE[0]}x{SMOKE_SIZE[1]}) and "
                          f"--max-frames (default {SMOKE_FRAMES})")
    chatter = run.add_mutually_exclusive_group()
    chatter.add_argument("--quiet", action="store_true", help="only warnings and errors")
    chatter.add_argument("--debug", action="store_true", help="debug logging; tracebacks on errors")
    return parser


def check_combinations(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Reject option combinations that cannot mean anything (parser.error: usage + exit 2)."""
    if opts.input_file is not None and opts.input_dir:
        parser.error("--input-file and --input-dir cannot be used together; put every job in the file")
    if opts.prompt is not None and opts.input_file is not None:
        parser.error("--prompt applies to --input-dir jobs; --input-file lines carry their own prompts")
    if opts.prompt is not None and not opts.input_dir:
        parser.error("--prompt needs --input-dir")
    if opts.resume and not (opts.input_dir or opts.input_file):
        parser.error("--resume needs the jobs to resume: give --input-dir or --input-file")
    if opts.input_file == "":
        parser.error("--input-file needs a file name, or '-' for standard input")
    if opts.input_dir and any(not d.strip() for d in opts.input_dir):
        parser.error("--input-dir needs a folder name")


def check_weights(opts: argparse.Namespace) -> None:
    if opts.smoke:
        return
    if not opts.weights.is_dir():
        raise UserError(f"weights folder not found: {opts.weights}; download SCAIL-Preview there, "
                        f"or pass --weights DIR (or set SCAIL_WEIGHTS)")


def prepare(opts: argparse.Namespace) -> Iterable[Job]:
    """Resolve the config-dependent options in ``opts`` and return the checked jobs.

    Afterwards ``opts.resolution`` is the (H, W) for landscape references,
    ``opts.max_frames`` the frame cap, ``opts.steps`` the step count and
    ``opts.weights`` the absolute weights folder (``--smoke``: the smoke
    model's size, length and steps unless given).  The jobs are a list, validated as a whole, except at an
    interactive terminal, where each is validated as it is typed.
    """
    from ..arguments import load_config

    config = load_config(opts.base, opts.weights)
    try:
        limits = ModelLimits.from_spec(ModelSpec.from_config(config))
    except ValueError as exc:
        raise UserError(f"{', '.join(map(str, opts.base or ['the packaged config']))}: {exc}") from None
    if opts.smoke:
        # The smoke model is made for the size and length asked for.
        opts.resolution = opts.resolution or SMOKE_SIZE
        opts.max_frames = opts.max_frames or SMOKE_FRAMES
    resolution = opts.resolution or config_resolution(config)
    check_resolution(resolution, limits, "--resolution" if opts.resolution else "the config's sampling_image_size")
    opts.resolution = resolution
    opts.max_frames = resolve_max_frames(opts.max_frames, limits)
    opts.steps = opts.steps or (SMOKE_STEPS if opts.smoke else FAST_STEPS if opts.fast else DEFAULT_STEPS)
    if opts.cfg_scale is None:
        opts.cfg_scale = 1.0 if opts.fast else DEFAULT_CFG_SCALE
    if opts.fast and not opts.lora:
        log.warning("--fast without --lora: %d steps without a step-distill LoRA give a blurred video",
                    opts.steps)
    opts.weights = Path(config.args.weights)
    settings = dict(resolution=resolution, max_frames=opts.max_frames, limits=limits, output_dir=opts.output_dir)

    if opts.input_dir:
        prompt = opts.prompt if opts.prompt is not None else ""
        if not prompt:
            log.info("no --prompt: using an empty prompt")
        jobs = [Job(prompt=prompt, input_dir=Path(d), source="--input-dir") for d in opts.input_dir]
        ready = validate_jobs(jobs, **settings)
    elif opts.input_file is not None:
        jobs, problems = read_input_file(opts.input_file)
        ready = validate_jobs(jobs, problems, **settings)
    elif opts.smoke and (sys.stdin is None or sys.stdin.isatty()):
        return []  # --smoke without jobs makes its own example
    elif sys.stdin is None:
        raise UserError("no jobs: pass --input-dir DIR or --input-file FILE")
    elif sys.stdin.isatty():
        check_weights(opts)
        return interactive_jobs(lambda job: validate_job(job, **settings))
    else:
        jobs, problems = read_input_file("-")
        if opts.smoke and not jobs and not problems:
            return []
        ready = validate_jobs(jobs, problems, **settings)
    check_weights(opts)
    check_loras(opts)
    return ready


def check_loras(opts: argparse.Namespace) -> None:
    """Every ``--lora`` parses and exists before anything loads (shapes are checked at load)."""
    from ..weights.lora import specs

    specs(opts.lora or ())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    check_combinations(parser, opts)
    setup_logging(quiet=opts.quiet, debug=opts.debug)

    def body() -> int:
        jobs = prepare(opts)
        from ..sample_video import run_jobs

        return run_jobs(opts, jobs)

    return run_cli(body, debug=opts.debug)


