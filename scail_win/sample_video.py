"""Drop-in for SCAIL's ``sample_video``: ``sampling_main`` and the stdin loop.

The sampling math is upstream's, step for step; what changes is around it:
PyAV/Pillow instead of decord, one process without collectives, components
moved by the engine's memory plan, text embeddings cached on disk, the
denoising state saved every few steps (``--save-every``/``--resume``), outputs
written atomically and never over an existing file, and a batch that goes on
after one item fails. One job's pipeline, top to bottom, is
:mod:`scail_win.pipeline`; this module reads the jobs and runs them.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

from . import pipeline
from .errors import UserError
from .phases import Phase
from .io.jobs import (Job, ModelLimits, check_resolution, interactive_jobs, read_input_file,
                   resolve_max_frames, validate_job, validate_jobs)
from .run_config import of as run_config_of

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    job: Job
    output: Optional[Path] = None
    error: Optional[str] = None
    seconds: float = 0.0


def job_settings(args) -> dict:
    """``validate_job`` settings from upstream-style ``args`` (config merged in)."""
    from .model.spec import ModelSpec

    limits = ModelLimits.from_spec(ModelSpec.from_args(args))
    resolution = tuple(int(v) for v in args.sampling_image_size)
    check_resolution(resolution, limits, "sampling_image_size")
    config = run_config_of(args)
    return dict(resolution=resolution, max_frames=resolve_max_frames(config.sampling.max_frames, limits),
                limits=limits, output_dir=config.io.output_dir)


def stdin_jobs(args) -> Iterator[Job]:
    """Upstream's loop: ``<prompt>@@<dir>`` lines (a file with ``input_type: txt``, else stdin)."""
    settings = job_settings(args)
    if getattr(args, "input_type", "cli") == "txt" and getattr(args, "input_file", None):
        found, problems = read_input_file(str(args.input_file))
        yield from validate_jobs(found, problems, **settings)
    elif sys.stdin is not None and sys.stdin.isatty():
        yield from interactive_jobs(lambda job: validate_job(job, **settings))
    else:
        found, problems = read_input_file("-")
        yield from validate_jobs(found, problems, **settings)


def run_batch(model, jobs: Iterable[Job], args, embed_cache=None) -> List[JobResult]:
    """Run every job; one failure does not stop the rest."""
    import torch

    results: List[JobResult] = []
    for job in jobs:
        start = time.monotonic()
        result = JobResult(job)
        log.info("%s: %s", job.input_dir, job.prompt or "(empty prompt)")
        try:
            result.output = pipeline.run_job(model, job, args, embed_cache)
            log.info("wrote %s", result.output)
        except UserError as exc:
            result.error = str(exc)
            log.error("%s", exc)
        except torch.cuda.OutOfMemoryError as exc:
            result.error = out_of_memory_message(model, args)
            log.error("%s", result.error)
            log.debug("out of memory", exc_info=exc)
            torch.cuda.empty_cache()
        result.seconds = time.monotonic() - start
        results.append(result)
    return results


# The setting that makes each phase need less GPU memory.
PHASE_HINTS = {Phase.TEXT: ["--t5-cpu"], Phase.CLIP: [], Phase.VAE_ENCODE: ["--vae-tiling on"],
               Phase.DENOISE: ["--blocks-on-gpu 0"], Phase.VAE_DECODE: ["--vae-tiling on"]}


def out_of_memory_message(model, args) -> str:
    """What ran out, and the settings that would need less GPU memory."""
    phase = getattr(model, "current_phase", None)
    plan = getattr(model, "memory_plan", None)
    budget = getattr(plan, "budget_gb", None)
    hint = list(PHASE_HINTS.get(phase, []))
    hint.append(f"--vram-budget {max(1.0, budget - 1.0):.0f} (now {budget:.1f})" if budget
                else "--vram-budget with the GB your GPU has free")
    hint += ["a smaller --resolution", "--max-frames 49"]
    where = f" during {Phase(phase).title}" if phase else ""
    return f"out of GPU memory{where}; try " + ", ".join(hint) + " (no output was written)"


