#!/usr/bin/env python3
"""Time from process start to a ready DiT: upstream's loading path against scail-win's.

Paths, each timed in a fresh Python process on the same checkpoint files:

  upstream  what sat does: build the DiT on the CPU with random init (fp32),
            cast to bf16, move it to the GPU, torch.load the whole .pt pickle
            into RAM, load_state_dict(strict=False).
  ours      build on the meta device (no init, no memory), then
            scail_win.weights.load_into from the converted dit.safetensors,
            memory-mapped, each tensor copied straight to the GPU.
  ours-pt   the same from the original .pt (memory-mapped, weights_only).

Stages (--stage, default all): `generate` writes a random bf16 checkpoint in
SCAIL's layout, DIR/sat/model/1/mp_rank_00_model_states.pt (about 33 GB at
the full 40 layers; --layers scales it); `convert` streams it into
DIR/converted/dit.safetensors with scail_win.convert and records time and
peak RSS; `time` runs the paths.  Each stage is a separate command when a
run must stay under a time limit; files persist in DIR between them.

Before each timed process the page cache is dropped when the process may
(root on Linux); the table says whether it was ("cold") or not ("warm").

The DiT comes from --builder MODULE:FUNCTION (with --builder-kwargs JSON):
a callable that builds the DiT on torch's current default device with
upstream's random init and returns the nn.Module whose state_dict keys,
prefixed with --prefix, are the checkpoint's keys.  The benchmark calls it
under `torch.device("meta")` for our path and plainly (CPU) for upstream's.
Without --builder a stand-in with the parameter shapes and sat names of
SCAIL's DiT (16.3 B parameters at 40 layers) is used.

Disk: the .pt plus the bf16 safetensors need ~66 GB at 40 layers (fp8:
~50 GB); RAM: generation holds the whole checkpoint, upstream's path peaks
near 2x the bf16 size.  On a 64 GB-disk machine use --layers 20.

Examples:
  python benchmarks/bench_load.py --dir /tmp/bench --layers 20
  python benchmarks/bench_load.py --dir /tmp/bench --stage time --paths ours,upstream --out results.json
  python benchmarks/bench_load.py --dir /tmp/bench --builder mypkg.build:scail_dit --prefix model.diffusion_model.
  CPU smoke run: python benchmarks/bench_load.py --dir /tmp/b --layers 1 --width-div 16 --device cpu
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scail_win import weights as W  # noqa: E402
from scail_win.convert import convert_checkpoint  # noqa: E402

GIB = 2**30
SAT_REL = Path("sat") / "model" / "1" / "mp_rank_00_model_states.pt"
ST_REL = Path("converted") / "dit.safetensors"
PATHS = ("upstream", "ours", "ours-pt")


class _Layer(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.attention.dense = nn.Linear(hidden, hidden)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.cross_attention = nn.Module()
        self.cross_attention.query = nn.Linear(hidden, hidden)
        self.cross_attention.key_value = nn.Linear(hidden, 2 * hidden)
        self.cross_attention.dense = nn.Linear(hidden, hidden)
        self.post_cross_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(hidden, ffn)
        self.mlp.dense_4h_to_h = nn.Linear(ffn, hidden)


class StandInDiT(nn.Module):
    """SCAIL's DiT parameter shapes under sat-style names; no forward (loading only)."""

    def __init__(self, layers: int = 40, hidden: int = 5120, ffn: int = 13824, text_dim: int = 4096,
                 clip_dim: int = 1280, time_dim: int = 256):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_Layer(hidden, ffn) for _ in range(layers))
        self.mixins = nn.Module()
        patch = nn.Module()
        patch.proj = nn.Conv3d(36, hidden, (1, 2, 2), stride=(1, 2, 2))
        patch.proj_pose = nn.Conv3d(16, hidden, (1, 2, 2), stride=(1, 2, 2))
        patch.text_proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.mixins.patch_embed = patch
        adaln = nn.Module()
        adaln.adaLN_modulations = nn.ParameterList(
            nn.Parameter(torch.randn(1, 6, hidden) / hidden**0.5) for _ in range(layers))
        for name in ("query_layernorm_list", "key_layernorm_list", "cross_query_layernorm_list",
                     "cross_key_layernorm_list", "clip_feature_key_layernorm_list"):
            setattr(adaln, name, nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers)))
        adaln.clip_feature_key_value_list = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(layers))
        self.mixins.adaln_layer = adaln
        final = nn.Module()
        final.norm_final = nn.LayerNorm(hidden, elementwise_affine=False)
        final.linear = nn.Linear(hidden, 16 * 4)
        final.adaLN_modulation = nn.Parameter(torch.randn(1, 2, hidden) / hidden**0.5)
        self.mixins.final_layer = final
        self.time_embed = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.img_emb = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                     nn.Linear(clip_dim, hidden), nn.LayerNorm(hidden))


