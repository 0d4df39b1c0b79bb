#!/usr/bin/env python3
"""Time to video: solvers, guidance 1, attention kernels, fp8 matmul and the step cache.

SCAIL's DiT (full size unless --layers/--tiny) with random weights, run
through scail-win's own engine loop (``SATVideoDiffusionEngine.sample``:
upstream's RFSampler steps for euler + CFG, scail-win's solvers otherwise),
side by side in one process:

  steps    at --size/--frames (default 512x896x81), resident and at the
           --budgets plans (GPU capped with set_per_process_memory_fraction):
           seconds per denoising step for each setting (median of the steps
           after a warm-up step), peak allocated/reserved, and the velocity's
           error against the default row from the same noise; then the
           whole-denoising time of each preset (steps x measured step time;
           the 4-step guidance-1 row is also timed end to end) and its
           speed-up over today's default (euler, 50 steps, CFG 4).
  quality  at --quality-size/--quality-frames: every setting sampled to the
           end from the same noise and conditioning, relative L2 error of the
           final latents against a --ref-steps Euler reference (CFG 4), and
           the step cache's skipped forwards and error against its uncached
           run. Random weights: this measures the solvers' numerical error on
           this network, not what a viewer would see.

Usage (GPU machine, ``. benchmarks/gpu_env.sh`` first):
    python benchmarks/bench_speed.py --stages steps,quality
    python benchmarks/bench_speed.py --tiny --stages quality       # the tiny DiT
Prints one table per stage and writes speed.json to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import CLIP_DIM, CLIP_TOKENS, TEXT_DIM, TEXT_LEN, rel_err, table  # noqa: E402

LOG = logging.getLogger("bench_speed")
GIB = 1024 ** 3
DEFAULT_STEPS, DEFAULT_CFG = 50, 4.0


class _Stop(Exception):
    """Raised from the step callback once enough steps are timed."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="steps,quality", help="comma-separated: steps, quality")
    p.add_argument("--size", default="512x896", help="HxW for the steps stage")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--budgets", default="0,8", help="card sizes (GiB) for the steps stage; 0: resident")
    p.add_argument("--timed-steps", type=int, default=2, help="timed steps per row after one warm-up step")
    p.add_argument("--quality-size", default="256x448")
    p.add_argument("--quality-frames", type=int, default=17)
    p.add_argument("--ref-steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--tiny", action="store_true", help="the smoke test's tiny DiT (CPU-sized)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT", "."),
                   help="SCAIL checkout whose DiT code is imported (default: $SCAIL_ROOT, else the current folder)")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.quality_size = tuple(int(v) for v in args.quality_size.lower().split("x"))
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    return args


# -- the engine ------------------------------------------------------------------------------


def build_engine(opts, device):
    from scail_win import arguments
    from scail_win.testing import smoke
    from scail_win.diffusion_video import SATVideoDiffusionEngine

    args = arguments.get_args(["--base", str(arguments.packaged_config_path()), "--seed", "1"])
    from omegaconf import OmegaConf

    if opts.tiny:
        # A deep merge, as the smoke test builds it: TINY_DIT overrides nested module params.
        args.model_config.network_config.params = OmegaConf.merge(args.model_config.network_config.params,
                                                                  smoke.TINY_DIT)
    params = args.model_config.network_config.params
    if opts.layers:
        params.num_layers = opts.layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        args.bf16, args.fp16 = False, False
    engine = SATVideoDiffusionEngine(args, empty_weights=True).eval()
    engine.compute_device = device
    smoke.randomize_(engine.model.diffusion_model, device, 0, dtype)
    return engine, args


