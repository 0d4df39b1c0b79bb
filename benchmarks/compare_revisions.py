#!/usr/bin/env python3
"""Same outputs across a change: this checkout against an earlier revision, bit for bit, on the CPU.

For a refactor that must not change behaviour. The earlier revision
(--base, any git revision) is checked out into a temporary worktree; each
side then runs in its own Python process with its own ``scail_win`` first on
the import path:

  plans     the memory planner over a grid of resolutions, lengths, VRAM
            budgets, host RAM sizes and host weight widths (960 plans): every
            decision (placements, block counts, chunking, tiles) and every
            refusal's message must match; the peak estimates' changes are
            reported (a corrected parameter count moves them without
            changing a decision).
  pipeline  one ``--smoke`` job (the tiny random SCAIL of
            scail_win.testing.smoke: upstream's DiT classes at 2 layers, the
            real Wan VAE architecture) per setting (solvers, step cache,
            guidance 1, shift, RoPE modes, a larger size, and a memory plan's
            placement applied through the loader: block swap of every layer,
            lean layers, split CFG, VAE tiles), on one shared smoke folder:
            the conditioning, the final latents and the decoded frames must
            be bit-identical. Needs SCAIL's code (--scail-root).

The frames are compared before encoding, so the encoder (its options, or
libx264 on another CPU) cannot hide or fake a difference. Not covered: what only happens on a GPU (the plan the loader makes from the
card's memory, weights moving between host and card, pinned copies, the
side-stream prefetch, T5's block swap, the peaks), which bench_dit.py and
parity.py measure.

Usage (repository root):
    python benchmarks/compare_revisions.py --base 58709a6 --scail-root .scail
    python benchmarks/compare_revisions.py --base HEAD~3 --head HEAD --stages plans
Prints a table per stage, writes compare.json to --out; exits 1 when a
decision or an output differs, 2 when a side fails to run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("plans", "pipeline")
PLACED = "<placed>"  # in a setting's flags: apply PLACEMENT after the build (not a sample flag)
PLACEMENT = dict(blocks_on_gpu=0, prefetch=1, offload_mode="stream", cfg_split=True, layer_chunk_tokens=64,
                 t5_placement="gpu", clip_placement="gpu", vae_encode_tile_px=(128, 128),
                 vae_decode_tile_px=(128, 128))
# name -> (smoke folder size HxWxF, extra sample flags)
SETTINGS = {
    "euler": ("64x96x5", []),
    "unipc": ("64x96x5", ["--sampler", "unipc"]),
    "dpmpp_2m": ("64x96x5", ["--sampler", "dpmpp_2m"]),
    "step cache": ("64x96x5", ["--step-cache", "0.2", "--steps", "8"]),
    "guidance 1": ("64x96x5", ["--cfg-scale", "1"]),
    "shift 3": ("64x96x5", ["--shift", "3", "--steps", "6"]),
    "exact rope": ("64x96x5", ["--rope-mode", "exact"]),
    "128x224x17": ("128x224x17", ["--steps", "6"]),
    # A memory plan's placement applied on the CPU as the loader applies it on a GPU: every layer
    # block-swapped, lean layers in 64-token chunks, CFG halves in turn, VAE tiles of 128 px.
    "128x224x17 placed": ("128x224x17", ["--steps", "3", PLACED]),
    "128x224x17 exact unipc": ("128x224x17", ["--steps", "3", "--rope-mode", "exact", "--sampler", "unipc"]),
}
PLAN_SIZES = ((512, 896), (480, 832), (720, 1280), (896, 512), (256, 448))
PLAN_FRAMES = (17, 33, 65, 81)
PLAN_BUDGETS_GB = (6, 8, 10, 12, 16, 24, 40, None)  # None: the default budget of an 80 GiB card
PLAN_HOST_GIB = (16, 32, 64)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="the earlier git revision to compare against")
    p.add_argument("--head", help="the revision to compare (default: this checkout's files, uncommitted changes too)")
    p.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"),
                   help="SCAIL checkout for the pipeline stage")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated pipeline settings")
    p.add_argument("--out", default=os.environ.get("OUT", "compare_out"), help="folder for compare.json")
    p.add_argument("--side", choices=("plans", "probe"), help=argparse.SUPPRESS)  # one side's run (internal)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--smoke-dir", help=argparse.SUPPRESS)
    p.add_argument("--flags", default="[]", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.stages = [s for s in opts.stages.split(",") if s]
    opts.settings = [s for s in opts.settings.split(",") if s]
    for stage in opts.stages:
        if stage not in STAGES:
            p.error(f"--stages: unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    for name in opts.settings:
        if name not in SETTINGS:
            p.error(f"--settings: unknown setting {name!r} (choose from {', '.join(SETTINGS)})")
    if opts.scail_root and not opts.side and not Path(opts.scail_root).is_dir():
        p.error(f"--scail-root {opts.scail_root}: no such folder (give a SCAIL checkout)")
    if "pipeline" in opts.stages and not opts.side and not opts.scail_root:
        p.error("the pipeline stage needs SCAIL's code: give --scail-root or set SCAIL_ROOT "
                "(or run --stages plans)")
    return opts


# ------------------------------------------------------------------ one side, in its own process


def _new_layout(scail_win) -> bool:
    # An editable install's finder serves modules an older tree lacks from this
    # checkout, so the layout is read off the tree itself, not from import errors.
    return (Path(scail_win.__file__).parent / "cli").is_dir()


def _old_module(name: str):
    """A module of the pre-layout tree (before cli/, io/, placement/...), which this checkout no longer has."""
    import importlib

    return importlib.import_module(f"scail_win.{name}")


def side_plans(out: Path) -> None:
    import dataclasses

    import scail_win

    gib = 1 << 30
    if _new_layout(scail_win):
        from omegaconf import OmegaConf

        from scail_win.model.spec import ModelSpec
        from scail_win.placement import memory_plan as mp

        config = Path(scail_win.__file__).parents[1] / "configs" / "wan_pose_14Bsc_xc_cli.yaml"
        model = ModelSpec.from_config(OmegaConf.load(config))

        def specs(h, w, f, **kw):
            return mp.scail_specs(model, h, w, f, **kw)
    else:  # before ModelSpec: the 14B's dimensions were built into scail_specs
        mp = _old_module("memory")
        specs = mp.scail_specs

    plans = {}
    for h, w in PLAN_SIZES:
        for frames in PLAN_FRAMES:
            for host_bytes in (1, 2):
                dit, t5, clip, vae = specs(h, w, frames, dit_host_bytes_per_param=host_bytes)
                for budget in PLAN_BUDGETS_GB:
                    for host in PLAN_HOST_GIB:
                        key = f"{h}x{w}x{frames} host weights {host_bytes} B/param, budget {budget}, RAM {host}"
                        where = dict(budget_gb=budget) if budget else dict(total_vram_bytes=80 * gib)
                        try:
                            plan = mp.plan_memory(dit, t5=t5, clip=clip, vae=vae, host_ram_bytes=host * gib,
                                                  **where)
                        except Exception as exc:  # a refusal is behaviour too
                            plans[key] = f"{type(exc).__name__}: {exc}"
                            continue
                        fields = dataclasses.asdict(plan)
                        fields["peaks"] = {str(getattr(k, "value", k)): v for k, v in plan.peaks.items()}
                        fields["resident_phases"] = [str(getattr(k, "value", k)) for k in plan.resident_phases]
                        fields.pop("vae_spatial_stride", None)  # added with ModelSpec; the VAE's 8 before
                        plans[key] = fields
    out.write_text(json.dumps({"module": scail_win.__file__, "plans": plans}, sort_keys=True, default=str),
                   encoding="utf-8")


def side_probe(out: Path, smoke_dir: Path, flags: list, scail_root: str) -> None:
    import torch

    sys.path.insert(1, scail_root)
    import scail_win

    if _new_layout(scail_win):
        from scail_win import pipeline
        from scail_win.cli import sample as cli
        from scail_win.io.jobs import Job, validate_job
    else:
        cli, pipeline = _old_module("sample"), _old_module("sample_video")
        Job, validate_job = _old_module("jobs").Job, _old_module("jobs").validate_job
    from scail_win import arguments, sample_video

    placed = PLACED in flags
    flags = [f for f in flags if f != PLACED]
    opts = cli.build_parser().parse_args(["--smoke", "--embed-cache", "off", "--seed", "42", "--quiet",
                                          "--output-dir", str(out.parent / "samples"), *flags])
    list(cli.prepare(opts))
    example = smoke_dir / "scail-win-smoke"
    job = validate_job(Job(prompt="the figure is dancing", input_dir=example, source="--smoke"),
                       resolution=opts.resolution, max_frames=opts.max_frames, output_dir=opts.output_dir)
    opts.base, opts.weights = [smoke_dir / "smoke.yaml"], smoke_dir / "weights"
    args = arguments.args_from_cli(opts)
    model = sample_video.build_model(args)
    if placed:
        place(model, new_layout=_new_layout(scail_win))
    cond = pipeline.encode_job(model, job, args, None)
    tensors = {f"{part}.{key}": value.float().cpu() for part in ("c", "uc")
               for key, value in getattr(cond, part).items() if torch.is_tensor(value)}
    tensors["latents"] = pipeline.denoise(model, cond, args, None, "compare", 0, False).float().cpu()
    tensors["frames"] = pipeline.decode(model, tensors["latents"]).float().cpu()
    torch.save({"module": scail_win.__file__, "tensors": tensors}, out)


def place(engine, new_layout: bool) -> None:
    """Apply PLACEMENT to a CPU-built engine through the loader's own apply_memory_plan."""
    import torch

    if new_layout:
        from scail_win.model import loader
        from scail_win.placement.memory_plan import MemoryPlan
    else:
        loader, MemoryPlan = _old_module("model_loader"), _old_module("memory").MemoryPlan
    layers = len(engine.model.diffusion_model.transformer.layers)
    plan = MemoryPlan(budget_bytes=8 << 30, total_vram_bytes=None, num_layers=layers, label="CPU comparison",
                      **PLACEMENT)
    loader.apply_memory_plan(engine, plan, torch.device("cpu"))
    hooks = engine.installed_hooks() if hasattr(engine, "installed_hooks") else "(not listed before the registry)"
    print("placed:", plan.describe().replace("\n", ";"), "| hooks:", hooks, flush=True)


