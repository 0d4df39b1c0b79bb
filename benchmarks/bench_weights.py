#!/usr/bin/env python3
"""Weights on the GPU machine: fp8 error, file-backed low-RAM block swap, load time.

Full-size SCAIL DiT (16.4 B parameters) with random weights, one CFG step at
512x896x81, in one run:

  fp8      output of one forward with the per-layer Linear weights stored as
           fp8 e4m3fn (per-output-channel scales, upcast to bf16) against bf16.
  files    the bf16 DiT written as safetensors (and as fp8), then timed from
           the files: meta build + memory-mapped load + first step, resident;
           and block-swapped at the 8 GiB plan in 'stream' mode (layers
           copied from the memory-mapped file through pinned staging
           buffers), with step time, RssAnon (what must fit in RAM) and
           RssFile (page cache, reclaimable).
  pinned   (with files) the same in 'pinned' mode too, one pinned master
           per layer (30 GiB of RAM), for the stream-vs-pinned step time.
  fp8mm    (with files and the fp8 file) the fp8 file resident, upcast (the
           default) and with fp8 matmuls (weights kept fp8 on the GPU,
           torch._scaled_mm: scail_win.model.kernels.fp8_linear), and streamed at the card
           size with fp8 matmuls.

Usage (GPU machine, after `. benchmarks/gpu_env.sh`):
    python benchmarks/bench_weights.py --scail-root .scail --dir /tmp/w --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dit as bd  # noqa: E402  (shares the model and input builders)

GIB = bd.GIB


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scail-root", required=True)
    p.add_argument("--dir", default="/tmp/scail-win-weights", help="where the safetensors files go")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--stages", default="fp8,files")
    p.add_argument("--card", type=float, default=8.0, help="card size (GiB) for the swapped runs")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--file-dtypes", default="bf16,fp8", help="files stage: which files to write and time")
    args = p.parse_args(argv)
    args.stages = args.stages.split(",")
    args.file_dtypes = args.file_dtypes.split(",")
    if "bf16" not in args.file_dtypes:
        p.error("--file-dtypes: bf16 is needed (the resident and pinned rows read it)")
    unknown = set(args.file_dtypes) - {"bf16", "fp8"}
    if unknown:
        p.error(f"--file-dtypes: unknown {', '.join(sorted(unknown))}; choose from bf16, fp8")
    return args


def write_safetensors(dit, path: Path, fp8: bool) -> float:
    from scail_win.weights import checkpoint as weights

    sd = dit.state_dict()
    entries, tail = [], []
    for name, t in sd.items():
        if fp8 and weights.is_fp8_candidate(name, tuple(t.shape)):
            entries.append((name, torch.float8_e4m3fn, tuple(t.shape)))
            tail.append((name + "_scale", torch.float32, (t.shape[0],)))
        else:
            entries.append((name, t.dtype, tuple(t.shape)))
    t0 = time.perf_counter()
    with weights.SafetensorsWriter(path, entries, tail=tail) as writer:
        scales = {}
        for name in writer.pending:
            if name in scales:
                writer.write(name, scales.pop(name))
                continue
            t = sd[name]
            if fp8 and weights.is_fp8_candidate(name, tuple(t.shape)):
                q, s = weights.quantize_fp8(t)
                scales[name + "_scale"] = s
                writer.write(name, q)
            else:
                writer.write(name, t)
        writer.commit()
    return time.perf_counter() - t0


def stage_fp8(args, cfg, res, dit, inputs):
    from scail_win.weights import checkpoint as weights

    x, s, c, uc, _ = inputs
    step = bd.Step(cfg, dit)
    with torch.no_grad():
        ref = step.cfg(x, s, c, uc).float()
        saved = {}
        for name, p in dit.named_parameters():
            if weights.is_fp8_candidate(name, tuple(p.shape)):
                saved[name] = p.data
                q, scale = weights.quantize_fp8(p.data)
                p.data = weights.dequantize(q, scale, torch.bfloat16)
        out = step.cfg(x, s, c, uc).float()
        for name, p in dit.named_parameters():
            if name in saved:
                p.data = saved[name]
    err = bd.rel_err(out, ref)
    res["fp8"] = {"max_abs_err": err[0], "rel_err": err[1], "tensors": len(saved),
                  "params_fp8": sum(t.numel() for t in saved.values())}
    bd.table("fp8 e4m3fn (per-channel scales) vs bf16, one CFG step", ("tensors", "rel err", "max abs err"),
             [(len(saved), f"{err[1]:.4f}", f"{err[0]:.4f}")])


def stage_files(args, cfg, res, dit, inputs):
    from scail_win.model.kernels import fp8_linear
    from scail_win.placement import memory_plan as memory
    from scail_win.placement import offload
    from scail_win.weights import checkpoint as weights
    from scail_win.diffusion_video import build_dit
    from scail_win.placement.registry import HookRegistry
    from scail_win.model.loader import _SplitCFG, largest_group_gpu_bytes, place_dit

    dev = torch.device("cuda", 0)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: folder / f"dit-{kind}.safetensors" for kind in args.file_dtypes}
    rows = []
    for kind, path in files.items():
        sec = write_safetensors(dit, path, fp8=(kind == "fp8"))
        res[f"write_{kind}_s"] = sec
        res[f"size_{kind}_gib"] = path.stat().st_size / GIB
    x, s, c, uc, _ = inputs
    with torch.no_grad():
        ref = bd.Step(cfg, dit).cfg(x, s, c, uc).float().cpu()
    # The capped runs below must not find this model's 30 GiB still on the GPU.
    for p in dit.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    del dit
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory

    def run(label, path, mode, fp8_matmul=False):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = build_dit(cfg.network_config, dtype_str="bf16", use_i2v_clip=True, rope_mode="fp32",
                          empty_weights=True)
        source = weights.open_state_dict(path)
        fp8 = "fp8" in path.name
        groups = offload.scail_layer_groups(model)
        fp8_mm = fp8_linear.plan_fp8_matmul(model, dev, fp8_matmul, fp8)
        resident_bytes = (sum(p.numel() for p in model.parameters()) - sum(g.numel for g in groups)) * 2
        dit_spec, *_ = memory.scail_specs(bd.model_spec(cfg), *args.size, 81,
                                          group_bytes=largest_group_gpu_bytes(model, groups, frozenset(fp8_mm)),
                                          resident_bytes=resident_bytes,
                                          dit_host_bytes_per_param=1 if fp8 else 2)
        keep = set(fp8_mm)
        if mode != "resident":
            names = {id(t): n for n, t in model.named_parameters()}
            keep |= {names[id(t)] for g in groups for t in g.tensors if id(t) in names}
        weights.load_into(model, source, placement="cpu" if mode != "resident" else dev, dtype=torch.bfloat16,
                          keep_fp8=lambda n: n in keep, strict=True)
        if fp8_mm:
            fp8_linear.install_fp8_linears(model, fp8_mm, dev)
        model.eval()
        swap = None
        step = bd.Step(cfg, model)
        if mode != "resident":
            plan = memory.plan_memory(dit_spec, total_vram_bytes=int(args.card * GIB), offload_mode=mode)
            torch.cuda.set_per_process_memory_fraction(args.card * GIB / total, dev)
            cw = weights.CheckpointWeights(source, dtype=torch.bfloat16, keep_fp8=fp8_mm.__contains__)
            placement = place_dit(model, plan, dev, cw)
            swap = placement.swap
            if plan.cfg_split:
                HookRegistry.of(step.network).add(_SplitCFG())
        ready = time.perf_counter() - t0
        status = "ok"
        try:
            with torch.no_grad():
                t1 = time.perf_counter()
                out = step.cfg(x, s, c, uc).float().cpu()
                torch.cuda.synchronize()
                first = time.perf_counter() - t1
                torch.cuda.reset_peak_memory_stats()
                t1 = time.perf_counter()
                step.cfg(x, s, c, uc)
                torch.cuda.synchronize()
                second = time.perf_counter() - t1
            err = bd.rel_err(out, ref)
        except torch.cuda.OutOfMemoryError as exc:
            first = second = float("nan")
            err = (float("nan"),) * 2
            status = f"OOM: {str(exc)[:60]}"
        peaks = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
        hm = bd.host_memory()
        if swap is not None:
            placement.undo()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        res[f"files_{label}"] = {"ready_s": ready, "first_step_s": first, "step_s": second, "peak_alloc_gib": peaks[0],
                                 "peak_reserved_gib": peaks[1], "host": hm, "rel_err_vs_bf16": err[1],
                                 "status": status}
        rows.append((label, f"{ready:.1f}", f"{first:.2f}", f"{second:.2f}", f"{peaks[0]:.2f}",
                     f"{hm.get('RssAnon', 0):.1f}", f"{hm.get('RssFile', 0):.1f}", f"{err[1]:.4f}", status))
        del model, step, swap, source
        gc.collect()

    run("bf16 resident", files["bf16"], "resident")
    if "pinned" in args.stages:
        run(f"bf16 pinned {args.card:g}GiB", files["bf16"], "pinned")
    run(f"bf16 stream {args.card:g}GiB", files["bf16"], "stream")
    if "fp8" in files:
        run(f"fp8 stream {args.card:g}GiB", files["fp8"], "stream")
    if "fp8" in files and "fp8mm" in args.stages:
        run("fp8 resident", files["fp8"], "resident")
        run("fp8 resident fp8-matmul", files["fp8"], "resident", fp8_matmul=True)
        run(f"fp8 stream {args.card:g}GiB fp8-matmul", files["fp8"], "stream", fp8_matmul=True)
    bd.table("From safetensors files: build + mmap load + first step", (
        "run", "ready s", "1st step s", "step s", "peak alloc GiB", "RssAnon GiB", "RssFile GiB", "rel err",
        "status"), rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.size = (512, 896)
    scail_root = Path(args.scail_root).resolve()
    sys.path.insert(0, str(scail_root))
    import scail_win.hook
    scail_win.hook.install()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    cfg = bd.model_config(scail_root, args.layers)
    bd.init_upstream_distributed()
    dev = torch.device("cuda", 0)
    dit = bd.build_ours(cfg, "fp32", dev)
    inputs = bd.latent_inputs(args.size, 81, dev)
    try:
        if "fp8" in args.stages:
            stage_fp8(args, cfg, res, dit, inputs)
        if "files" in args.stages:
            stage_files(args, cfg, res, dit, inputs)
    finally:
        (out / "weights.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
