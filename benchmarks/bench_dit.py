#!/usr/bin/env python3
"""SCAIL's full-size DiT on one GPU: upstream vs scail-win, resident and block-swapped.

Random weights, 16.4 B parameters, one sampling step at 512x896, 81 frames
(CFG batch 2, 97,664 tokens), called the way RFSampler calls it. In one run:

  resident   upstream's DiT (its own mixins, Ulysses all-to-all on a one-rank
             NCCL group, as upstream runs) against scail-win's DiT built by
             ``scail_win.diffusion_video.build_dit`` on the SAME weight tensors
             (fused 3D RoPE in fp32 and exact modes, single-process attention,
             lean layers with the fused layer ops), and two rows that take the
             layer ops, then the lean layers away: step time, peak memory,
             output error, host syncs per forward.
  swap       scail-win's DiT with the memory plan for 24, 12 and 8 GiB cards
             (process capped with set_per_process_memory_fraction): blocks on
             the GPU, step time against resident, peak allocated/reserved,
             host RSS.
  phases     the other phases at the 8 GiB plan: umT5-XXL (block-swapped),
             CLIP ViT-H, Wan VAE encode (81 frames) and decode (21 latent
             frames), tiled as the plan says; peak allocated/reserved each.
  activations  (not in the default stages; meant for --layers 2) scail-win's
             DiT resident, batch 1 and CFG batch 2: activation peak
             (max_memory_allocated minus what was allocated before the call)
             without lean layers and with lean layers (scail_win.placement.lean_layer)
             of no chunking and 32768 ... 4096 tokens, against the estimate
             lean_activation_widths; time per call and error against the
             model without lean layers.

--lean-chunk N sets the lean layers' chunk in the resident stage (default 0:
unchunked, as the memory plan runs them when everything fits).

Usage (GPU machine, SCAIL tree in .scail, our package importable):
    PYTHONPATH=.:.scail python benchmarks/bench_dit.py --scail-root .scail --out $OUT
Prints one table per stage and writes results.json to --out.
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

# Upstream's attention kernel, so the parity figures compare like with like
# (--attention auto would take SageAttention where it is installed).
os.environ.setdefault("SCAIL_WIN_ATTENTION", "sdpa")

LOG = logging.getLogger("bench_dit")
GIB = 1024 ** 3
MODEL_YAML = "configs/video_model/Wan2.1-i2v-14Bsc-pose-xc-latent.yaml"
TEXT_LEN, TEXT_DIM, CLIP_TOKENS, CLIP_DIM = 512, 4096, 257, 1280
# --rows keys of the resident stage -> its row names.
RESIDENT_ROWS = {"upstream": "upstream", "fp32": "scail-win fp32 rope", "exact": "scail-win exact rope",
                 "torch-ops": "fp32, layer ops on PyTorch", "no-lean": "fp32, upstream layer forward"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"), help="upstream SCAIL checkout")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for results.json")
    p.add_argument("--stages", default="resident,swap,phases", help="comma-separated stages")
    p.add_argument("--size", default="512x896", help="HxW in pixels")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--budgets", default="24,12,8", help="card sizes (GiB) for the swap stage")
    p.add_argument("--rows", default=",".join(RESIDENT_ROWS),
                   help="the resident stage's rows, comma-separated (upstream is always measured: the baseline)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (quick checks)")
    p.add_argument("--lean-chunk", type=int, default=0,
                   help="lean layers' token chunk in the resident stage (0: unchunked)")
    args = p.parse_args(argv)
    if not args.scail_root or not (Path(args.scail_root) / MODEL_YAML).is_file():
        p.error("--scail-root must name an upstream SCAIL checkout")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.stages = [s for s in args.stages.split(",") if s]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - set(RESIDENT_ROWS)
    if unknown:
        p.error(f"--rows {','.join(sorted(unknown))}: choose from {','.join(RESIDENT_ROWS)}")
    if args.lean_chunk < 0:
        p.error("--lean-chunk must be >= 0")
    return args


# ---------------------------------------------------------------- helpers

def host_memory() -> dict:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / GIB
    return out


def model_config(scail_root: Path, layers):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(scail_root / MODEL_YAML).model
    if layers:
        cfg.network_config.params.num_layers = layers
    return cfg


def model_spec(cfg):
    """The ModelSpec of ``cfg`` (upstream's model yaml) with upstream's sampling arguments for SCAIL-Preview."""
    from scail_win.model.spec import ModelSpec

    return ModelSpec.from_model_config(cfg, vae_compress_size=[4, 8, 8], representation="smpl_downsample")


def random_weights_(module: torch.nn.Module, device, seed=0) -> None:
    """Give every meta parameter random bf16 values on ``device`` (fast, on the GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(module.named_parameters()):
        if p.device.type != "meta":
            continue
        data = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            data.add_(1.0)
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        owner._parameters[name.rsplit(".", 1)[-1]] = torch.nn.Parameter(data.to(torch.bfloat16), requires_grad=False)


def init_upstream_distributed():
    from sat import mpu

    torch.cuda.set_device(0)
    port = 29500 + os.getpid() % 1000
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0,
                                         device_id=torch.device("cuda:0"))
    mpu.initialize_model_parallel(1, 1, 0)


def build_upstream(cfg, ours):
    """Upstream's own DiT class and mixins, sharing ``ours``'s weight tensors."""
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from scail_win.model.lazy_init import empty_weights

    net = OmegaConf.create(OmegaConf.to_container(cfg.network_config))
    net.params.dtype = "bf16"
    net.params.use_i2v_clip = True
    net.params.transformer_args.checkpoint_activations = False
    with empty_weights():
        dit = instantiate_from_config(net)
    missing, unexpected = dit.load_state_dict(ours.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return dit.eval()


def build_ours(cfg, rope_mode, device, share=None):
    from scail_win.diffusion_video import build_dit

    dit = build_dit(cfg.network_config, dtype_str="bf16", use_i2v_clip=True, rope_mode=rope_mode,
                    empty_weights=True)
    if share is None:
        random_weights_(dit, device)
    else:
        dit.load_state_dict(share.state_dict(), strict=True, assign=True)
    return dit.eval()


def latent_inputs(size, frames, device, seed=1):
    h, w = size
    t, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    shared = {"concat_images": rnd(1, t, 16, lh, lw), "ref_concat": rnd(1, 1, 16, lh, lw),
              "concat_pose": rnd(1, t, 16, lh // 2, lw // 2), "image_clip_features": rnd(1, CLIP_TOKENS, CLIP_DIM)}
    shared["concat_smpl_render"] = shared["concat_pose"]
    cond = {"crossattn": rnd(1, TEXT_LEN, TEXT_DIM), **shared}
    uncond = {"crossattn": rnd(1, TEXT_LEN, TEXT_DIM), **shared}
    x = rnd(1, t, 16, lh, lw, dtype=torch.float32)
    sigma = torch.full((1,), 0.9, device=device)
    tokens = t * (lh // 2) * (lw // 2) + (lh // 2) * (lw // 2) + t * (lh // 4) * (lw // 4)
    return x, sigma, cond, uncond, tokens


class Step:
    """One RFSampler network call through sgm's Denoiser, OpenAIWrapper and VanillaCFG."""

    def __init__(self, cfg, dit):
        from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
        from sgm.util import instantiate_from_config

        self.denoiser = instantiate_from_config(cfg.denoiser_config)
        self.guider = instantiate_from_config(cfg.sampler_config.params.guider_config)
        self.network = OpenAIWrapper(dit, compile_model=False, dtype=torch.bfloat16)

    def cfg(self, x, s, c, uc):
        inputs = self.guider.prepare_inputs(x, s, dict(c), dict(uc))
        return self.denoiser(self.network, *inputs, concat_images=None, chunk_dim=None, cfg_scale=self.guider.scale)

    def single(self, x, s, c):
        return self.denoiser(self.network, x, s, dict(c), concat_images=None, chunk_dim=None,
                             cfg_scale=self.guider.scale)


def timed(fn, repeats):
    """Warm-up call, then ``repeats`` timed calls; returns (median s, peaks, output)."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, out = [], None
        for _ in range(repeats):
            out = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peaks = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
    return statistics.median(times), peaks, out


def count_syncs(fn) -> int:
    """Host synchronisations (cudaStreamSynchronize/cudaDeviceSynchronize) in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum(e.count for e in prof.key_averages()
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    return total - 1  # the synchronize this function adds


def rel_err(a, b) -> tuple[float, float]:
    a, b = a.float(), b.float()
    return float((a - b).abs().max()), float((a - b).norm() / b.norm())


def table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    print("\n".join(lines) + "\n", flush=True)


def stage_resident(args, cfg, res):
    from scail_win.model.kernels import layer_ops
    from scail_win.placement.lean_layer import install_lean_layers

    dev = torch.device("cuda", 0)
    ours = build_ours(cfg, "fp32", dev)
    exact = build_ours(cfg, "exact", dev, share=ours)
    upstream = build_upstream(cfg, ours)
    x, s, c, uc, tokens = latent_inputs(args.size, args.frames, dev)
    res["tokens_per_sample"] = tokens
    res["lean_chunk"] = args.lean_chunk
    chunk = args.lean_chunk or None
    # (name, model, lean layers?, layer-ops backend): the first three are what
    # scail-win runs (lean layers as its memory plan installs them, fused
    # layer ops); the last two take those away one at a time.
    variants = [("upstream", upstream, False, "auto"), ("scail-win fp32 rope", ours, True, "auto"),
                ("scail-win exact rope", exact, True, "auto"),
                ("fp32, layer ops on PyTorch", ours, True, "torch"),
                ("fp32, upstream layer forward", ours, False, "auto")]
    wanted = {RESIDENT_ROWS[key] for key in args.rows} | {"upstream"}
    variants = [v for v in variants if v[0] in wanted]
    rows, outs = [], {}
    torch.cuda.empty_cache()
    weights_gib = torch.cuda.memory_allocated() / GIB
    for name, dit, lean, backend in variants:
        handle = install_lean_layers(dit, chunk) if lean else None
        os.environ[layer_ops.BACKEND_ENV] = backend
        try:
            step = Step(cfg, dit)
            sec, peaks, out = timed(lambda st=step: st.cfg(x, s, c, uc), args.repeats)
            outs[name] = out.float().cpu()
            del out
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                step.single(x, s, c)
            act1 = torch.cuda.max_memory_allocated() / GIB - weights_gib
            syncs = count_syncs(lambda st=step: st.single(x, s, c))
        finally:
            os.environ.pop(layer_ops.BACKEND_ENV, None)
            if handle is not None:
                handle.remove()
        res[name] = {"cfg_step_s": sec, "peak_alloc_gib": peaks[0], "peak_reserved_gib": peaks[1],
                     "batch1_activation_gib": act1, "host_syncs_batch1": syncs, "lean_layers": lean,
                     "layer_ops": backend}
        torch.cuda.empty_cache()
    base = res["upstream"]["cfg_step_s"]
    for name, r in ((n, res[n]) for n in outs):
        err = rel_err(outs[name], outs["upstream"]) if name != "upstream" else (0.0, 0.0)
        r["max_abs_err_vs_upstream"], r["rel_err_vs_upstream"] = err
        rows.append((name, f"{r['cfg_step_s']:.2f}", f"{r['cfg_step_s'] / base:.3f}", f"{r['peak_alloc_gib']:.1f}",
                     f"{r['batch1_activation_gib']:.2f}", r["host_syncs_batch1"], f"{err[0]:.3g}", f"{err[1]:.3g}"))
    table(f"Resident CFG step, {args.size[0]}x{args.size[1]}x{args.frames} ({2 * tokens} tokens), weights "
          f"{weights_gib:.1f} GiB, lean layers {'unchunked' if chunk is None else chunk}",
          ("model", "step s", "x upstream", "peak GiB", "act b1 GiB", "syncs b1", "max abs err", "rel err"), rows)
    del upstream, exact, outs, step
    gc.collect()  # sat's transformer refers to itself: only the collector frees it
    torch.cuda.empty_cache()
    return ours


def stage_swap(args, cfg, res, ours):
    from scail_win.placement import memory_plan as memory
    from scail_win.placement import offload
    from scail_win.placement.registry import HookRegistry
    from scail_win.placement.lean_layer import install_lean_layers
    from scail_win.model.loader import _SplitCFG, place_dit

    dev = torch.device("cuda", 0)
    x, s, c, uc, tokens = latent_inputs(args.size, args.frames, dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    step = Step(cfg, ours)
    resident_s = res.get("scail-win fp32 rope", {}).get("cfg_step_s")
    # The resident reference runs as scail-win runs a model that fits: lean
    # layers, unchunked.
    handle = install_lean_layers(ours, None)
    try:
        if resident_s is None:
            resident_s, _, _ = timed(lambda: step.cfg(x, s, c, uc), args.repeats)
        with torch.no_grad():
            ref = step.cfg(x, s, c, uc).float().cpu()
    finally:
        handle.remove()
    for p in ours.parameters():
        p.data = p.data.cpu()
    del step
    step = Step(cfg, ours)
    gc.collect()
    torch.cuda.empty_cache()
    res["swap_gpu_before_gib"] = torch.cuda.memory_allocated() / GIB
    groups = offload.scail_layer_groups(ours)
    group_bytes = max(g.numel for g in groups) * 2
    resident_bytes = sum(p.numel() for p in ours.parameters()) * 2 - sum(g.numel for g in groups) * 2
    rows = []
    for card in args.budgets:
        dit_spec, *_ = memory.scail_specs(model_spec(cfg), *args.size, args.frames, group_bytes=group_bytes,
                                          resident_bytes=resident_bytes)
        plan = memory.plan_memory(dit_spec, total_vram_bytes=int(card * GIB))
        torch.cuda.set_per_process_memory_fraction(min(1.0, card * GIB / total), dev)
        t0 = time.perf_counter()
        placement = place_dit(ours, plan, dev)  # what scail-win's model loader does
        attach_s = time.perf_counter() - t0
        if placement.swap is None:
            ours.to(dev)
        if plan.cfg_split:
            HookRegistry.of(step.network).add(_SplitCFG())
        try:
            sec, peaks, out = timed(lambda: step.cfg(x, s, c, uc), args.repeats)
            err = rel_err(out.cpu(), ref)
            del out
            status = "ok"
        except torch.cuda.OutOfMemoryError as exc:
            sec, peaks, err, status = float("nan"), (float("nan"),) * 2, (float("nan"),) * 2, f"OOM {exc}"[:80]
        if placement.swap is not None:
            placement.swap.release_all()
        hm = host_memory()
        HookRegistry.of(step.network).remove_all()
        placement.undo()
        if placement.swap is None:
            ours.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        res[f"swap_{card:g}GiB"] = {"plan": plan.describe(), "blocks_on_gpu": plan.blocks_on_gpu,
                                    "cfg_split": plan.cfg_split, "lean_chunk": plan.layer_chunk_tokens,
                                    "step_s": sec, "vs_resident": sec / resident_s, "peak_alloc_gib": peaks[0],
                                    "peak_reserved_gib": peaks[1], "attach_s": attach_s, "host": hm,
                                    "max_abs_err_vs_resident": err[0], "rel_err_vs_resident": err[1],
                                    "status": status}
        rows.append((f"{card:g} GiB", plan.blocks_on_gpu, "yes" if plan.cfg_split else "no",
                     plan.layer_chunk_tokens or "all", f"{sec:.2f}", f"{sec / resident_s:.3f}", f"{peaks[0]:.2f}",
                     f"{peaks[1]:.2f}", f"{hm.get('RssAnon', 0):.1f}", f"{hm.get('VmHWM', 0):.1f}",
                     f"{err[1]:.2g}", status))
    table(f"Memory plans (block swap: pinned masters, side-stream prefetch); resident step {resident_s:.2f} s",
          ("card", "blocks on GPU", "split CFG", "lean chunk", "step s", "x resident", "peak alloc GiB",
           "peak reserved GiB", "RssAnon GiB", "peak RSS GiB", "rel err", "status"), rows)


LEAN_CHUNKS = (None, 32768, 16384, 8192, 4096)


def stage_activations(args, cfg, res):
    """Activation peaks of scail-win's DiT without and with lean layers, batch 1 and 2."""
    from scail_win.placement.lean_layer import install_lean_layers, lean_activation_widths

    dev = torch.device("cuda", 0)
    ours = build_ours(cfg, "fp32", dev)
    x, s, c, uc, tokens = latent_inputs(args.size, args.frames, dev)
    step = Step(cfg, ours)
    params = cfg.network_config.params
    hidden, ffn = int(params.hidden_size), int(params.inner_hidden_size)
    calls = {1: lambda st=step: st.single(x, s, c), 2: lambda st=step: st.cfg(x, s, c, uc)}
    refs, rows, out = {}, [], {}
    for label, chunk in [("off", False)] + [(str(n or "unchunked"), n) for n in LEAN_CHUNKS]:
        handle = install_lean_layers(ours, chunk) if chunk is not False else None
        try:
            for batch, call in calls.items():
                width = batch * tokens * hidden * 2  # bf16 widths of all samples
                with torch.no_grad():
                    result = call()  # warm-up: RoPE tables, kernels
                    del result
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    result = call()
                    torch.cuda.synchronize()
                    sec = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() - before
                result = result.float().cpu()
                if chunk is False:
                    refs[batch] = result
                err = rel_err(result, refs[batch])
                estimate = None if chunk is False else lean_activation_widths(chunk, tokens, hidden, ffn, batch)
                out[f"{label}_b{batch}"] = {"activation_gib": peak / GIB, "widths": peak / width,
                                            "estimate_widths": estimate, "s": sec,
                                            "max_abs_err_vs_off": err[0], "rel_err_vs_off": err[1]}
                rows.append((label, batch, f"{peak / GIB:.2f}", f"{peak / width:.2f}",
                             "-" if estimate is None else f"{estimate:.2f}", f"{sec:.3f}", f"{err[0]:.3g}",
                             f"{err[1]:.3g}"))
        finally:
            if handle is not None:
                handle.remove()
    res["activations"] = {"tokens_per_sample": tokens, "layers": len(ours.transformer.layers), **out}
    table(f"Activation peaks, {args.size[0]}x{args.size[1]}x{args.frames} ({tokens} tokens per sample), "
          f"{len(ours.transformer.layers)} layers; widths of batch x {tokens} x {hidden} bf16",
          ("lean chunk", "batch", "act GiB", "widths", "estimate", "s", "max abs err", "rel err"), rows)
    del calls, step, ours
    gc.collect()
    torch.cuda.empty_cache()


def stage_phases(args, cfg, res):
    """T5, CLIP and VAE at the 8 GiB plan (random weights, full architectures)."""
    from scail_win.placement import memory_plan as memory
    from scail_win.placement import offload
    from scail_win.model import vae_tiling
    from scail_win.model.lazy_init import empty_weights
    from scail_win.phases import Phase

    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).total_memory
    card = 8.0
    dit_spec, t5_spec, clip_spec, vae_spec = memory.scail_specs(model_spec(cfg), *args.size, args.frames)
    plan = memory.plan_memory(dit_spec, total_vram_bytes=int(card * GIB), t5=t5_spec, clip=clip_spec, vae=vae_spec)
    rows = []

    def measure(name, fn):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(card * GIB / total, dev)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fn()
            torch.cuda.synchronize()
            status = "ok"
        except torch.cuda.OutOfMemoryError:
            status = "OOM"
        sec = time.perf_counter() - t0
        peaks = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        res[f"phase_{name}"] = {"s": sec, "peak_alloc_gib": peaks[0], "peak_reserved_gib": peaks[1],
                                "status": status}
        rows.append((name, f"{peaks[0]:.2f}", f"{peaks[1]:.2f}", f"{sec:.2f}", status))

    # umT5-XXL encoder: block-swapped through the GPU, 512 tokens.
    from sgm.modules.encoders.umt5 import umt5_xxl
    t5 = umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.bfloat16, device="meta")
    for name, p in list(t5.named_parameters()):
        owner = t5.get_submodule(name.rsplit(".", 1)[0]) if "." in name else t5
        # Random values made on the GPU (a CPU fill of 5.7 B values takes minutes).
        data = torch.empty(p.shape, dtype=torch.bfloat16, device=dev).uniform_(-0.02, 0.02).cpu()
        owner._parameters[name.rsplit(".", 1)[-1]] = torch.nn.Parameter(data, requires_grad=False)
    ids = torch.randint(0, 256_000, (1, TEXT_LEN), device=dev)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=dev)
    swap = offload.BlockSwap(t5, offload.groups_from_modulelists(t5, ["blocks"]), dev, mode="stream")
    swap.attach()
    measure(f"{Phase.TEXT} (umT5, {plan.t5_placement})", lambda m=t5: m(ids, mask))
    swap.detach()
    del t5, swap

    # CLIP ViT-H/14 visual tower, as CLIPModel.visual runs it.
    from sgm.modules.encoders.clip import clip_xlm_roberta_vit_h_14
    clip, _ = clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=True, return_tokenizer=False,
                                        dtype=torch.float16, device="meta")
    random_weights_(clip, dev)
    clip = clip.half()
    image = torch.randn(1, 3, 224, 224, device=dev, dtype=torch.float16)
    def clip_visual(m=clip):
        with torch.autocast("cuda", dtype=torch.float16):  # as CLIPModel.visual runs it
            return m.visual(image, use_31_block=True)

    measure(str(Phase.CLIP), clip_visual)
    del clip, clip_visual  # the function's default argument holds the weights too

    # Wan VAE: encode the 81-frame i2v clip and decode 21 latent frames, tiled per the plan.
    from sgm.models.wan_vae import WanVAE_
    with empty_weights():
        vae = WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
    random_weights_(vae, dev)
    vae = vae.to(torch.bfloat16)
    scale = [torch.zeros(16, device=dev, dtype=torch.bfloat16), torch.ones(16, device=dev, dtype=torch.bfloat16)]

    class Vae:
        """Upstream's WanVAE wrapper, as vae_tiling recognises it (its .model and .scale)."""
        def __init__(self):
            self.model, self.device, self.dtype, self.scale = vae, dev, torch.bfloat16, scale

        def encode(self, videos):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return torch.cat([vae.encode(u.unsqueeze(0), scale).float() for u in videos])

        def decode(self, zs):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return torch.cat([vae.decode(u.unsqueeze(0), scale).float().clamp_(-1, 1) for u in zs])

    wrapped = Vae()
    h, w = args.size
    video = torch.zeros(1, 3, args.frames, h, w, device=dev, dtype=torch.bfloat16)
    enc = plan.vae_tile_kwargs_for(Phase.VAE_ENCODE.vae_op)
    dec = plan.vae_tile_kwargs_for(Phase.VAE_DECODE.vae_op)
    measure(f"{Phase.VAE_ENCODE} {enc.get('tile_px', 'untiled')}",
            lambda v=video: vae_tiling.tiled_encode(wrapped, v, **enc) if enc else wrapped.encode(v))
    del video
    z = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, device=dev, dtype=torch.bfloat16)
    measure(f"{Phase.VAE_DECODE} {dec.get('tile_latent', 'untiled')}",
            lambda: vae_tiling.tiled_decode(wrapped, z, **dec) if dec else wrapped.decode(z))
    res["phases_plan"] = plan.describe()
    table(f"Other phases at the {card:g} GiB plan (process capped to {card:g} GiB)",
          ("phase", "peak alloc GiB", "peak reserved GiB", "s", "status"), rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scail_root = Path(args.scail_root).resolve()
    sys.path.insert(0, str(scail_root))
    import scail_win.hook
    scail_win.hook.install()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cfg = model_config(scail_root, args.layers)
    init_upstream_distributed()
    ours = None
    try:
        if "activations" in args.stages:
            stage_activations(args, cfg, res)
        if "resident" in args.stages:
            ours = stage_resident(args, cfg, res)
        if "swap" in args.stages:
            if ours is None:
                ours = build_ours(cfg, "fp32", torch.device("cuda", 0))
            stage_swap(args, cfg, res, ours)
        del ours
        torch.cuda.empty_cache()
        if "phases" in args.stages:
            stage_phases(args, cfg, res)
    finally:
        res["host_final"] = host_memory()
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
