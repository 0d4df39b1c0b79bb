"""Time one solver step and its extra memory on SCAIL's full-size latents.

    python benchmarks/bench_samplers.py [--device cuda] [--shape 1 21 16 64 112] [--steps 50]

Each solver integrates ``--steps`` steps of a random velocity field (the DiT
is left out: its step is ~13.5 s on an H200 against well under a millisecond
here); the table gives the median milliseconds per step and the memory held
above the latents and velocity at the peak of a run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win import samplers  # noqa: E402


def run(name, sigmas, x, velocity, device):
    """Milliseconds per step, and peak bytes allocated during the run above those at its start."""
    solver = samplers.make_solver(name, sigmas)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for i in range(solver.num_steps):
        start = time.perf_counter()
        x = solver.step(i, x, velocity)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 21, 16, 64, 112])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.shape, generator=gen).to(device)
    velocity = torch.randn(args.shape, generator=gen).to(device)
    sigmas = samplers.flow_sigmas(args.steps, args.shift)
    mib = x.numel() * 4 / 2 ** 20
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"solver step on {where}: latents {tuple(x.shape)} float32 ({mib:.1f} MiB), "
          f"{args.steps} steps, shift {args.shift:g}")
    print(f"{'solver':<10}{'ms/step':>10}{'extra MiB':>12}{'x latents':>11}")
    for name in samplers.SOLVERS:
        run(name, sigmas, x, velocity, device)      # warm-up: kernels, allocator
        ms, peak = run(name, sigmas, x, velocity, device)
        extra = "-" if peak is None else f"{peak / 2 ** 20:.1f}"
        ratio = "-" if peak is None else f"{peak / 2 ** 20 / mib:.1f}"
        print(f"{name:<10}{ms:>10.3f}{extra:>12}{ratio:>11}")


if __name__ == "__main__":
    main()
