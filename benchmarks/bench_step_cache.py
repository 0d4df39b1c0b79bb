#!/usr/bin/env python3
"""The step cache (scail_win.model.step_cache) on SCAIL's full-size DiT: what it costs and what it skips.

Random bf16 weights (bench_dit's builder), lean layers as the memory plan
installs them when everything fits, CFG batch 2 through sgm's denoiser.

  cost        One CFG step at --size x --frames: no cache; the cache with
              threshold 0 (every step computed: the cache's overhead) with
              residuals on the device and in pinned CPU memory; and a
              skipped step (same input, huge threshold) for both storages.
              Step time, peak allocated memory, memory the cache keeps
              between steps, host syncs per forward, and the skipped step's
              error against the computed one (same input: rounding only).
  trajectory  --steps steps of RFSampler's rectified flow (shifted
              schedule, shift 5; VanillaCFG scale from the config) at --traj-size, from one noise, without the cache
              and with it at each --thresholds value: forwards skipped,
              which steps, relative error of the final latents against the
              uncached run, total time.  With random weights the DiT's
              output is no video, so these skip counts say how the rule
              behaves, not what SCAIL-Preview's weights would skip.

Usage (GPU machine, repo root, SCAIL tree in .scail):
    . benchmarks/gpu_env.sh
    python benchmarks/bench_step_cache.py --scail-root .scail --out $OUT/step_cache
Prints a table per stage and writes results.json to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_dit as bd  # noqa: E402  (the full-size DiT, its inputs and the table printer)

LOG = logging.getLogger("bench_step_cache")
GIB = bd.GIB


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"), help="upstream SCAIL checkout")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for results.json")
    p.add_argument("--stages", default="cost,trajectory", help="comma-separated stages")
    p.add_argument("--size", default="512x896", help="HxW in pixels (cost stage)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--traj-size", default="256x448", help="HxW in pixels (trajectory stage)")
    p.add_argument("--traj-frames", type=int, default=33)
    p.add_argument("--steps", type=int, default=20, help="sampling steps in the trajectory stage")
    p.add_argument("--thresholds", default="0.05,0.1,0.2", help="thresholds for the trajectory stage")
    p.add_argument("--warmup", type=int, default=None, help="step cache warmup (default: the module's)")
    p.add_argument("--max-skips", type=int, default=None, help="step cache max_skips (default: the module's)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up (cost stage)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (quick checks)")
    args = p.parse_args(argv)
    for name in ("size", "traj_size"):
        setattr(args, name, tuple(int(v) for v in getattr(args, name).lower().split("x")))
    args.thresholds = [float(v) for v in args.thresholds.split(",") if v]
    if not args.scail_root:
        p.error("--scail-root (or SCAIL_ROOT) is required")
    return args


def cache_options(args):
    from scail_win.model import step_cache

    return dict(warmup=step_cache.DEFAULT_WARMUP if args.warmup is None else args.warmup,
                max_skips=step_cache.DEFAULT_MAX_SKIPS if args.max_skips is None else args.max_skips)


def stage_cost(args, cfg, dit, res):
    from scail_win.model.step_cache import install_step_cache

    dev = torch.device("cuda", 0)
    x, s, c, uc, tokens = bd.latent_inputs(args.size, args.frames, dev)
    step = bd.Step(cfg, dit)
    res["cost_tokens_per_sample"] = tokens
    rows, out = [], {}

    sec, peaks, ref = bd.timed(lambda: step.cfg(x, s, c, uc), args.repeats)
    ref = ref.float()
    syncs = bd.count_syncs(lambda: step.cfg(x, s, c, uc))
    res["cost"] = out
    out["no cache"] = dict(step_s=sec, peak_alloc_gib=peaks[0], kept_gib=0.0, syncs=syncs, rel_err=0.0)
    base = sec
    for storage in ("device", "cpu"):
        for name, threshold in ((f"computed, {storage}", 0.0), (f"skipped, {storage}", 1e9)):
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            cache = install_step_cache(dit, threshold, warmup=0, max_skips=10 ** 6, storage=storage)
            counter = iter(range(10 ** 6))

            def call():
                cache.begin_step(next(counter), 10 ** 6)
                return step.cfg(x, s, c, uc)

            try:
                # timed's warm-up call computes and fills the cache; the timed ones follow the threshold.
                sec, peaks, got = bd.timed(call, args.repeats)
                kept = (torch.cuda.memory_allocated() - before) / GIB
                syncs = bd.count_syncs(call)
                skipped = cache.skipped
                err = bd.rel_err(got, ref)[1]
                del got
            finally:
                cache.remove()
            expected_skips = 0 if threshold == 0 else args.repeats + 1
            if skipped != expected_skips:
                raise RuntimeError(f"{name}: {skipped} forwards skipped, expected {expected_skips}")
            out[name] = dict(step_s=sec, peak_alloc_gib=peaks[0], kept_gib=kept, syncs=syncs, rel_err=err)
    for name, r in out.items():
        rows.append((name, f"{r['step_s']:.3f}", f"{r['step_s'] / base:.3f}", f"{r['peak_alloc_gib']:.2f}",
                     f"{r['kept_gib']:.2f}", r["syncs"], f"{r['rel_err']:.3g}"))
    bd.table(f"Step cache cost, one CFG step (batch 2, one branch), {args.size[0]}x{args.size[1]}x{args.frames} "
             f"({2 * tokens} tokens), lean layers unchunked",
             ("run", "step s", "x no cache", "peak GiB", "kept GiB", "syncs", "rel err vs computed"), rows)
    del step, ref
    torch.cuda.empty_cache()


def make_sampler(cfg, steps, device):
    """SCAIL's own RFSampler (hunyuan-style shifted schedule, VanillaCFG) for ``steps`` steps."""
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    config = OmegaConf.create(OmegaConf.to_container(cfg.sampler_config))
    config.params.num_steps = steps
    config.params.verbose = False
    sampler = instantiate_from_config(config)
    sampler.device = device
    return sampler