# ------------------------------------------------------------------ both sides


@contextlib.contextmanager
def worktree(revision: str, path: Path):
    """``revision`` checked out at ``path`` (detached) for the block's duration."""
    result = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), revision],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: {revision}: git worktree add failed: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def run_side(tree: Path, side_args: list, log: Path, scail_root=None) -> bool:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), scail_root) if p))
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--base", "-", *side_args],
                               stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(tree))
    if code:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        print(f"{tree.name}: {' '.join(side_args[:2])} failed (exit {code}); {log}:\n  " + "\n  ".join(tail))
    return code == 0


def compare_plans(trees, work: Path, res: dict) -> bool:
    from bench_dit import table

    files = {}
    for name, tree in trees.items():
        files[name] = work / f"plans-{name}.json"
        if not run_side(tree, ["--side", "plans", "--side-out", str(files[name])], work / f"plans-{name}.log"):
            return False
    base, head = (json.loads(files[n].read_text(encoding="utf-8"))["plans"] for n in ("base", "head"))
    res["plans"] = diff = diff_plans(base, head)
    table("Memory plans, base vs head (decisions: every field but the peak estimates)",
          ("plans", "of them refused", "identical", "same decisions", "largest peak estimate change"),
          [(diff["count"], diff["refused"], diff["identical"], diff["count"] - len(diff["decisions_differ"]),
            f"{100 * diff['largest_peak_change']:.3f} %")])
    for key in diff["decisions_differ"][:5]:
        print(f"  {key}:\n    base {base.get(key)}\n    head {head.get(key)}")
    return not diff["decisions_differ"]