def summarize(results: Sequence[JobResult]) -> int:
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    if len(results) > 1 or failed:
        log.info("done: %d succeeded, %d failed", len(ok), len(failed))
        for r in failed:
            log.info("  failed: %s -- %s", r.job.input_dir, r.error)
    return 1 if failed else 0


# -- building the model --------------------------------------------------------------


def build_model(args, model_cls=None):
    """Build the engine, load the weights where the plan puts them, adopt the plan."""
    from .model import loader as model_loader
    return model_loader.build(args, model_cls)


def sampling_main(args, model_cls=None) -> int:
    """Upstream-compatible entry: build, load, then read ``<prompt>@@<dir>`` lines."""
    jobs: Iterable[Job] = stdin_jobs(args)
    if not (sys.stdin is not None and sys.stdin.isatty()):
        jobs = list(jobs)  # a whole batch is checked before the model loads
    model = build_model(args, model_cls)
    cache = pipeline.text_cache_for(args, model)
    return summarize(run_batch(model, jobs, args, cache))


def run_jobs(opts: argparse.Namespace, jobs: Sequence[Job]) -> int:
    """Entry for ``python -m scail_win.sample``: validated jobs, CLI options."""
    from .model.loader import require_scail_code

    require_scail_code()
    if getattr(opts, "smoke", False):
        return run_smoke(opts, jobs)
    return summarize(_run_cli_jobs(opts, jobs))


def _run_cli_jobs(opts: argparse.Namespace, jobs: Sequence[Job]) -> List[JobResult]:
    from . import arguments
    from .weights.prefetch import prefetch_weights

    # Before the imports and set-up below: the weights stream in meanwhile.
    prefetch_weights(opts.weights)
    args = arguments.args_from_cli(opts)
    model = build_model(args)
    cache = pipeline.text_cache_for(args, model)
    return run_batch(model, jobs, args, cache)


def run_smoke(opts: argparse.Namespace, jobs: Sequence[Job]) -> int:
    """``--smoke``: the whole pipeline on a tiny SCAIL with random weights (:mod:`scail_win.testing.smoke`).

    The model is written to a temporary folder at ``opts.resolution`` and
    ``opts.max_frames``, on the GPU if there is one; ``jobs`` run on it, or,
    without jobs, a generated example does. Prints each video written.
    """
    import copy
    import gc
    import tempfile

    import torch

    from .testing import smoke

    device = "cuda" if torch.cuda.is_available() else "cpu"
    height, width = opts.resolution
    # ignore_cleanup_errors: Windows cannot delete a file that is still mapped.
    with tempfile.TemporaryDirectory(prefix="scail-win-smoke-", ignore_cleanup_errors=True) as tmp:
        setup = smoke.make_smoke_setup(Path(tmp), height=height, width=width, frames=opts.max_frames,
                                       device=device)
        if not jobs:
            jobs = [validate_job(Job(prompt=smoke.SMOKE_PROMPT, input_dir=setup.example, source="--smoke"),
                                 resolution=opts.resolution, max_frames=opts.max_frames,
                                 output_dir=opts.output_dir)]
        run_opts = copy.copy(opts)
        run_opts.base, run_opts.weights = [setup.config], setup.weights
        # Its files are tiny on purpose: the weights check's size warnings say nothing here.
        weights_log = logging.getLogger("scail_win.weights.checkpoint")
        level = weights_log.level
        weights_log.setLevel(logging.ERROR)
        try:
            results = _run_cli_jobs(run_opts, jobs)
        finally:
            weights_log.setLevel(level)
            # The model maps the weight files; sat's modules hold reference
            # cycles, so only the collector releases them before the clean-up.
            gc.collect()
    for result in results:
        if result.output is not None:
            print(f"smoke test: wrote {result.output}")
    return summarize(results)


def main(argv: Optional[List[str]] = None) -> int:
    """``python sample_video.py --base ...`` in a SCAIL checkout, run as scail-win."""
    from . import arguments
    from .cli.support import run_cli, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # Progress and the path of each video written are logged at INFO.
    setup_logging(debug=debug)

    def body() -> int:
        return sampling_main(arguments.get_args(argv))

    return run_cli(body, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
