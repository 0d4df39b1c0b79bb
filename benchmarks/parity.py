#!/usr/bin/env python3
"""scail-win against upstream SCAIL on one GPU: the sampling pipeline, and a full-size DiT forward.

Stages (--stages):

  pipeline  A SCAIL with random weights written as SCAIL-Preview files by
            scail_win.testing.smoke: a tiny DiT (2 layers, upstream's classes and
            mixins), upstream's umT5-XXL and CLIP ViT-H classes at full size
            (12 GB of random .pth files; --tiny-encoders for the small
            stand-ins), the real Wan 2.1 VAE architecture. One job (--example,
            default the generated one), run twice more:
              upstream   upstream's engine built and loaded as upstream's
                         sample_video does (sat's get_model + load_checkpoint:
                         its DiT mixins, Ulysses attention on the one-process
                         group, everything cast to bf16), driven through
                         upstream's sampling steps (VAE encodes, CLIP, T5,
                         engine.sample, VAE decode);
              scail-win  scail_win.pipeline (encode_job, denoise, decode)
                         on scail-win's engine, RoPE exact and fp32.
            Same inputs; the seed is set right before sampling (upstream's
            noise otherwise depends on how many random numbers its weight
            initialisation drew). Prints max abs and relative error against
            upstream of the conditioning, the final latents and the frames.
  dit       The DiT at full size (40 layers, hidden 5120, 16.4 B parameters)
            with random bf16 weights shared by upstream's class and mixins
            and scail-win's (fused RoPE exact and fp32, single-process
            attention, lean layers with fused layer ops; and exact RoPE with
            the layer ops on PyTorch, which must give upstream's bits): one
            batch-1 forward as the sampler calls it, outputs compared.
  fp8       The pipeline stage's tiny DiT (2 layers, hidden 128) in bf16,
            one forward at 256x448x33 with its Linear weights as bf16 and
            as fp8 e4m3fn with per-channel scales (what `convert --dtype
            fp8_e4m3fn` stores): the relative error of the output.

Usage (GPU machine, repo root; SCAIL tree in .scail; about 4 minutes on an H200):
    . benchmarks/gpu_env.sh
    python benchmarks/parity.py --example /work/shared/data/scail-example-001 --out $OUT/parity
Prints a table per stage and writes results.json to --out. Exits 0 with
"skipped" when there is no CUDA GPU or no SCAIL tree (SCAIL_ROOT).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dit import table  # noqa: E402  (one table printer for the benchmarks)

STAGES = ("pipeline", "dit", "fp8")
DIT_CONFIG_TOKENS = (512, 4096, 257, 1280)  # T5 tokens x width, CLIP tokens x width


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"), help="upstream SCAIL checkout")
    p.add_argument("--example", help="example folder (ref.jpg + rendered.mp4); default: the generated one")
    p.add_argument("--prompt", default="a person dances in front of a plain wall", help="the job's prompt")
    p.add_argument("--size", default="512x896", help="sampling size HxW of the pipeline stage")
    p.add_argument("--frames", type=int, default=65, help="pose frames of the pipeline stage (1 + 4k)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the pipeline stage")
    p.add_argument("--seed", type=int, default=42, help="seed set before each sampling")
    p.add_argument("--tiny-encoders", action="store_true", help="tiny T5/CLIP stand-ins (quick check)")
    p.add_argument("--dit-size", default="512x896", help="HxW of the full-size DiT forward")
    p.add_argument("--dit-frames", type=int, default=33, help="frames of the full-size DiT forward")
    p.add_argument("--dit-layers", type=int, default=None, help="override num_layers (quick checks)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    p.add_argument("--device", default="cuda", help="where everything runs")
    p.add_argument("--work", help="folder for the random weights (default: a temporary one, removed after)")
    p.add_argument("--out", default=os.environ.get("OUT", "parity_out"), help="folder for results.json")
    opts = p.parse_args(argv)
    for name in ("size", "dit_size"):
        try:
            setattr(opts, name, tuple(int(v) for v in getattr(opts, name).lower().split("x")))
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must look like 512x896")
    opts.stages = [s for s in opts.stages.split(",") if s]
    if set(opts.stages) - set(STAGES):
        p.error(f"--stages: choose from {','.join(STAGES)}")
    return opts


def skip_reason(opts):
    import torch

    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not opts.scail_root or not (Path(opts.scail_root) / "dit_video_crossattn_sc_xc.py").is_file():
        return "needs a SCAIL checkout: set SCAIL_ROOT or pass --scail-root"
    return None


# ---------------------------------------------------------------- helpers

def errors(reference, other):
    """(max abs, relative L2) of ``other`` against ``reference``."""
    a, b = reference.detach().float().cpu(), other.detach().float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs()
    return float(diff.max()), float((a - b).norm() / max(float(a.norm()), 1e-30))


def free(device):
    import torch

    gc.collect()  # sat's transformer refers to itself: only the collector frees it
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_upstream_engine_class(scail_root: Path):
    """Upstream's diffusion_video, loaded from its file under another name (the hook maps the name)."""
    spec = importlib.util.spec_from_file_location("upstream_diffusion_video", scail_root / "diffusion_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SATVideoDiffusionEngine


# ---------------------------------------------------------------- pipeline

CONDITIONING = ("concat_images", "ref_concat", "concat_smpl_render", "image_clip_features", "crossattn")


def upstream_run(opts, config, job, inputs, device):
    """Upstream's engine as its sample_video builds it, through upstream's sampling steps."""
    import torch
    from einops import rearrange
    from sat.model.base_model import get_model
    from sat.training.model_io import load_checkpoint

    from scail_win import arguments

    args = arguments.get_args(["--base", str(config), "--seed", str(opts.seed)])
    args.model_config.network_config.params.transformer_args.checkpoint_activations = False  # its __main__
    engine = get_model(args, load_upstream_engine_class(Path(opts.scail_root)))
    load_checkpoint(engine, args)
    engine.eval()

    image, pose, smpl = inputs
    out = {}
    with torch.no_grad():
        pose = pose.unsqueeze(0).to(device).to(torch.bfloat16)
        smpl = smpl.unsqueeze(0).to(device).to(torch.bfloat16)
        ori = image.unsqueeze(0).to(device).to(torch.bfloat16)

        def encode(frames):
            latent = engine.encode_first_stage(rearrange(frames, "b t c h w -> b c t h w").contiguous(), None,
                                               force_encode=True)
            return latent.permute(0, 2, 1, 3, 4).contiguous()

        out["concat_images"] = encode(torch.concat([ori, torch.zeros_like(pose[:, 1:])], dim=1))
        out["ref_concat"] = encode(ori)
        out["concat_smpl_render"] = encode(smpl)
        engine.i2v_clip.model.to(device)
        out["image_clip_features"] = engine.i2v_clip.visual(ori.permute(0, 2, 1, 3, 4))
        engine.conditioner.embedders[0].to(device)
        c, uc = engine.conditioner.get_unconditional_conditioning(
            {"txt": [job.prompt]}, batch_uc={"txt": [""]}, force_uc_zero_embeddings=[])
        out["crossattn"], out["uc_crossattn"] = c["crossattn"], uc["crossattn"]
        for d in (c, uc):
            d.update(concat_images=out["concat_images"], ref_concat=out["ref_concat"],
                     concat_pose=out["concat_smpl_render"], concat_smpl_render=out["concat_smpl_render"],
                     image_clip_features=out["image_clip_features"])
        latent = out["concat_images"]
        shape = (out["concat_smpl_render"].shape[1], *latent.shape[2:])
        rng_before_sampling = torch.get_rng_state()
        torch.manual_seed(opts.seed)
        out["latents"] = engine.sample(c, uc=uc, batch_size=1, shape=shape, ofs=torch.tensor([2.0]).to(device),
                                       fps=torch.tensor([args.sampling_fps]).to(device))
        out["video"] = engine.decode_first_stage(out["latents"].permute(0, 2, 1, 3, 4).contiguous()).float()
    return {k: v.float().cpu() for k, v in out.items()}, rng_before_sampling


def scail_win_run(opts, config, job, rope_mode, device):
    import torch

    from scail_win import arguments, pipeline, sample_video

    args = arguments.get_args(["--base", str(config), "--seed", str(opts.seed), "--rope-mode", rope_mode])
    model = sample_video.build_model(args)
    cond = pipeline.encode_job(model, job, args)
    out = {key: cond.c[key] for key in CONDITIONING}
    out["uc_crossattn"] = cond.uc["crossattn"]
    rng_before_sampling = torch.get_rng_state()
    torch.manual_seed(opts.seed)
    out["latents"] = pipeline.denoise(model, cond, args, None, "", 0, False)
    out["video"] = pipeline.decode(model, out["latents"])
    return {k: v.float().cpu() for k, v in out.items()}, rng_before_sampling


def stage_pipeline(opts, work, res):
    import torch

    from scail_win.testing import smoke
    from scail_win.io import video as video_io
    from scail_win.io.jobs import Job, validate_job
    from scail_win.pipeline import load_job_inputs

    device = torch.device(opts.device)
    height, width = opts.size
    t0 = time.perf_counter()
    setup = smoke.make_smoke_setup(work / "setup", height=height, width=width, frames=opts.frames,
                                   device=device, full_encoders=not opts.tiny_encoders)
    res["setup_s"] = time.perf_counter() - t0
    example = Path(opts.example) if opts.example else setup.example
    job = validate_job(Job(prompt=opts.prompt, input_dir=example), resolution=opts.size, max_frames=opts.frames,
                       output_dir=work / "samples")
    config = arguments_config(setup.config, opts.steps)
    image, pose, smpl = load_job_inputs(job, argparse.Namespace(representation="smpl_downsample",
                                                                   sampling_image_size=list(opts.size)))

    runs, seconds, rng = {}, {}, {}
    for name, run in (("upstream", lambda: upstream_run(opts, config, job, (image, pose, smpl), device)),
                      ("scail-win exact rope", lambda: scail_win_run(opts, config, job, "exact", device)),
                      ("scail-win fp32 rope", lambda: scail_win_run(opts, config, job, "fp32", device))):
        t0 = time.perf_counter()
        runs[name], rng[name] = run()
        seconds[name] = time.perf_counter() - t0
        free(device)  # the run's engine is gone with its function
    ref = runs["upstream"]
    # Without the reseed, each run's noise comes from the RNG as its build left it.
    res["same_noise_without_reseed"] = bool(rng["upstream"].equal(rng["scail-win exact rope"]))
    rows = []
    for name in ("scail-win exact rope", "scail-win fp32 rope"):
        entry = res.setdefault(name, {"seconds": seconds[name]})
        for key in (*CONDITIONING, "uc_crossattn", "latents", "video"):
            entry[key] = errors(ref[key], runs[name][key])
            rows.append((name, key, tuple(ref[key].shape), f"{entry[key][0]:.3g}", f"{entry[key][1]:.3g}"))
        frames = [video_io.to_uint8_frames(r["video"][0].permute(1, 0, 2, 3)).int() for r in (ref, runs[name])]
        entry["frames_uint8_max_abs"] = int((frames[0] - frames[1]).abs().max())
        rows.append((name, "frames (uint8)", tuple(frames[0].shape), entry["frames_uint8_max_abs"], ""))
    res["upstream_seconds"] = seconds["upstream"]
    print("seconds per run: " + ", ".join(f"{name} {sec:.1f}" for name, sec in seconds.items())
          + f"; same initial noise as upstream without the reseed: {res['same_noise_without_reseed']}")
    table(f"Pipeline vs upstream: {job.size[0]}x{job.size[1]}x{job.frames} from {example}, {opts.steps} steps, "
          f"seed {opts.seed}, {'tiny' if opts.tiny_encoders else 'full-size'} T5/CLIP, tiny DiT",
          ("run", "tensor", "shape", "max abs err", "rel err"), rows)


def arguments_config(config: Path, steps: int) -> Path:
    """The setup's config with the benchmark's step count (a sibling file)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    cfg.model.sampler_config.params.num_steps = steps
    path = config.with_name(f"{config.stem}-{steps}-steps.yaml")
    path.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------- full-size DiT

def stage_dit(opts, res):
    import torch
    from omegaconf import OmegaConf
    from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
    from sgm.util import instantiate_from_config

    from scail_win import arguments
    from scail_win.model.kernels import layer_ops
    from scail_win.testing import smoke
    from scail_win.diffusion_video import build_dit
    from scail_win.model.lazy_init import empty_weights
    from scail_win.placement.lean_layer import install_lean_layers

    device = torch.device(opts.device)
    dtype, dtype_str = (torch.bfloat16, "bf16") if device.type == "cuda" else (torch.float32, "fp32")
    arguments.get_args(["--seed", str(opts.seed)])  # sat's parallel groups, as a run has them
    model_cfg = OmegaConf.load(arguments.packaged_config_path()).model
    net_cfg = model_cfg.network_config
    if opts.dit_layers:
        net_cfg.params.num_layers = opts.dit_layers

    t0 = time.perf_counter()
    ours = build_dit(net_cfg, dtype_str=dtype_str, use_i2v_clip=True, rope_mode="fp32", empty_weights=True)
    smoke.randomize_(ours, device, opts.seed, dtype)
    shared = ours.state_dict()
    exact = build_dit(net_cfg, dtype_str=dtype_str, use_i2v_clip=True, rope_mode="exact", empty_weights=True)
    exact.load_state_dict(shared, strict=True, assign=True)
    up_cfg = OmegaConf.create(OmegaConf.to_container(net_cfg))
    up_cfg.params.dtype, up_cfg.params.use_i2v_clip = dtype_str, True
    up_cfg.params.transformer_args.checkpoint_activations = False
    with empty_weights():
        upstream = instantiate_from_config(up_cfg)
    upstream.load_state_dict(shared, strict=True, assign=True)
    res["dit_build_s"] = time.perf_counter() - t0
    res["dit_params"] = sum(p.numel() for p in ours.parameters())

    denoiser = instantiate_from_config(model_cfg.denoiser_config)
    height, width = opts.dit_size
    t, lh, lw = (opts.dit_frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(opts.seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    text_len, text_dim, clip_len, clip_dim = DIT_CONFIG_TOKENS
    cond = {"crossattn": rnd(1, text_len, text_dim), "image_clip_features": rnd(1, clip_len, clip_dim),
            "concat_images": rnd(1, t, 16, lh, lw), "ref_concat": rnd(1, 1, 16, lh, lw),
            "concat_smpl_render": rnd(1, t, 16, lh // 2, lw // 2)}
    cond["concat_pose"] = cond["concat_smpl_render"]
    x, sigma = rnd(1, t, 16, lh, lw), torch.full((1,), 0.9, device=device)

    # scail-win's DiTs run lean layers (unchunked, as its memory plan installs
    # them when the model fits); the last row keeps the layer ops on PyTorch,
    # upstream's own op chains, where exact RoPE must give upstream's bits.
    lean = [install_lean_layers(dit, None) for dit in (ours, exact)]
    outs, rows = {}, []
    for name, dit, backend in (("upstream", upstream, "auto"), ("scail-win fp32 rope", ours, "auto"),
                               ("scail-win exact rope", exact, "auto"),
                               ("scail-win exact rope, layer ops on PyTorch", exact, "torch")):
        network = OpenAIWrapper(dit.eval(), compile_model=False, dtype=dtype)
        os.environ[layer_ops.BACKEND_ENV] = backend
        with torch.no_grad():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[name] = denoiser(network, x, sigma, dict(cond), concat_images=None, chunk_dim=None,
                                  cfg_scale=4.0).float().cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
        os.environ.pop(layer_ops.BACKEND_ENV)
        seconds = time.perf_counter() - t0
        err = errors(outs["upstream"], outs[name]) if name != "upstream" else (0.0, 0.0)
        res[f"dit {name}"] = {"seconds": seconds, "max_abs_err": err[0], "rel_err": err[1]}
        rows.append((name, f"{seconds:.2f}", f"{err[0]:.3g}", f"{err[1]:.3g}"))
    tokens = t * (lh // 2) * (lw // 2) + (lh // 2) * (lw // 2) + t * (lh // 4) * (lw // 4)
    table(f"Full-size DiT ({res['dit_params'] / 1e9:.2f} B params, {dtype_str}), one batch-1 forward, "
          f"{height}x{width}x{opts.dit_frames} ({tokens} tokens)", ("model", "seconds", "max abs err", "rel err"),
          rows)
    for handle in lean:
        handle.remove()
    del ours, exact, upstream, shared
    free(device)


# ---------------------------------------------------------------- fp8 on the tiny DiT

def stage_fp8(opts, res):
    import torch
    from omegaconf import OmegaConf

    from scail_win import arguments
    from scail_win.testing import smoke
    from scail_win.weights import checkpoint as weights
    from scail_win.diffusion_video import build_dit

    device = torch.device(opts.device)
    arguments.get_args(["--seed", str(opts.seed)])  # sat's parallel groups, as a run has them
    net = OmegaConf.load(arguments.packaged_config_path()).model.network_config
    # sat's LayerNorm has no bf16 CPU path without affine weights.
    extra = {"elementwise_affine": True} if device.type == "cpu" else {}
    net.params = OmegaConf.merge(net.params, smoke.TINY_DIT, extra)
    dit = build_dit(net, dtype_str="bf16", use_i2v_clip=True, rope_mode="fp32", empty_weights=True)
    smoke.randomize_(dit, device, opts.seed, torch.bfloat16)
    dit.eval()
    g = torch.Generator(device=device).manual_seed(opts.seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    t, h, w = 9, 32, 56  # latents of 256x448x33
    text_len, _, clip_len, clip_dim = DIT_CONFIG_TOKENS
    inputs = dict(x=rnd(1, t, 16, h, w), timesteps=torch.full((1,), 700.0, device=device),
                  context=rnd(1, text_len, int(net.params.text_dim)), concat_images=rnd(1, t, 16, h, w),
                  ref_concat=rnd(1, 1, 16, h, w), concat_smpl_render=rnd(1, t, 16, h // 2, w // 2),
                  image_clip_features=rnd(1, clip_len, clip_dim))
    with torch.no_grad():
        reference = dit(**inputs)
        count = 0
        for name, p in dit.named_parameters():
            if weights.is_fp8_candidate(name, tuple(p.shape)):
                q, scale = weights.quantize_fp8(p.data)
                p.data = weights.dequantize(q, scale, torch.bfloat16)
                count += 1
        out = dit(**inputs)
    err = errors(reference, out)
    res.update(tensors=count, max_abs_err=err[0], rel_err=err[1])
    table(f"fp8 e4m3fn (per-channel scales) vs bf16 weights, tiny DiT, one forward on {device}",
          ("fp8 tensors", "max abs err", "rel err"), [(count, f"{err[0]:.3g}", f"{err[1]:.3g}")])
    del dit
    free(device)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    opts = parse_args(argv)
    reason = skip_reason(opts)
    if reason:
        print(f"parity: skipped ({reason})")
        return 0
    sys.path.insert(0, str(Path(opts.scail_root).resolve()))  # SCAIL's vendored sat and sgm come first
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="scail-win-parity-"))
    res = {"options": {k: v for k, v in vars(opts).items() if k != "stages"}, "stages": opts.stages}
    try:
        if "pipeline" in opts.stages:
            res["pipeline"] = {}
            stage_pipeline(opts, work, res["pipeline"])
        if "dit" in opts.stages:
            res["dit"] = {}
            stage_dit(opts, res["dit"])
        if "fp8" in opts.stages:
            res["fp8"] = {}
            stage_fp8(opts, res["fp8"])
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
