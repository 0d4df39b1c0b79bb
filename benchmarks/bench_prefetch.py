#!/usr/bin/env python3
"""Start-up with and without scail_win.weights.prefetch, libraries warm and weights cold.

The usual second-and-later start: Python's libraries are in the OS cache,
the DiT file (larger than what stays cached between runs) is not.  Each run
is a fresh process: the parent evicts only the weight file from the cache
(posix_fadvise DONTNEED, so Linux only), then the child does what a run does
before the first step, timed from its start:

  imported   torch imported (and, with prefetch, the background read begun,
             as ``scail_win.sample`` begins it: before the heavy imports)
  built      sat/sgm imported, the process group set up, SCAIL's DiT built
             on the meta device
  mapped     scail_win.weights.checkpoint.load_into: file-backed CPU tensors
  ready      every tensor read once (a copy, as the move to the GPU reads it)

Runs alternate prefetch on/off, --repeat times each.  The checkpoint comes
from bench_load's generate and convert stages (SCAIL's DiT from
--scail-root, --layers of it, random bf16): --layers 10 makes an 8 GiB file.
The machine needs twice the file in free RAM for the prefetch to take it.

Example:
  python benchmarks/bench_prefetch.py --dir /tmp/pf --scail-root .scail --layers 10 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_load as bl  # noqa: E402  (files and the DiT builder)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(args) -> None:
    t0 = float(os.environ["BENCH_T0"])
    import torch

    src = args.dir / bl.ST_REL
    prefetch = None
    if args.child == "on":
        from scail_win.weights.prefetch import prefetch_files

        prefetch = prefetch_files([src])
    t = {"imported": time.time() - t0}
    model = bl.ScailDiT(bl.parse_args(["--dir", str(args.dir), "--scail-root", str(args.scail_root),
                                       "--layers", str(args.layers), "--device", "cpu"]))
    model.setup(torch.device("cpu"), upstream=False)
    dit = model.ours()
    t["built"] = time.time() - t0
    from scail_win.weights import checkpoint as weights

    weights.load_into(dit, src, prefix="model.diffusion_model.", placement="cpu", dtype=torch.bfloat16)
    t["mapped"] = time.time() - t0
    for p in dit.parameters():
        p.detach().clone()
    t["ready"] = time.time() - t0
    t["prefetched_gib"] = prefetch.bytes_read / bl.GIB if prefetch else 0.0
    print("BENCH " + json.dumps(t), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder for the checkpoint files")
    p.add_argument("--scail-root", type=Path, required=True, help="the SCAIL tree")
    p.add_argument("--layers", type=int, default=10, help="DiT layers (about 0.8 GiB each in bf16)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the runs as JSON here")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not hasattr(os, "posix_fadvise"):
        p.error("evicting one file from the cache needs posix_fadvise (Linux)")
    if args.child:
        child(args)
        return 0
    src = args.dir / bl.ST_REL
    if not src.is_file():
        common = ["--dir", str(args.dir), "--scail-root", str(args.scail_root), "--layers", str(args.layers),
                  "--device", "cpu"]
        print("generate:", bl.generate(bl.parse_args(common + ["--stage", "generate"])), flush=True)
        print("convert:", bl.convert(bl.parse_args(common + ["--stage", "convert"])), flush=True)
        (args.dir / bl.SAT_REL).unlink()  # only the converted file is timed
    runs = []
    for _ in range(args.repeat):
        for mode in ("on", "off"):
            os.sync()
            _evict(src)
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(args.dir), "--scail-root",
                   str(args.scail_root), "--layers", str(args.layers)]
            env = dict(os.environ, BENCH_T0=repr(time.time()))
            env.pop("SCAIL_WIN_PREFETCH", None)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"prefetch {mode}: " + (proc.stderr or proc.stdout).strip()[-800:])
            runs.append({"prefetch": mode, **json.loads(line[6:])})
            print(runs[-1], flush=True)
    size = src.stat().st_size / bl.GIB
    print(f"\n{size:.1f} GiB DiT file, {args.layers} layers, weights evicted before each run, libraries warm")
    print(f"{'prefetch':<9} {'runs':>4} {'built s':>8} {'mapped s':>9} {'ready s (median)':>17} {'min':>6} {'max':>6}")
    for mode in ("on", "off"):
        rows = [r for r in runs if r["prefetch"] == mode]
        ready = [r["ready"] for r in rows]
        print(f"{mode:<9} {len(rows):>4} {statistics.median(r['built'] for r in rows):>8.1f} "
              f"{statistics.median(r['mapped'] for r in rows):>9.1f} {statistics.median(ready):>17.1f} "
              f"{min(ready):>6.1f} {max(ready):>6.1f}")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
