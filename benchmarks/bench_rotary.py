"""Time sat's apply_rotary: our PyTorch and Triton paths, and upstream's kernel.

    python benchmarks/bench_rotary.py [--scail-root DIR] [--sweep]

Default size is SCAIL's attention: 1 x 40 heads x 48,832 tokens x 128, bf16.
GB/s counts x read once and the output written once (the cos/sin tables,
12.5 MB, are left out).  With a SCAIL checkout (--scail-root, default env
SCAIL_ROOT) its own sat/model/position_embedding/triton_rotary.py is loaded
by path and timed on the same tensors.  --sweep times every kernel
configuration in a small grid and prints the fastest.
"""
import argparse
import importlib.util
import itertools
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win import rotary  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, iters, warmup):
    """Median milliseconds of fn() on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def load_upstream(scail_root):
    """sat's triton_rotary from a SCAIL checkout, by path (it needs only torch and triton)."""
    path = Path(scail_root) / "sat" / "model" / "position_embedding" / "triton_rotary.py"
    if not path.is_file():
        raise SystemExit(f"--scail-root: {path} does not exist; pass the folder of a SCAIL checkout")
    spec = importlib.util.spec_from_file_location("_upstream_triton_rotary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=48832)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"),
                        help="SCAIL checkout whose sat kernel to time alongside (default: env SCAIL_ROOT)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Triton kernel configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rotary needs a CUDA GPU")

    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, args.heads, args.tokens, args.head_dim, device="cuda", dtype=dtype, generator=gen)
    angles = torch.rand(args.tokens, args.head_dim // 2, device="cuda", generator=gen) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pos = torch.arange(args.tokens, device="cuda")[None].expand(args.batch, -1)
    moved = 2 * x.numel() * x.element_size()
    upstream = load_upstream(args.scail_root) if args.scail_root else None

    print(f"apply_rotary on {torch.cuda.get_device_name()}: x {tuple(x.shape)} {args.dtype}, "
          f"{moved / 1e9:.2f} GB moved per call")
    print(f"{'layout':<12}{'path':<10}{'ms':>9}{'GB/s':>9}{'vs upstream':>13}")
    for interleaved in (True, False):
        name = "interleaved" if interleaved else "halves"
        results = {}
        if upstream is not None:
            results["upstream"] = time_ms(lambda: upstream.apply_rotary(
                x, cos, sin, pos, max_seqlen=args.tokens, interleaved=interleaved), args.iters, args.warmup)
        for backend in ("triton", "torch"):
            os.environ[rotary.BACKEND_ENV] = backend
            results[backend] = time_ms(lambda: rotary.apply_rotary(
                x, cos, sin, pos, max_seqlen=args.tokens, interleaved=interleaved), args.iters, args.warmup)
        os.environ.pop(rotary.BACKEND_ENV)
        for path, ms in results.items():
            ratio = f"{results['upstream'] / ms:.2f}x" if "upstream" in results else "-"
            print(f"{name:<12}{path:<10}{ms:>9.3f}{moved / ms / 1e6:>9.0f}{ratio:>13}")

    if args.sweep:
        kernels = rotary.triton_kernels()
        out = torch.empty_like(x)
        for interleaved in (True, False):
            timings = []
            for config in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (2, 4, 8)):
                ms = time_ms(lambda: kernels.rotary(x, out, cos, sin, pos, 0, interleaved=interleaved,
                                                    conjugate=False, config=config), 10, 3)
                timings.append((ms, config))
            timings.sort()
            label = "interleaved" if interleaved else "halves"
            print(f"sweep {label}: (tokens, heads, warps) fastest first, default {kernels.ROTARY_CONFIG}")
            for ms, config in timings[:5]:
                print(f"  {config}: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
