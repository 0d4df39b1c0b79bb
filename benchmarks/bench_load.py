#!/usr/bin/env python3
"""Time from process start to a ready DiT, and to its first denoising step: upstream's loading path against scail-win's.

Paths, each timed in a fresh Python process on the same checkpoint files:

  upstream  what sat does: build the DiT on the CPU with its random init,
            cast to bf16, move it to the GPU, torch.load the whole .pt pickle
            into RAM, load_state_dict(strict=False).
  ours      build on the meta device (no init, no memory), then
            scail_win.weights.checkpoint.load_into from the converted dit.safetensors,
            memory-mapped, each tensor put where scail_win.model.loader
            puts it (the GPU when the memory plan keeps the DiT there, else
            file-backed on the CPU), then lean layers as the plan says.
  ours-pt   the same from the original .pt (memory-mapped, weights_only).
  ours-noprefetch  ours with SCAIL_WIN_PREFETCH=0: no background read of
            the file into the OS cache while the process starts
            (scail_win.weights.prefetch, which ours and ours-pt start where
            ``scail_win.sample`` does: before the imports and set-up).

Stages (--stage, default all): `generate` writes a random bf16 checkpoint in
SCAIL's layout, DIR/sat/model/1/mp_rank_00_model_states.pt (about 33 GB at
the full 40 layers; --layers scales it); `convert` streams it into
DIR/converted/dit.safetensors with scail_win.weights.convert and records time and
peak RSS; `time` runs the paths.  Each stage is a separate command when a
run must stay under a time limit; files persist in DIR between them.

Before each timed process the page cache is dropped when the process may
(root on Linux); the table says whether it was ("cold") or not ("warm").
Each process gets an empty Triton cache: its kernels compile, as on a
first run.

The DiT: without --scail-root, a stand-in with the parameter shapes and sat
names of SCAIL's DiT (16.3 B parameters at 40 layers; no forward, so ready
time only).  With --scail-root, SCAIL's own DiT from that tree's model
config: upstream's class with its own random init (SCAIL_WIN_DISABLE=1, so
upstream's modules throughout; it needs CUDA, so a CPU run skips it) against
scail-win's build_dit; --tiny shrinks it to scail_win.testing.smoke's 2-layer DiT
for CPU smoke runs.  --first-step
HxWxF (SCAIL only) then runs one CFG denoising step (sgm's denoiser and
VanillaCFG, batch 2, as RFSampler calls the network) on the same seeded
latents in every path, reports the time from process start to its end,
and compares the paths' outputs.

Disk: the .pt plus the bf16 safetensors need ~66 GB at 40 layers (fp8:
~50 GB); --dtype auto converts to fp8 when bf16 does not fit.  RAM:
generation holds the whole checkpoint, upstream's path peaks near 2x the
bf16 size with the stand-in (fp32 init), 1x with SCAIL's DiT (bf16 init).

Examples:
  python benchmarks/bench_load.py --dir /tmp/bench --layers 20
  python benchmarks/bench_load.py --dir /tmp/bench --scail-root .scail --first-step 512x896x81 --paths ours,upstream
  python benchmarks/bench_load.py --dir /tmp/bench --stage time --paths ours,upstream --out results.json
  CPU smoke runs: python benchmarks/bench_load.py --dir /tmp/b --layers 1 --width-div 16 --device cpu
                  python benchmarks/bench_load.py --dir /tmp/b --scail-root .scail --tiny --device cpu --first-step 64x64x5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scail_win.weights import checkpoint as W  # noqa: E402
from scail_win.weights.convert import convert_checkpoint  # noqa: E402
from scail_win.placement.registry import HookRegistry  # noqa: E402

GIB = 2**30
SAT_REL = Path("sat") / "model" / "1" / "mp_rank_00_model_states.pt"
ST_REL = Path("converted") / "dit.safetensors"
PATHS = ("upstream", "ours", "ours-pt", "ours-noprefetch")


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


class StandIn:
    """The stand-in DiT: one class for every path, no forward."""

    first_step = False

    def __init__(self, args):
        div = args.width_div
        self.make = lambda: StandInDiT(layers=args.layers, hidden=5120 // div, ffn=13824 // div,
                                       text_dim=4096 // div, clip_dim=1280 // div)

    def setup(self, device, upstream: bool) -> None:
        pass

    def meta(self) -> nn.Module:
        with torch.device("meta"):
            return self.make()

    def upstream(self) -> nn.Module:
        return self.make()  # CPU, fp32, random init

    def ours(self) -> nn.Module:
        return self.meta()


class ScailDiT:
    """SCAIL's DiT from --scail-root: upstream's class for upstream, build_dit for ours."""

    first_step = True

    def __init__(self, args):
        import bench_dit as bd
        from omegaconf import OmegaConf

        sys.path.insert(0, str(args.scail_root))
        self.cfg = bd.model_config(args.scail_root, None if args.tiny else args.layers)
        if args.tiny:
            from scail_win.testing import smoke

            # sat's LayerNorm has no bf16 CPU path without affine weights.
            extra = {"elementwise_affine": True} if args.device == "cpu" else {}
            net = self.cfg.network_config
            net.params = OmegaConf.merge(net.params, smoke.TINY_DIT, extra)

    def setup(self, device, upstream: bool) -> None:
        """sat's parallel groups: upstream's NCCL group on CUDA, scail-win's one-process group otherwise."""
        if upstream and device.type == "cuda":
            import bench_dit as bd

            bd.init_upstream_distributed()
            return
        import scail_win.hook
        from scail_win.arguments import initialize_distributed

        scail_win.hook.install()

        initialize_distributed(argparse.Namespace(model_parallel_size=1, world_size=1, rank=0,
                                                  device=str(device), distributed_backend="nccl"))

    def meta(self) -> nn.Module:
        return self.ours()

    def upstream(self) -> nn.Module:
        from omegaconf import OmegaConf
        from sgm.util import instantiate_from_config

        net = OmegaConf.create(OmegaConf.to_container(self.cfg.network_config))
        net.params.dtype = "bf16"
        net.params.use_i2v_clip = True
        return instantiate_from_config(net)

    def ours(self) -> nn.Module:
        from scail_win.diffusion_video import build_dit

        return build_dit(self.cfg.network_config, dtype_str="bf16", use_i2v_clip=True, rope_mode="fp32",
                         empty_weights=True)


