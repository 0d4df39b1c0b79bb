"""Drop-in for SCAIL's ``sample_video``: ``sampling_main`` and the stdin loop.

The sampling math is upstream's, step for step; what changes is around it:
PyAV/Pillow instead of decord, one process without collectives, components
moved by the engine's memory plan, text embeddings cached on disk, the
denoising state saved every few steps (``--save-every``/``--resume``), outputs
written atomically and never over an existing file, and a batch that goes on
after one item fails.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

from .errors import UserError
from .phases import Phase
from .io.jobs import (Job, ModelLimits, check_resolution, interactive_jobs, read_input_file,
                   resolve_max_frames, validate_job, validate_jobs)
from .run_config import of as run_config_of

log = logging.getLogger(__name__)

NEGATIVE_PROMPT = ""


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


# -- the sampling pipeline ------------------------------------------------------


@dataclass
class Conditioning:
    """Everything the denoiser needs for one job, on the compute device."""
    c: dict
    uc: dict
    shape: tuple


def load_job_inputs(job: Job, args):
    """Reference image and pose videos (full and half size) as upstream prepares them."""
    from .io import video as video_io

    image = video_io.load_reference_image(job.ref_image, args.sampling_image_size)
    pose, _ = video_io.load_pose_video(job.pose_video, job.size, max_frames=job.frames)
    smpl = pose
    if "smpl_downsample" in getattr(args, "representation", "smpl_downsample"):
        smpl = video_io.downsample_pose(pose)
    return image, pose, smpl


def encode_job(model, job: Job, args, embed_cache=None) -> Conditioning:
    """VAE, CLIP and text conditioning for ``job`` (upstream's sampling_main body)."""
    import torch
    from einops import rearrange

    image, pose, smpl = load_job_inputs(job, args)
    if not model.i2v_encode_video:
        raise UserError("this config sets i2v_encode_video: false, which upstream does not support for pose")
    device = model.compute_device
    pose = pose.unsqueeze(0).to(device).to(torch.bfloat16)
    smpl = smpl.unsqueeze(0).to(device).to(torch.bfloat16)
    ori_image = image.unsqueeze(0).to(device).to(torch.bfloat16)          # B 1 C H W
    with model.phase(Phase.VAE_ENCODE):
        first = torch.concat([ori_image, torch.zeros_like(pose[:, 1:])], dim=1)
        first = rearrange(first, "b t c h w -> b c t h w").contiguous()
        image_latent = model.encode_first_stage(first, None, force_encode=True).permute(0, 2, 1, 3, 4).contiguous()
        del first
        ref_concat = model.encode_first_stage(rearrange(ori_image, "b t c h w -> b c t h w").contiguous(),
                                              None, force_encode=True).permute(0, 2, 1, 3, 4).contiguous()
        smpl_latent = model.encode_first_stage(rearrange(smpl, "b t c h w -> b c t h w").contiguous(),
                                               None, force_encode=True).permute(0, 2, 1, 3, 4).contiguous()
    del pose, smpl
    T = smpl_latent.shape[1]
    C, H, W = image_latent.shape[2], image_latent.shape[3], image_latent.shape[4]

    clip_features = None
    if model.use_i2v_clip:
        with model.phase(Phase.CLIP):
            clip_features = model.clip_features(ori_image.permute(0, 2, 1, 3, 4))

    c, uc = text_conditioning(model, job.prompt, embed_cache)
    for key in list(c):
        if key != "crossattn":
            c[key], uc[key] = (d[key][:1].to(device) for d in (c, uc))
    c["crossattn"], uc["crossattn"] = c["crossattn"].to(device), uc["crossattn"].to(device)
    for d in (c, uc):
        d["concat_images"] = image_latent
        d["ref_concat"] = ref_concat
        d["concat_pose"] = smpl_latent
        d["concat_smpl_render"] = smpl_latent
        if clip_features is not None:
            d["image_clip_features"] = clip_features
    return Conditioning(c=c, uc=uc, shape=(T, C, H, W))


class TextEmbeddingCache:
    """The disk cache keyed by this config's text encoder (weights, tokenizer, length)."""

    def __init__(self, cache, encoder_params):
        import torch
        self.cache = cache
        self.settings = dict(weights=encoder_params["checkpoint_path"],
                             tokenizer=encoder_params.get("tokenizer_path"),
                             max_length=int(encoder_params.get("max_length", 512)),
                             dtype=encoder_params.get("dtype", torch.bfloat16))

    def get(self, text: str):
        return self.cache.get(self.cache.key(text, **self.settings))

    def put(self, text: str, embedding) -> None:
        self.cache.put(self.cache.key(text, **self.settings), embedding)


def text_cache_for(args, model) -> Optional[TextEmbeddingCache]:
    """The embedding cache for ``model``'s text encoder, or None (``--embed-cache off``)."""
    from .io.embed_cache import EmbedCache

    where = run_config_of(args).io.embed_cache
    if where in ("off", "none", ""):
        return None
    config = model._conditioner_config or {}
    for emb in config.get("params", {}).get("emb_models", []):
        params = emb.get("params", {})
        if "T5EncoderModel" in emb.get("target", "") and params.get("checkpoint_path"):
            if not Path(params["checkpoint_path"]).exists():
                return None
            return TextEmbeddingCache(EmbedCache(where), params)
    return None


def text_conditioning(model, prompt: str, embed_cache: Optional[TextEmbeddingCache] = None):
    """T5 embeddings of the prompt and of the empty negative prompt.

    On a cache hit for both texts T5 is never built or moved.
    """
    texts = [prompt, NEGATIVE_PROMPT]
    if embed_cache is not None:
        cached = [embed_cache.get(text) for text in texts]
        if all(t is not None for t in cached):
            log.info("text embeddings from the cache (the text encoder is not loaded)")
            return {"crossattn": cached[0]}, {"crossattn": cached[1]}
    conditioner = model.conditioner
    keys_needed = list({e.input_key for e in conditioner.embedders})
    batch = {k: [prompt] for k in keys_needed}
    batch_uc = {k: [NEGATIVE_PROMPT] for k in keys_needed}
    with model.phase(Phase.TEXT):
        c, uc = conditioner.get_unconditional_conditioning(batch, batch_uc=batch_uc,
                                                           force_uc_zero_embeddings=[])
    if embed_cache is not None and set(c) == {"crossattn"}:
        embed_cache.put(prompt, c["crossattn"])
        embed_cache.put(NEGATIVE_PROMPT, uc["crossattn"])
    return c, uc


def denoise(model, cond: Conditioning, args, state_file: Optional[Path], job_fingerprint: str,
            save_every: int, resume: bool):
    """Run the sampler with progress, periodic saves, and a save on Ctrl-C."""
    import torch
    from tqdm import tqdm
    from .io import resume as resume_mod

    start_step, start_latents, solver_state = 0, None, None
    if resume and state_file is not None:
        state = resume_mod.load_state(state_file, job_fingerprint)
        if state is not None:
            start_step, start_latents, solver_state = state.step, state.latents, state.solver_state
            torch.set_rng_state(state.cpu_rng)
            log.info("resuming at step %d of %d from %s", state.step, state.total_steps, state_file)
    latest = {"step": start_step, "x": start_latents, "solver": None}
    steps = int(getattr(model.sampler, "num_steps", 0) or 0)
    bar = tqdm(total=steps, initial=start_step, desc="denoising", unit="step",
               disable=run_config_of(args).io.quiet)
    # Every save holds the RNG state from before the initial noise: a resumed
    # run draws (and drops) that noise again, so whatever comes after it
    # (the next job's noise) is drawn as in an uninterrupted run.
    rng_at_start = torch.get_rng_state()

    def on_step(i, n, x, solver):
        latest["step"], latest["x"], latest["solver"] = i + 1, x, solver
        bar.update(1)
        if state_file is not None and save_every and (i + 1) % save_every == 0 and i + 1 < n:
            resume_mod.save_state(state_file, resume_mod.ResumeState(
                i + 1, n, x, rng_at_start, job_fingerprint, solver_state=solver.state_dict()))

    try:
        samples = model.sample(cond.c, uc=cond.uc, batch_size=1, shape=cond.shape,
                               ofs=torch.tensor([2.0]).to(model.compute_device),
                               fps=torch.tensor([getattr(args, "sampling_fps", 16)]).to(model.compute_device),
                               start_step=start_step, start_latents=start_latents, solver_state=solver_state,
                               step_callback=on_step)
    except KeyboardInterrupt:
        bar.close()
        if state_file is not None and latest["x"] is not None and latest["step"] > start_step:
            resume_mod.save_state(state_file, resume_mod.ResumeState(
                latest["step"], steps, latest["x"], rng_at_start, job_fingerprint,
                solver_state=latest["solver"].state_dict()))
            log.warning("stopped after step %d of %d; the state is saved in %s -- "
                        "run the same command with --resume to continue", latest["step"], steps, state_file)
        raise
    bar.close()
    return samples


def decode(model, samples):
    """Denoised latents (B T C H W) -> video (B C T H W, float32 in [-1, 1])."""
    import torch

    samples = samples.permute(0, 2, 1, 3, 4).contiguous()                 # B C T H W
    with model.phase(Phase.VAE_DECODE):
        return model.decode_first_stage(samples).to(torch.float32)


def decode_and_write(model, samples, output_path: Path, fps: float) -> Path:
    from .io import video as video_io

    video = decode(model, samples)
    frames = video_io.to_uint8_frames(video[0].permute(1, 0, 2, 3))         # T H W C
    return video_io.write_video(frames, output_path, fps)


def numerics_settings(args) -> dict:
    """Settings beyond upstream's that change the sampled latents, where not at their defaults.

    A resume must match them; leaving the defaults out keeps the fingerprint
    of a default run (and its saved states) as it was.
    """
    from .weights import lora

    settings = run_config_of(args).non_default_numerics()
    merged = lora.identity(args)
    if merged is not None:
        settings["lora"] = merged
    return settings


def run_one(model, job: Job, args, embed_cache=None) -> Path:
    """Make one (validated) job's video; returns the path written."""
    from .io import resume as resume_mod
    from .io import video as video_io
    from .io.embed_cache import file_identity

    cond = encode_job(model, job, args, embed_cache)
    state_file = resume_mod.state_path_for(job.output_path)
    fp = resume_mod.fingerprint(prompt=job.prompt, image=file_identity(job.ref_image),
                                pose=file_identity(job.pose_video), frames=job.frames,
                                seed=getattr(args, "seed", None),
                                steps=getattr(model.sampler, "num_steps", None),
                                cfg=getattr(model.sampler.guider, "scale", None),
                                shape=cond.shape, load=str(getattr(args, "load", "")),
                                **numerics_settings(args))
    io = run_config_of(args).io
    samples = denoise(model, cond, args, state_file, fp, io.save_every, io.resume)
    del cond
    output = decode_and_write(model, samples, video_io.next_free_path(job.output_path), job.fps)
    resume_mod.remove_state(state_file)
    # Upstream writes the prompt to text.txt (overwriting it each run); one
    # file per video keeps every earlier one.
    output.with_suffix(".txt").write_text(job.prompt, encoding="utf-8")
    return output


def run_batch(model, jobs: Iterable[Job], args, embed_cache=None) -> List[JobResult]:
    """Run every job; one failure does not stop the rest."""
    import torch

    results: List[JobResult] = []
    for job in jobs:
        start = time.monotonic()
        result = JobResult(job)
        log.info("%s: %s", job.input_dir, job.prompt or "(empty prompt)")
        try:
            result.output = run_one(model, job, args, embed_cache)
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
    cache = text_cache_for(args, model)
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
    cache = text_cache_for(args, model)
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