def diff_plans(base: dict, head: dict) -> dict:
    """Plans (key -> plan fields, or a refusal's message) compared: decisions, and the peak estimates apart."""
    keys = sorted(base.keys() | head.keys())
    decisions, estimates, largest = [], 0, 0.0
    for key in keys:
        a, b = base.get(key), head.get(key)
        if a == b:
            continue
        if not (isinstance(a, dict) and isinstance(b, dict)) or a["peaks"].keys() != b["peaks"].keys() or (
                {k: v for k, v in a.items() if k != "peaks"} != {k: v for k, v in b.items() if k != "peaks"}):
            decisions.append(key)  # a placement, a tile size, a refusal or its message
            continue
        estimates += 1
        largest = max(largest, *(abs(b["peaks"][p] - a["peaks"][p]) / a["peaks"][p] for p in a["peaks"]))
    return {"count": len(keys), "refused": sum(isinstance(v, str) for v in base.values()),
            "identical": len(keys) - len(decisions) - estimates, "decisions_differ": decisions,
            "estimates_differ": estimates, "largest_peak_change": largest}


def compare_pipeline(trees, opts, work: Path, res: dict) -> tuple[bool, bool]:
    """(same, a side failed) over ``opts.settings``."""
    import torch

    from bench_dit import table

    smoke = {}
    for name in opts.settings:
        size = SETTINGS[name][0]
        if size not in smoke:
            h, w, f = (int(x) for x in size.split("x"))
            smoke[size] = work / f"smoke-{size}"
            make = ("import sys; from pathlib import Path; sys.path.insert(1, sys.argv[2]);"
                    "from scail_win.testing import smoke;"
                    "smoke.make_smoke_setup(Path(sys.argv[1]), height=%d, width=%d, frames=%d)" % (h, w, f))
            made = subprocess.run([sys.executable, "-c", make, str(smoke[size]), opts.scail_root],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            if made.returncode:
                print(f"the {size} smoke setup failed (exit {made.returncode}):\n  "
                      + "\n  ".join(made.stderr.strip().splitlines()[-3:]))
                return False, True
    rows, same, failed = [], True, False
    for name in opts.settings:
        size, flags = SETTINGS[name]
        if size != "64x96x5":
            h, w, f = size.split("x")
            flags = ["--resolution", f"{h}x{w}", "--max-frames", f, *flags]
        dumps = {}
        for side, tree in trees.items():
            dumps[side] = work / f"probe-{side}-{name.replace(' ', '_')}.pt"
            ok = run_side(tree, ["--side", "probe", "--side-out", str(dumps[side]), "--smoke-dir", str(smoke[size]),
                                 "--flags", json.dumps(flags), "--scail-root", opts.scail_root],
                          dumps[side].with_suffix(".log"), opts.scail_root)
            failed |= not ok
        if failed:
            break
        base, head = (torch.load(dumps[s], weights_only=False)["tensors"] for s in ("base", "head"))
        keys = sorted(base.keys() | head.keys())
        differ = {k: (float((base[k] - head[k]).abs().max()) if k in base and k in head
                      and base[k].shape == head[k].shape else "missing or reshaped")
                  for k in keys if not (k in base and k in head and torch.equal(base[k], head[k]))}
        res.setdefault("pipeline", {})[name] = {"tensors": len(keys), "differ": differ}
        same &= not differ
        shown = " ".join("(memory plan applied)" if f == PLACED else f for f in flags)
        rows.append((name, shown or "(defaults)", len(keys), len(keys) - len(differ),
                     ", ".join(f"{k} {v}" for k, v in differ.items()) or "-"))
    if rows:
        table("Smoke pipeline, base vs head (conditioning, latents, decoded frames; bit for bit)",
              ("setting", "flags", "tensors", "identical", "differ (max abs)"), rows)
    return same and not failed, failed


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.side == "plans":
        side_plans(Path(opts.side_out))
        return 0
    if opts.side == "probe":
        side_probe(Path(opts.side_out), Path(opts.smoke_dir), json.loads(opts.flags), opts.scail_root)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if opts.scail_root:
        opts.scail_root = str(Path(opts.scail_root).resolve())
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"base": opts.base, "head": opts.head or "this checkout"}
    same, failed = True, False
    with tempfile.TemporaryDirectory(prefix="scail-win-compare-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            trees = {"base": stack.enter_context(worktree(opts.base, work / "base")),
                     "head": stack.enter_context(worktree(opts.head, work / "head")) if opts.head else REPO}
            if "plans" in opts.stages:
                ok = compare_plans(trees, work, res)
                same &= ok
                failed |= "plans" not in res
            if "pipeline" in opts.stages:
                ok, broke = compare_pipeline(trees, opts, work, res)
                same &= ok
                failed |= broke
    (out / "compare.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(f"wrote {out / 'compare.json'}: " + ("a side failed to run" if failed else
                                                 "same decisions and outputs" if same else "DIFFERENT"))
    return 2 if failed else 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