def _model(args):
    return ScailDiT(args) if args.scail_root else StandIn(args)


def _mem() -> dict:
    """Peak and current resident memory of this process in GiB (Linux), else empty."""
    import bench_dit as bd

    try:
        status = bd.host_memory()
    except OSError:
        return {}
    return {"peak_rss_gib": status["VmHWM"], "rss_anon_gib": status["RssAnon"], "rss_file_gib": status["RssFile"]}


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


def _random_tensor(name: str, shape, dtype, g, device) -> torch.Tensor:
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        t.add_(1.0)  # norm scales near 1, as trained ones are: keeps activations alive through 40 layers
    return t


def generate(args) -> dict:
    path = args.dir / SAT_REL
    model = _model(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.setup(device, upstream=False)
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in model.meta().state_dict().items()}
    need = sum(torch.Size(s).numel() * (2 if dt.is_floating_point else dt.itemsize) for s, dt in shapes.values())
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.05:
        raise SystemExit(f"{args.dir}: generating needs {need / GIB:.1f} GiB free, has {free / GIB:.1f}; "
                         "use --layers to scale down")
    t0 = time.perf_counter()
    module = {}
    g = torch.Generator(device).manual_seed(0)
    for name, (shape, dt) in shapes.items():
        module[args.prefix + name] = _random_tensor(name, shape, dt, g, device).cpu()
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
    src = args.dir / SAT_REL
    out = args.dir / ST_REL
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype
    if dtype == "auto":
        # bf16 is the .pt's size again; fp8 about half of it.
        free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.exists() else 0)
        dtype = "bf16" if free > src.stat().st_size * 1.02 + 2 * GIB else "fp8_e4m3fn"
    before = _mem()
    t0 = time.perf_counter()
    entry = convert_checkpoint(src, out, dtype=dtype, progress=True)
    after = _mem()
    return {"convert_s": time.perf_counter() - t0, "safetensors_gib": entry["size"] / GIB, "dtype": dtype,
            "convert_peak_rss_gib": after.get("peak_rss_gib"), "rss_before_gib": before.get("peak_rss_gib")}


def _step_size(text: str) -> tuple[int, int, int]:
    try:
        h, w, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTHxFRAMES, e.g. 512x896x81") from None
    if h % 16 or w % 16 or (f - 1) % 4:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be multiples of 16, frames 4k+1")
    return h, w, f