def conditioning(engine, size, frames, device, seed=1):
    """Random conditioning of the right shapes (what encode_job gives) and the latent shape."""
    params = engine.args.model_config.network_config.params
    text_dim = int(params.get("text_dim", TEXT_DIM))
    h, w = size
    t, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = engine.dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    clip_dim = CLIP_DIM
    shared = {"concat_images": rnd(1, t, 16, lh, lw), "ref_concat": rnd(1, 1, 16, lh, lw),
              "concat_pose": rnd(1, t, 16, lh // 2, lw // 2), "image_clip_features": rnd(1, CLIP_TOKENS, clip_dim)}
    shared["concat_smpl_render"] = shared["concat_pose"]
    c = {"crossattn": rnd(1, TEXT_LEN, text_dim), **shared}
    uc = {"crossattn": rnd(1, TEXT_LEN, text_dim), **shared}
    return c, uc, (t, 16, lh, lw)


def set_options(args, **values):
    """Change run options the way a run gets them: in the RunConfig attached to ``args``."""
    from scail_win import run_config

    setattr(args, run_config.ATTRIBUTE, run_config.of(args).with_options(**values))


def configure(engine, sampler="euler", steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, attention="sdpa"):
    from scail_win.model.kernels import attention as attention_mod

    set_options(engine.args, sampler=sampler)
    used, _ = engine.sampling_settings()
    if used != sampler:
        raise RuntimeError(f"the engine samples with {used}, not {sampler}")
    engine.sampler.num_steps = steps
    engine.sampler.guider.scale = cfg
    attention_mod.configure(attention)


def sample(engine, c, uc, shape, *, stop_after=None, seed=7, states=None):
    """Sample from the seeded noise; returns (latents or None, per-step seconds, first-step x, noise x).

    ``states``: a list that gets the latents after every step (float32, on the CPU).
    """
    device = engine.compute_device
    times, first = [], {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    last = [time.perf_counter()]

    def on_step(i, n, x, solver):
        sync()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        if not first:
            first["x"] = x.float().cpu()
        if states is not None:
            states.append(x.float().cpu())
        if stop_after is not None and len(times) >= stop_after:
            raise _Stop

    torch.manual_seed(seed)
    noise = torch.randn(1, *shape).float()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            out = engine.sample(dict(c), uc=dict(uc), batch_size=1, shape=shape,
                                ofs=torch.tensor([2.0], device=device), fps=torch.tensor([16], device=device),
                                step_callback=on_step)
        out = out.float().cpu()
    except _Stop:
        out = None
    return out, times, first.get("x"), noise


def step_velocity_error(row, reference):
    """Relative error of the first step's velocity: both rows start from the same noise and sigmas."""
    if row is None or reference is None:
        return float("nan")
    (x1, x0), (r1, r0) = row, reference
    return rel_err(x1 - x0, r1 - r0)[1]


def peaks(device):
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB


def reset_peaks(device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- placements -------------------------------------------------------------------------------


class Placement:
    """The memory plan for a card of ``budget`` GiB (None: resident), applied the loader's way."""

    def __init__(self, engine, args, device, budget):
        from scail_win.model import loader as model_loader

        self.engine, self.device, self.budget = engine, device, budget
        dit = engine.model.diffusion_model
        set_options(args, vram_budget=budget)
        plan = model_loader.make_plan(args, dit, device)
        if budget is not None and device.type == "cuda":
            dit.to("cpu")
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GIB / total), device)
        self.plan = plan
        self.placement = model_loader.apply_memory_plan(engine, plan, device)
        if plan is None:
            engine.model.to(device)
        self.label = "resident" if budget is None else f"{budget:g} GiB plan"
        self.describe = plan.describe().splitlines()[0] if plan is not None else "no plan"

    def undo(self):
        from scail_win.placement.registry import HookRegistry

        HookRegistry.of(self.engine.model).remove_all()
        self.placement.undo()
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self.engine.model.to(self.device)
            torch.cuda.empty_cache()


def with_step_cache(engine, placement, threshold, **kwargs):
    from scail_win.model.step_cache import install_step_cache

    offloaded = placement.plan is not None and (placement.placement.swap is not None or placement.plan.cfg_split)
    storage = "cpu" if offloaded and placement.device.type == "cuda" else "device"
    engine.step_cache = install_step_cache(engine.model.diffusion_model, threshold, storage=storage, **kwargs)
    return engine.step_cache


def drop_step_cache(engine):
    cache = engine.__dict__.pop("step_cache", None)
    if cache is not None:
        cache.remove()


def quantize_fp8_(engine):
    """Store every per-layer linear weight in fp8 e4m3 with per-channel scales, as `convert` writes them."""
    from scail_win.model.kernels import fp8_linear
    from scail_win.weights import checkpoint as weights

    dit = engine.model.diffusion_model
    names = fp8_linear.fp8_linear_weights(dit)
    owners = {f"{n}.weight": m for n, m in dit.named_modules()}
    for name in names:
        module = owners[name]
        q, scale = weights.quantize_fp8(module.weight.data)
        module._parameters["weight"] = torch.nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(q.device))
    return names


# -- stages ---------------------------------------------------------------------------------------


SETTINGS = (  # label, sampler, cfg, attention
    ("euler + CFG 4 (default)", "euler", 4.0, "sdpa"),
    ("unipc + CFG 4", "unipc", 4.0, "sdpa"),
    ("guidance 1 (uncond skipped)", "euler", 1.0, "sdpa"),
    ("sage attention + CFG 4", "euler", 4.0, "sage"),
    ("sage, guidance 1", "euler", 1.0, "sage"),
)


def stage_steps(opts, engine, args, device, res):
    from scail_win.model.kernels import attention as attention_mod
    from scail_win.errors import UserError

    c, uc, shape = conditioning(engine, opts.size, opts.frames, device)
    have_sage = attention_mod.available_backends().get("sage") == "available"
    budgets = [b or None for b in opts.budgets] if device.type == "cuda" else [None]
    rows, per_step, fp8_names = [], {}, None
    for budget in budgets:
        place = Placement(engine, args, device, budget)
        reference = None
        settings = list(SETTINGS)
        settings.append(("step cache, a skipped step", "euler", 4.0, "sdpa"))
        for label, sampler, cfg, attention in settings:
            if attention == "sage" and not have_sage:
                rows.append((place.label, label, "not installed", "", "", "", ""))
                continue
            try:
                configure(engine, sampler, DEFAULT_STEPS, cfg, attention)
                if attention != "sdpa":
                    attention_mod.select_backend(attention, device, engine.dtype)
            except UserError as exc:
                rows.append((place.label, label, "unusable", "", "", "", str(exc)[:90]))
                print(rows[-1], flush=True)
                continue
            if label.startswith("step cache"):
                # Every forward after the first computed one is skipped.
                with_step_cache(engine, place, 1e9, warmup=1, max_skips=10 ** 6)
            reset_peaks(device)
            try:
                _, times, x1, x0 = sample(engine, c, uc, shape, stop_after=1 + opts.timed_steps)
                status = "ok"
            except torch.cuda.OutOfMemoryError as exc:
                times, x1, x0, status = [float("nan")] * 2, None, None, f"OOM {str(exc)[:40]}"
            finally:
                drop_step_cache(engine)
            sec = statistics.median(times[1:]) if len(times) > 1 else float("nan")
            alloc, reserved = peaks(device)
            if reference is None:
                reference = (x1, x0)
            err = step_velocity_error((x1, x0), reference) if cfg == 4.0 and x1 is not None else float("nan")
            per_step[(place.label, label)] = sec
            res[f"step {place.label} {label}"] = dict(step_s=sec, times=times, peak_alloc_gib=alloc,
                                                      peak_reserved_gib=reserved, v_rel_err=err, status=status)
            rows.append((place.label, label, f"{sec:.2f}", f"{alloc:.2f}", f"{reserved:.2f}",
                         "--" if err != err else f"{err:.3g}", status))
            print(rows[-1], flush=True)
        if budget is None:
            # The real thing end to end: a 4-step guidance-1 denoising, resident.
            configure(engine, "euler", 4, 1.0, "sdpa")
            t0 = time.perf_counter()
            sample(engine, c, uc, shape)
            if device.type == "cuda":
                torch.cuda.synchronize()
            res["whole 4-step guidance-1 denoising s"] = time.perf_counter() - t0
        place.undo()
    # fp8 weights, resident: upcast (today) and fp8 matmul.
    if device.type == "cuda":
        from scail_win.model.kernels import fp8_linear

        fp8_names = quantize_fp8_(engine)
        gc.collect()
        torch.cuda.empty_cache()
        reference = None
        for label, use in (("fp8 weights, upcast + CFG 4", False), ("fp8 weights, fp8 matmul + CFG 4", True)):
            place = Placement(engine, args, device, None)
            handle = fp8_linear.install_fp8_linears(engine.model.diffusion_model, fp8_names,
                                                    device if use else None)
            configure(engine, "euler", DEFAULT_STEPS, 4.0, "sdpa")
            reset_peaks(device)
            _, times, x1, x0 = sample(engine, c, uc, shape, stop_after=1 + opts.timed_steps)
            handle.remove()
            sec = statistics.median(times[1:])
            alloc, reserved = peaks(device)
            base = res.get("step resident euler + CFG 4 (default)", {})
            err = step_velocity_error((x1, x0), reference) if reference is not None else float("nan")
            if reference is None:
                reference = (x1, x0)
            per_step[("resident", label)] = sec
            res[f"step resident {label}"] = dict(step_s=sec, peak_alloc_gib=alloc, peak_reserved_gib=reserved,
                                                 v_rel_err_vs_upcast=err, times=times,
                                                 bf16_step_s=base.get("step_s"))
            rows.append(("resident", label, f"{sec:.2f}", f"{alloc:.2f}", f"{reserved:.2f}",
                         "--" if err != err else f"{err:.3g} (vs upcast)", "ok"))
            print(rows[-1], flush=True)
            place.undo()
    h, w = opts.size
    table(f"Seconds per denoising step, {h}x{w}x{opts.frames}, {sum(p.numel() for p in engine.model.parameters()) / 1e9:.1f} B "
          f"DiT (velocity error: first step vs the default row, same noise)",
          ("placement", "setting", "step s", "peak alloc GiB", "peak reserved GiB", "v rel err", "status"), rows)
    whole_video_table(res, per_step, budgets)


PRESETS = (  # label, steps, per-step setting
    ("euler 50 + CFG 4 (today's default)", 50, "euler + CFG 4 (default)"),
    ("unipc 25 + CFG 4", 25, "unipc + CFG 4"),
    ("unipc 20 + CFG 4", 20, "unipc + CFG 4"),
    ("distill 8 steps, guidance 1", 8, "guidance 1 (uncond skipped)"),
    ("distill 4 steps, guidance 1", 4, "guidance 1 (uncond skipped)"),
    ("distill 4 steps, guidance 1, sage", 4, "sage, guidance 1"),
    ("euler 50 + CFG 4, sage", 50, "sage attention + CFG 4"),
    ("euler 50 + CFG 4, fp8 matmul", 50, "fp8 weights, fp8 matmul + CFG 4"),
)


def whole_video_table(res, per_step, budgets):
    rows = []
    for budget in budgets:
        place = "resident" if budget is None else f"{budget:g} GiB plan"
        base = per_step.get((place, PRESETS[0][2]))
        for label, steps, setting in PRESETS:
            sec = per_step.get((place, setting))
            if sec is None or sec != sec or base is None:
                continue
            total = steps * sec
            res[f"video {place} {label}"] = dict(seconds=total, speedup=50 * base / total)
            rows.append((place, label, steps, f"{sec:.2f}", f"{total:.0f}", f"{50 * base / total:.1f}x"))
    whole = res.get("whole 4-step guidance-1 denoising s")
    title = "Whole denoising (steps x measured step time), speed-up over today's default in the same run"
    if whole is not None:
        title += f"; a 4-step guidance-1 denoising timed end to end (resident): {whole:.1f} s"
    table(title, ("placement", "preset", "steps", "step s", "denoising s", "speed-up"), rows)


QUALITY = (  # label, sampler, steps, cache threshold
    ("euler 50", "euler", 50, 0.0),
    ("euler 25", "euler", 25, 0.0),
    ("euler 20", "euler", 20, 0.0),
    ("unipc 25", "unipc", 25, 0.0),
    ("unipc 20", "unipc", 20, 0.0),
    ("dpmpp_2m 25", "dpmpp_2m", 25, 0.0),
    ("dpmpp_2m 20", "dpmpp_2m", 20, 0.0),
    ("euler 50, step cache 0.05", "euler", 50, 0.05),
    ("euler 50, step cache 0.1", "euler", 50, 0.1),
    ("euler 50, step cache 0.2", "euler", 50, 0.2),
)


def velocity_roughness(states, steps, shift=5.0):
    """How far the network's velocity is from smooth along an Euler trajectory.

    Euler's velocity at step i is (x[i+1] - x[i]) / (sigma[i+1] - sigma[i]).
    Returns the medians of |v[i+1] - v[i]| / |v[i]| and of
    |v[i+2] - 2 v[i+1] + v[i]| / |v[i+1] - v[i]|: the second is well under 1
    where the velocity is smooth in time, which multistep solvers rely on.
    """
    from scail_win.samplers import flow_sigmas

    sigmas = flow_sigmas(steps, shift)
    v = [(states[i + 1] - states[i]) / float(sigmas[i + 2] - sigmas[i + 1]) for i in range(len(states) - 1)]
    first = [float((v[i + 1] - v[i]).norm() / v[i].norm()) for i in range(len(v) - 1)]
    second = [float((v[i + 2] - 2 * v[i + 1] + v[i]).norm() / (v[i + 1] - v[i]).norm()) for i in range(len(v) - 2)]
    return statistics.median(first), statistics.median(second)


def stage_quality(opts, engine, args, device, res):
    c, uc, shape = conditioning(engine, opts.quality_size, opts.quality_frames, device, seed=3)
    place = Placement(engine, args, device, None)
    configure(engine, "euler", opts.ref_steps, DEFAULT_CFG, "sdpa")
    t0 = time.perf_counter()
    reference, _, _, _ = sample(engine, c, uc, shape)
    ref_s = time.perf_counter() - t0
    rows, outs = [], {}
    for label, sampler, steps, threshold in QUALITY:
        configure(engine, sampler, steps, DEFAULT_CFG, "sdpa")
        cache = with_step_cache(engine, place, threshold) if threshold else None
        states = [] if label == "euler 50" else None
        t0 = time.perf_counter()
        out, times, _, _ = sample(engine, c, uc, shape, states=states)
        seconds = time.perf_counter() - t0
        if states is not None:
            res["velocity_step_change"], res["velocity_second_over_first"] = velocity_roughness(states, steps)
        skipped = f"{cache.skipped}/{cache.skipped + cache.computed}" if cache is not None else ""
        drop_step_cache(engine)
        outs[label] = out
        err = rel_err(out, reference)[1]
        vs_euler50 = rel_err(out, outs["euler 50"])[1] if label != "euler 50" else 0.0
        res[f"quality {label}"] = dict(rel_err_vs_ref=err, rel_err_vs_euler50=vs_euler50, seconds=seconds,
                                       skipped=skipped)
        rows.append((label, f"{err:.4f}", f"{vs_euler50:.4f}", skipped, f"{seconds:.1f}"))
    place.undo()
    h, w = opts.quality_size
    table(f"Final latents against a {opts.ref_steps}-step Euler reference (CFG 4, same noise; {ref_s:.0f} s), "
          f"{h}x{w}x{opts.quality_frames}, {sum(p.numel() for p in engine.model.parameters()) / 1e9:.2f} B DiT, "
          "random weights", ("setting", "rel err vs reference", "rel err vs euler 50", "forwards skipped",
                             "seconds"), rows)
    print(f"Velocity along euler 50: median step-to-step change {res['velocity_step_change']:.3f} (relative); "
          f"median second difference / first difference {res['velocity_second_over_first']:.2f} "
          "(well under 1 where it is smooth in time, as multistep solvers assume)\n", flush=True)


def main(argv=None) -> int:
    opts = parse_args(argv)
    # The DiT module (dit_video_crossattn_sc_xc) lives at the SCAIL tree's top level.
    sys.path.insert(0, str(Path(opts.scail_root).resolve()))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    device = torch.device(opts.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    t0 = time.perf_counter()
    engine, args = build_engine(opts, device)
    res["build_s"] = time.perf_counter() - t0
    for name, stage in (("quality", stage_quality), ("steps", stage_steps)):
        if name in opts.stages:
            stage(opts, engine, args, device, res)
            (out / "speed.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
