"""Block swap on the GPU: step time and peak memory, resident vs swapped.

A stack of FFN layers of about the size of one SCAIL layer group (default
8192 -> 24576 -> 8192 in bf16, 0.81 GB per layer) runs a forward over
``--tokens`` tokens; each configuration reports the step time, its cost
against the resident model, peak allocated memory, the weights streamed per
second and whether the output is bit-identical to the resident one.

    python benchmarks/bench_offload.py [--layers 16] [--tokens 16384] [--json out.json]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win.placement.offload import BlockSwap, groups_from_modulelists  # noqa: E402

GiB = 1 << 30


class Block(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.up = nn.Linear(width, inner)
        self.act = nn.GELU(approximate="tanh")
        self.down = nn.Linear(inner, width)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def build(layers: int, width: int, inner: int) -> nn.Sequential:
    blocks = []
    for _ in range(layers):
        # Initialise on the GPU (fast), keep on the CPU.
        with torch.device("cuda"):
            block = Block(width, inner).to(torch.bfloat16)
        blocks.append(block.to("cpu"))
    return nn.Sequential(*blocks).eval()


def timed_steps(model, x, steps: int):
    with torch.no_grad():
        model(x)  # warm-up: learns the order, allocates
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated(), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--inner", type=int, default=24576)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_offload: no CUDA device, nothing to measure")
        return 0

    torch.manual_seed(0)
    model = build(args.layers, args.width, args.inner)
    groups = groups_from_modulelists(model, [model])
    group_gb = groups[0].nbytes / 1e9
    x = torch.randn(1, args.tokens, args.width, device="cuda", dtype=torch.bfloat16)
    results = []

    model.to("cuda")
    step, peak, reference = timed_steps(model, x, args.steps)
    results.append(dict(config="resident", step_s=step, peak_gib=peak / GiB, attach_s=0.0,
                        misses=0, hits=0, gb_per_s=0.0, equal=True))
    model.to("cpu")
    torch.cuda.empty_cache()

    configs = [
        ("pinned, prefetch 1", dict(mode="pinned", prefetch=1)),
        ("pinned, prefetch 2", dict(mode="pinned", prefetch=2)),
        ("pinned, no prefetch", dict(mode="pinned", prefetch=0)),
        ("pinned, 1/4 resident", dict(mode="pinned", prefetch=1, resident_groups=args.layers // 4)),
        ("stream, prefetch 1", dict(mode="stream", prefetch=1)),
        ("stream, no prefetch", dict(mode="stream", prefetch=0)),
    ]
    for name, kwargs in configs:
        start = time.perf_counter()
        swap = BlockSwap(model, groups, "cuda", **kwargs).attach()
        torch.cuda.synchronize()
        attach_s = time.perf_counter() - start
        step, peak, out = timed_steps(model, x, args.steps)
        streamed = sum(groups[i].nbytes for i in swap.swapped)  # every step, once each
        results.append(dict(
            config=name, step_s=step, peak_gib=peak / GiB, attach_s=attach_s,
            misses=swap.stats.misses, hits=swap.stats.hits,
            gb_per_s=streamed / step / 1e9, equal=bool(torch.equal(out, reference)),
        ))
        swap.detach()
        del swap
        torch.cuda.empty_cache()

    base = results[0]["step_s"]
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers of {group_gb:.2f} GB, "
          f"{args.tokens} tokens, width {args.width}, inner {args.inner}, bf16")
    print(f"{'config':<22} {'step s':>8} {'vs resident':>12} {'peak GiB':>9} {'GB/s':>6} "
          f"{'attach s':>9} {'miss/hit':>9} {'equal':>6}")
    for r in results:
        print(f"{r['config']:<22} {r['step_s']:8.3f} {r['step_s'] / base - 1:+11.1%} {r['peak_gib']:9.2f} "
              f"{r['gb_per_s']:6.1f} {r['attach_s']:9.2f} {r['misses']:>4}/{r['hits']:<4} "
              f"{str(r['equal']):>6}")
    if args.json:
        report = dict(device=torch.cuda.get_device_name(), args={**vars(args), "json": str(args.json)},
                      group_gb=group_gb, results=results)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