def _plan_ours(model, dit: nn.Module, args, device: torch.device):
    """The memory plan scail_win.model.loader.build makes for this size (None off CUDA)."""
    from scail_win.model.loader import make_plan

    if device.type != "cuda":
        return None
    h, w, f = args.first_step or (512, 896, 81)
    return make_plan(argparse.Namespace(model_config=model.cfg, vae_compress_size=[4, 8, 8],
                                        representation="smpl_downsample", sampling_image_size=(h, w),
                                        max_frames=f), dit, device)


def _place_ours(dit: nn.Module, plan, device: torch.device):
    """Lean layers, and the GPU for what is not there yet, as scail_win.model.loader.build does."""
    from scail_win.model.loader import _SplitCFG, place_dit

    if device.type != "cuda":
        return dit, None
    placement = place_dit(dit, plan, device)
    if placement.swap is None:
        dit.to(device)
    return dit, (_SplitCFG if plan is not None and plan.cfg_split else None)


def _first_step(args, model, dit: nn.Module, device: torch.device, split_cfg) -> torch.Tensor:
    import bench_dit as bd

    step = bd.Step(model.cfg, dit)
    if split_cfg is not None:
        HookRegistry.of(step.network).add(split_cfg())
    h, w, f = args.first_step
    x, sigma, cond, uncond, _ = bd.latent_inputs((h, w), f, device)
    with torch.no_grad():
        out = step.cfg(x, sigma, cond, uncond)
    return out.float().cpu()


def child(args) -> None:
    """One timed path; prints one JSON line when done."""
    t = {"start": float(os.environ["BENCH_T0"]), "imported": time.time()}
    device = torch.device(args.device)
    src = args.dir / (SAT_REL if args.child in ("upstream", "ours-pt") else ST_REL)
    prefetch = None
    if args.child != "upstream":
        from scail_win.weights.prefetch import prefetch_files

        prefetch = prefetch_files([src])
    model = _model(args)
    model.setup(device, upstream=args.child == "upstream")
    split_cfg = None
    if args.child == "upstream":
        dit = model.upstream()  # CPU, random init: sat's get_model
        t["built"] = time.time()
        dit = dit.to(torch.bfloat16).to(device)
        t["moved"] = time.time()
        sd = torch.load(src, map_location="cpu")  # upstream's call, whole pickle into RAM
        t["read"] = time.time()
        module = {k[len(args.prefix):]: v for k, v in sd["module"].items() if k.startswith(args.prefix)}
        missing, _ = dit.load_state_dict(module, strict=False)
        del sd, module
        if missing:
            raise SystemExit(f"upstream path: {len(missing)} missing keys (first {missing[0]})")
    else:
        dit = model.ours()
        t["built"] = time.time()
        plan = None
        place = device
        if model.first_step:
            from scail_win.model.loader import dit_load_device

            # Where scail_win.model.loader.build puts the tensors: the GPU when the DiT stays there.
            plan = _plan_ours(model, dit, args, device)
            place = dit_load_device(plan, device)
        dtype = None if args.keep_fp8 else torch.bfloat16
        result = W.load_into(dit, src, prefix=args.prefix, placement=place, dtype=dtype, keep_fp8=args.keep_fp8)
        if result.meta_left:
            raise SystemExit(f"{args.child}: {len(result.meta_left)} tensors left on meta (first {result.meta_left[0]})")
        t["read"] = time.time()
        if model.first_step:
            dit, split_cfg = _place_ours(dit, plan, device)
    dit.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t["ready"] = time.time()
    report = {"path": args.child, "ready_s": t["ready"] - t["start"], "checksum": _checksum(dit),
              "prefetched_gib": prefetch.bytes_read / GIB if prefetch else 0.0}
    if args.first_step and model.first_step:
        out = _first_step(args, model, dit, device, split_cfg)
        t["stepped"] = time.time()
        report["first_step_s"] = t["stepped"] - t["start"]
        torch.save(out, args.dir / f"step-{args.child}.pt")
    report.update(phases_s={k: round(t[k] - t["start"], 2) for k in t if k != "start"}, **_mem())
    if device.type == "cuda":
        report["gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
    print("BENCH " + json.dumps(report), flush=True)


def time_paths(args) -> list[dict]:
    rows = []
    for _ in range(args.repeat):
        for name in args.paths:
            cold = _drop_caches()
            cmd = [sys.executable, __file__, "--child", name, *args.argv]
            env = dict(os.environ)
            if name == "upstream":
                env["SCAIL_WIN_DISABLE"] = "1"  # upstream's own modules, Triton rotary included
            if name == "ours-noprefetch":
                env["SCAIL_WIN_PREFETCH"] = "0"
            # Every path compiles its Triton kernels afresh, as a first run does.
            cache = args.dir / f"triton-cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            env["TRITON_CACHE_DIR"] = str(cache)
            env["BENCH_T0"] = repr(time.time())
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"path": name, "error": [f"no result within --timeout {args.timeout} s"]})
                continue
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                rows.append({"path": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]})
                continue
            rows.append({**json.loads(line[6:]), "page_cache": "cold" if cold else "warm"})
            print(_table(rows[-1:]), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'path':<15} {'cache':<5} {'ready s':>8} {'step s':>7} {'peak RSS':>9} {'RssAnon':>8} {'RssFile':>8} {'GPU GiB':>8} {'prefetch':>8}  phases (s from start)"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<15} ERROR {' | '.join(r['error'])}")
            continue
        step = f"{r['first_step_s']:>7.1f}" if "first_step_s" in r else f"{'-':>7}"
        lines.append(f"{r['path']:<15} {r['page_cache']:<5} {r['ready_s']:>8.1f} {step} {r.get('peak_rss_gib', 0):>8.1f}G "
                     f"{r.get('rss_anon_gib', 0):>7.1f}G {r.get('rss_file_gib', 0):>7.1f}G "
                     f"{r.get('gpu_alloc_gib', 0):>8.1f} {r.get('prefetched_gib', 0):>7.1f}G  {r['phases_s']}")
    return "\n".join(lines)