def sample(step, sampler, x0, c, uc, cache=None, steps=None):
    """Upstream's sampling loop (sampler_step per step), telling ``cache`` each step; the first ``steps``."""
    x, s_in, sigmas, _, c, uc, *_ = sampler.prepare_sampling_loop(x0.clone(), dict(c), dict(uc))

    def denoiser(input, sigma, cond, **extra):
        return step.denoiser(step.network, input, sigma, cond, concat_images=None, chunk_dim=None, **extra)

    n = len(sigmas) - 1
    with torch.no_grad():
        for i in range(n if steps is None else steps):
            if cache is not None:
                cache.begin_step(i, n)
            x = sampler.sampler_step(s_in * sigmas[i], s_in * sigmas[i + 1], denoiser, x, c, uc)
    return x


def stage_trajectory(args, cfg, dit, res):
    from scail_win.model.step_cache import install_step_cache

    dev = torch.device("cuda", 0)
    x, _, c, uc, tokens = bd.latent_inputs(args.traj_size, args.traj_frames, dev, seed=7)
    step = bd.Step(cfg, dit)
    sampler = make_sampler(cfg, args.steps, dev)
    options = cache_options(args)
    runs = res["trajectory"] = {"tokens_per_sample": tokens, "steps": args.steps, **options}
    sample(step, sampler, x, c, uc, steps=1)  # kernels, RoPE tables
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reference = sample(step, sampler, x, c, uc)
    torch.cuda.synchronize()
    base = time.perf_counter() - t0
    rows = [("no cache", 0, args.steps, "-", f"{base:.1f}", "1.000", "0")]
    for threshold in args.thresholds:
        cache = install_step_cache(dit, threshold, storage="device", **options)
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = sample(step, sampler, x, c, uc, cache)
            torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            decisions = list(cache.decisions)
            summary = cache.summary()
        finally:
            cache.remove()
        err = bd.rel_err(got, reference)[1]
        skipped = [d.step for d in decisions if d.skipped]
        changes = [None if d.change is None else round(d.change, 4) for d in decisions]
        runs[str(threshold)] = dict(seconds=sec, skipped_steps=skipped, changes=changes, rel_err=err,
                                    summary=summary)
        LOG.info("%s", summary)
        rows.append((f"threshold {threshold:g}", len(skipped), args.steps, ",".join(map(str, skipped)) or "-",
                     f"{sec:.1f}", f"{sec / base:.3f}", f"{err:.3g}"))
    bd.table(f"Step cache over {args.steps} RFSampler steps, {args.traj_size[0]}x{args.traj_size[1]}x"
             f"{args.traj_frames}, CFG batch 2, random weights (warmup {options['warmup']}, "
             f"max skips {options['max_skips']})",
             ("run", "skipped", "of", "skipped steps", "total s", "x no cache", "final rel err"), rows)
    changes = runs[str(args.thresholds[0])]["changes"] if args.thresholds else []
    LOG.info("first-block residual change per step: %s", changes)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return 0
    scail_root = Path(args.scail_root).resolve()
    sys.path.insert(0, str(scail_root))
    import scail_win.hook
    from scail_win.placement.lean_layer import install_lean_layers

    scail_win.hook.install()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cfg = bd.model_config(scail_root, args.layers)
    bd.init_upstream_distributed()
    dit = bd.build_ours(cfg, "fp32", torch.device("cuda", 0))
    lean = install_lean_layers(dit, None)
    try:
        if "cost" in args.stages:
            stage_cost(args, cfg, dit, res)
        gc.collect()
        torch.cuda.empty_cache()
        if "trajectory" in args.stages:
            stage_trajectory(args, cfg, dit, res)
    finally:
        lean.remove()
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