def _builder(args):
    if not args.builder:
        div = args.width_div
        return lambda: StandInDiT(layers=args.layers, hidden=5120 // div, ffn=13824 // div,
                                  text_dim=4096 // div, clip_dim=1280 // div)
    module, _, func = args.builder.partition(":")
    fn = getattr(importlib.import_module(module), func)
    kwargs = json.loads(args.builder_kwargs) if args.builder_kwargs else {}
    return lambda: fn(**kwargs)


def _mem() -> dict:
    """Peak and current resident memory of this process in GiB (Linux), else empty."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    get = lambda k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 / GIB  # noqa: E731
    return {"peak_rss_gib": get("VmHWM"), "rss_anon_gib": get("RssAnon"), "rss_file_gib": get("RssFile")}


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, AttributeError):
        return False


def _checksum(model: nn.Module) -> float:
    total = 0.0
    for p in list(model.parameters())[:: max(1, len(list(model.parameters())) // 16)]:
        total += p.detach().float().sum().item()
    return total


# --------------------------------------------------------------------------
# stages


def generate(args) -> dict:
    path = args.dir / SAT_REL
    with torch.device("meta"):
        model = _builder(args)()
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    need = sum(torch.Size(s).numel() * (2 if dt.is_floating_point else dt.itemsize) for s, dt in shapes.values())
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.05:
        raise SystemExit(f"{args.dir}: generating needs {need / GIB:.1f} GiB free, has {free / GIB:.1f}; "
                         "use --layers to scale down")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    module = {}
    g = torch.Generator(device).manual_seed(0)
    for name, (shape, dt) in shapes.items():
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)
        else:
            t = torch.zeros(shape, dtype=dt, device=device)
        module[args.prefix + name] = t.cpu()
    # Only what torch.load accepts by default: upstream's own torch.load call has no allowlist.
    ckpt = {"module": module, "iteration": 1, "global_steps": 1, "dp_world_size": 1, "mp_world_size": 1,
            "ds_version": "0.18.2", "buffer_names": [], "ds_config": {"bf16": {"enabled": True}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    (args.dir / "sat" / "model" / "latest").write_text("1")
    n_params = sum(torch.Size(s).numel() for s, _ in shapes.values())
    return {"params_b": n_params / 1e9, "pt_gib": path.stat().st_size / GIB, "generate_s": time.perf_counter() - t0}


def convert(args) -> dict:
    out = args.dir / ST_REL
    out.parent.mkdir(parents=True, exist_ok=True)
    before = _mem()
    t0 = time.perf_counter()
    entry = convert_checkpoint(args.dir / SAT_REL, out, dtype=args.dtype, progress=True)
    after = _mem()
    return {"convert_s": time.perf_counter() - t0, "safetensors_gib": entry["size"] / GIB, "dtype": args.dtype,
            "convert_peak_rss_gib": after.get("peak_rss_gib"), "rss_before_gib": before.get("peak_rss_gib")}


def child(args) -> None:
    """One timed path; prints one JSON line when the DiT is ready."""
    t = {"start": float(os.environ["BENCH_T0"]), "imported": time.time()}
    device = torch.device(args.device)
    build = _builder(args)
    if args.child == "upstream":
        model = build()  # CPU, fp32, random init: sat's get_model
        t["built"] = time.time()
        model = model.to(torch.bfloat16).to(device)
        t["moved"] = time.time()
        sd = torch.load(args.dir / SAT_REL, map_location="cpu")  # upstream's call, whole pickle into RAM
        t["read"] = time.time()
        module = {k[len(args.prefix):]: v for k, v in sd["module"].items() if k.startswith(args.prefix)}
        missing, _ = model.load_state_dict(module, strict=False)
        del sd, module
        if missing:
            raise SystemExit(f"upstream path: {len(missing)} missing keys (first {missing[0]})")
    else:
        with torch.device("meta"):
            model = build()
        t["built"] = time.time()
        src = args.dir / (ST_REL if args.child == "ours" else SAT_REL)
        dtype = None if args.keep_fp8 else torch.bfloat16
        result = W.load_into(model, src, prefix=args.prefix, placement=device, dtype=dtype, keep_fp8=args.keep_fp8)
        if result.meta_left:
            raise SystemExit(f"{args.child}: {len(result.meta_left)} tensors left on meta (first {result.meta_left[0]})")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t["ready"] = time.time()
    report = {"path": args.child, "ready_s": t["ready"] - t["start"],
              "phases_s": {k: round(t[k] - t["start"], 2) for k in t if k != "start"},
              "checksum": _checksum(model), **_mem()}
    if device.type == "cuda":
        report["gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    print("BENCH " + json.dumps(report), flush=True)


def time_paths(args) -> list[dict]:
    rows = []
    for _ in range(args.repeat):
        for name in args.paths:
            cold = _drop_caches()
            cmd = [sys.executable, __file__, "--child", name, *args.argv]
            env = dict(os.environ, BENCH_T0=repr(time.time()))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                rows.append({"path": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]})
                continue
            rows.append({**json.loads(line[6:]), "page_cache": "cold" if cold else "warm"})
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'path':<9} {'cache':<5} {'ready s':>8} {'peak RSS':>9} {'RssAnon':>8} {'RssFile':>8} {'GPU GiB':>8}  phases (s from start)"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<9} ERROR {' | '.join(r['error'])}")
            continue
        lines.append(f"{r['path']:<9} {r['page_cache']:<5} {r['ready_s']:>8.1f} {r.get('peak_rss_gib', 0):>8.1f}G "
                     f"{r.get('rss_anon_gib', 0):>7.1f}G {r.get('rss_file_gib', 0):>7.1f}G "
                     f"{r.get('gpu_alloc_gib', 0):>8.1f}  {r['phases_s']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder for the checkpoint files")
    p.add_argument("--stage", choices=("generate", "convert", "time", "all"), default="all")
    p.add_argument("--layers", type=int, default=40, help="stand-in DiT layers (scales the files)")
    p.add_argument("--width-div", type=int, default=1, help="divide the stand-in's widths (smoke runs only)")
    p.add_argument("--builder", help="MODULE:FUNCTION building the real DiT (see the module docstring)")
    p.add_argument("--builder-kwargs", help="JSON object of keyword arguments for --builder")
    p.add_argument("--prefix", default="model.diffusion_model.", help="checkpoint key prefix of the DiT")
    p.add_argument("--dtype", choices=("bf16", "fp8_e4m3fn"), default="bf16", help="converted DiT storage")
    p.add_argument("--keep-fp8", action="store_true", help="ours: keep fp8 weights resident instead of bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", type=Path, help="write everything measured as JSON here")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.paths = [s for s in args.paths.split(",") if s]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    results = {"argv": args.argv, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if args.stage in ("generate", "all"):
        results["generate"] = generate(args)
        print("generate:", results["generate"], flush=True)
    if args.stage in ("convert", "all"):
        results["convert"] = convert(args)
        print("convert:", results["convert"], flush=True)
    if args.stage in ("time", "all"):
        results["paths"] = time_paths(args)
        print(_table(results["paths"]))
        sums = {r["path"]: r["checksum"] for r in results["paths"] if "checksum" in r}
        if len(set(sums.values())) > 1:
            print(f"checksums differ between paths: {sums}"
                  + (" (expected with fp8)" if args.dtype != "bf16" else " -- the paths loaded different weights!"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
