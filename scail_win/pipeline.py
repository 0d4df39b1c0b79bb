"""One job, top to bottom: the sampling pipeline behind ``sample_video``.

:func:`run_job` reads in the order the work happens: check the job against
the model, encode the reference image and the pose video (VAE, then CLIP),
encode the prompt (T5, or the on-disk cache), set up the latents' resume
state, denoise (the solver is the engine's slot, picked by ``--sampler``),
then decode and write the video. The image and pose come before the text as
in upstream's ``sampling_main``, so the components reach the GPU in the order
the memory plan was made for.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError
from .io.jobs import Job
from .phases import Phase
from .run_config import of as run_config_of

log = logging.getLogger(__name__)

NEGATIVE_PROMPT = ""


@dataclass
class VideoLatents:
    """The reference image's and the pose video's latents (B T C H W) and CLIP features."""
    image: object
    ref: object
    pose: object
    clip: Optional[object]


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


def check_job(model, job: Job) -> None:
    """What the validated inputs cannot tell: whether this model's config can animate them."""
    if not model.i2v_encode_video:
        raise UserError("this config sets i2v_encode_video: false, which upstream does not support for pose")


def encode_image_and_pose(model, job: Job, args) -> VideoLatents:
    """VAE latents of the reference (as the first frame, and alone) and of the pose video; CLIP features."""
    import torch
    from einops import rearrange

    image, pose, smpl = load_job_inputs(job, args)
    device = model.compute_device
    pose = pose.unsqueeze(0).to(device).to(torch.bfloat16)
    smpl = smpl.unsqueeze(0).to(device).to(torch.bfloat16)
    ori_image = image.unsqueeze(0).to(device).to(torch.bfloat16)          # B 1 C H W

    def encode(video):                                                    # B T C H W -> latents B T C H W
        latent = model.encode_first_stage(rearrange(video, "b t c h w -> b c t h w").contiguous(),
                                          None, force_encode=True)
        return latent.permute(0, 2, 1, 3, 4).contiguous()

    with model.phase(Phase.VAE_ENCODE):
        image_latent = encode(torch.concat([ori_image, torch.zeros_like(pose[:, 1:])], dim=1))
        ref_latent = encode(ori_image)
        pose_latent = encode(smpl)
    del pose, smpl
    clip_features = None
    if model.use_i2v_clip:
        with model.phase(Phase.CLIP):
            clip_features = model.clip_features(ori_image.permute(0, 2, 1, 3, 4))
    return VideoLatents(image=image_latent, ref=ref_latent, pose=pose_latent, clip=clip_features)


def conditioning(model, latents: VideoLatents, text) -> Conditioning:
    """The denoiser's cond/uncond dicts from the video latents and the text embeddings."""
    device = model.compute_device
    c, uc = text
    for key in list(c):
        if key != "crossattn":
            c[key], uc[key] = (d[key][:1].to(device) for d in (c, uc))
    c["crossattn"], uc["crossattn"] = c["crossattn"].to(device), uc["crossattn"].to(device)
    for d in (c, uc):
        d["concat_images"] = latents.image
        d["ref_concat"] = latents.ref
        d["concat_pose"] = latents.pose
        d["concat_smpl_render"] = latents.pose
        if latents.clip is not None:
            d["image_clip_features"] = latents.clip
    frames = latents.pose.shape[1]
    channels, height, width = latents.image.shape[2:]
    return Conditioning(c=c, uc=uc, shape=(frames, channels, height, width))


def encode_job(model, job: Job, args, embed_cache=None) -> Conditioning:
    """Everything the denoiser needs for ``job``: check, image and pose, then text."""
    check_job(model, job)
    latents = encode_image_and_pose(model, job, args)
    return conditioning(model, latents, encode_text(model, job.prompt, embed_cache))


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


def encode_text(model, prompt: str, embed_cache: Optional[TextEmbeddingCache] = None):
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


def resume_fingerprint(model, job: Job, args, shape) -> str:
    """What a saved denoising state must match to be resumed for this job."""
    from .io import resume as resume_mod
    from .io.embed_cache import file_identity

    return resume_mod.fingerprint(prompt=job.prompt, image=file_identity(job.ref_image),
                                  pose=file_identity(job.pose_video), frames=job.frames,
                                  seed=getattr(args, "seed", None),
                                  steps=getattr(model.sampler, "num_steps", None),
                                  cfg=getattr(model.sampler.guider, "scale", None),
                                  shape=shape, load=str(getattr(args, "load", "")),
                                  **numerics_settings(args))


def run_job(model, job: Job, args, embed_cache=None) -> Path:
    """Make one (validated) job's video; returns the path written."""
    from .io import resume as resume_mod
    from .io import video as video_io

    cond = encode_job(model, job, args, embed_cache)
    state_file = resume_mod.state_path_for(job.output_path)
    io = run_config_of(args).io
    samples = denoise(model, cond, args, state_file, resume_fingerprint(model, job, args, cond.shape),
                      io.save_every, io.resume)
    del cond
    output = decode_and_write(model, samples, video_io.next_free_path(job.output_path), job.fps)
    resume_mod.remove_state(state_file)
    # Upstream writes the prompt to text.txt (overwriting it each run); one
    # file per video keeps every earlier one.
    output.with_suffix(".txt").write_text(job.prompt, encoding="utf-8")
    return output