def _converted_is_fp8(path: Path) -> bool:
    if not path.is_file():
        return False
    return any(e.dtype.startswith("F8") for e in W.read_safetensors_header(path).entries.values())


def _compare_steps(args) -> dict:
    """Relative error of each path's first-step output against upstream's."""
    ref_file = args.dir / "step-upstream.pt"
    if not ref_file.is_file():
        return {}
    ref = torch.load(ref_file)
    errors = {}
    for name in args.paths:
        f = args.dir / f"step-{name}.pt"
        if name != "upstream" and f.is_file():
            errors[name] = W.relative_error(torch.load(f), ref)
    if errors:
        print("first-step output, rel err vs upstream: "
              + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()), flush=True)
    return errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder for the checkpoint files")
    p.add_argument("--stage", choices=("generate", "convert", "time", "all"), default="all")
    p.add_argument("--layers", type=int, default=40, help="DiT layers (scales the files)")
    p.add_argument("--width-div", type=int, default=1, help="divide the stand-in's widths (smoke runs only)")
    p.add_argument("--scail-root", type=Path, help="SCAIL tree: time SCAIL's own DiT instead of the stand-in")
    p.add_argument("--tiny", action="store_true", help="with --scail-root: scail_win.testing.smoke's 2-layer DiT")
    p.add_argument("--first-step", type=_step_size, metavar="HxWxF",
                   help="with --scail-root: also time one CFG denoising step at this size, e.g. 512x896x81")
    p.add_argument("--prefix", default="model.diffusion_model.", help="checkpoint key prefix of the DiT")
    p.add_argument("--dtype", choices=("bf16", "fp8_e4m3fn", "auto"), default="bf16",
                   help="converted DiT storage; auto: bf16 when the disk holds it, else fp8")
    p.add_argument("--keep-fp8", action="store_true", help="ours: keep fp8 weights resident instead of bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200, help="seconds each timed process may take")
    p.add_argument("--out", type=Path, help="write everything measured as JSON here")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.paths = [s for s in args.paths.split(",") if s]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {', '.join(sorted(unknown))}")
    if (args.tiny or args.first_step) and not args.scail_root:
        p.error("--tiny and --first-step need --scail-root (the stand-in has no forward)")
    if args.scail_root and args.device == "cpu" and "upstream" in args.paths:
        # sat's UlyssesAttention asks CUDA for the device name while the DiT is built.
        print("upstream's SCAIL DiT cannot be built without CUDA: path 'upstream' skipped", file=sys.stderr)
        args.paths.remove("upstream")
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
        fp8 = _converted_is_fp8(args.dir / ST_REL)
        sums = {r["path"]: r["checksum"] for r in results["paths"] if "checksum" in r}
        if len(set(sums.values())) > 1:
            print(f"checksums differ between paths: {sums}"
                  + (" (expected with fp8)" if fp8 else " -- the paths loaded different weights!"))
        results["step_rel_err_vs_upstream"] = _compare_steps(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
