"""Time the fused 3D RoPE (scail_win.model.kernels.rope3d) and upstream's mixin at SCAIL's size.

    python benchmarks/bench_rope3d.py [--scail-root DIR] [--sweep]

One attention call rotates q and k: 1 x 40 heads x 48,832 tokens x 128 bf16
each (512x896, 81 frames: 1,792 reference + 37,632 video + 9,408 pose
tokens).  Inputs are laid out as the DiT hands them over, a (b, s, heads, d)
buffer seen as (b, heads, s, d); --contiguous uses (b, heads, s, d) memory.
GB/s counts q and k read once and written once; "extra MiB" is the peak
memory of a call beyond its inputs and outputs.  With a SCAIL checkout
(--scail-root, default env SCAIL_ROOT) upstream's mixin is timed on the same
tensors (its class is compiled from the DiT file, which needs sat but not
sgm).  --sweep times a grid of Triton kernel configurations.
"""
import argparse
import ast
import itertools
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win import rotary  # noqa: E402
from scail_win.model.kernels import rope3d

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MiB = 1 << 20


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


def extra_mib(fn, kept_bytes):
    """Peak allocation of one fn() call beyond what it returns (kept_bytes)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return (peak - kept_bytes) / MiB


def upstream_mixin_class(scail_root):
    """Upstream's Rotary3DPositionEmbeddingMixin compiled from the SCAIL DiT file."""
    from scail_win import hook

    sys.path.insert(0, str(scail_root))
    hook.install()  # sat imports triton_rotary; ours stands in where Triton is missing
    from einops import rearrange, repeat
    from sat.model.base_model import BaseMixin, non_conflict
    from sat.transformer_defaults import attention_fn_default

    path = Path(scail_root) / "dit_video_crossattn_sc_xc.py"
    if not path.is_file():
        raise SystemExit(f"--scail-root: {path} does not exist; pass the folder of a SCAIL checkout")
    wanted = {"broadcat", "rotate_half", "rotate_half_false", "Rotary3DPositionEmbeddingMixin"}
    body = [n for n in ast.parse(path.read_text(encoding="utf-8")).body if getattr(n, "name", None) in wanted]
    namespace = dict(torch=torch, F=F, rearrange=rearrange, repeat=repeat, BaseMixin=BaseMixin,
                     non_conflict=non_conflict, attention_fn_default=attention_fn_default)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["Rotary3DPositionEmbeddingMixin"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (rope_T)")
    parser.add_argument("--height", type=int, default=32, help="patch rows (rope_H)")
    parser.add_argument("--width", type=int, default=56, help="patch columns (rope_W)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--contiguous", action="store_true", help="(b, heads, s, d) memory instead of the DiT's")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--scail-root", default=os.environ.get("SCAIL_ROOT"),
                        help="SCAIL checkout whose mixin to time alongside (default: env SCAIL_ROOT)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Triton kernel configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope3d needs a CUDA GPU")

    T, H, W = args.frames, args.height, args.width
    lay = rope3d.Rope3DLayout(T, H, W, ref_length=H * W, seq_length=T * H * W, pose_length=T * (H // 2) * (W // 2))
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make():
        shape = (args.batch, args.heads, lay.total, 128)
        if args.contiguous:
            return torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        return torch.randn(shape[0], shape[2], shape[1], shape[3], device="cuda", dtype=dtype,
                           generator=gen).transpose(1, 2)

    q, k = make(), make()
    moved = 2 * 2 * q.numel() * q.element_size()
    table = dict(height=150, width=150, frames=21)  # SCAIL's config: latent 300/2, 81 frames
    kwargs = dict(rope_T=T, rope_H=H, rope_W=W, ref_length=lay.ref_length, seq_length=lay.seq_length,
                  pose_length=lay.pose_length, rope_H_shift=0, rope_W_shift=0, global_rope_H=0, global_rope_W=120)

    print(f"3D RoPE of q and k on {torch.cuda.get_device_name()}: each {tuple(q.shape)} {args.dtype}, "
          f"{'contiguous' if args.contiguous else 'DiT layout'}, {moved / 1e9:.2f} GB moved per call")
    print(f"{'path':<22}{'ms':>9}{'GB/s':>9}{'extra MiB':>11}{'vs upstream':>13}")
    rows = []
    if args.scail_root:
        upstream = upstream_mixin_class(args.scail_root)(
            height=150, width=150, compressed_num_frames=21, hidden_size=5120, hidden_size_head=128,
            interleaved_rope=True)

        def upstream_call():
            seen = []
            upstream.attention_fn(q, k, k, None, old_impl=lambda q, k, v, m, **kw: seen.extend((q, k)), **kwargs)
            return seen

        rows.append(("upstream mixin", time_ms(upstream_call, args.iters, args.warmup),
                     extra_mib(upstream_call, 2 * q.numel() * q.element_size())))
    for backend, mode, inplace in itertools.product(("triton", "torch"), ("fp32", "exact"), (False, True)):
        os.environ[rotary.BACKEND_ENV] = backend
        rope = rope3d.Rope3D(128, interleaved=True, mode=mode, **table)
        qq, kk = (q.clone(), k.clone()) if inplace else (q, k)

        def call():
            return rope(qq, lay, inplace=inplace), rope(kk, lay, inplace=inplace)

        label = f"{backend} {mode}{' inplace' if inplace else ''}"
        kept = 0 if inplace else 2 * q.numel() * q.element_size()
        rows.append((label, time_ms(call, args.iters, args.warmup), extra_mib(call, kept)))
    os.environ.pop(rotary.BACKEND_ENV)
    reference = rows[0][1] if args.scail_root else None
    for label, ms, extra in rows:
        ratio = f"{reference / ms:.2f}x" if reference else "-"
        print(f"{label:<22}{ms:>9.3f}{moved / ms / 1e6:>9.0f}{extra:>11.0f}{ratio:>13}")

    if args.sweep:
        kernels = rotary.triton_kernels()
        out = torch.empty_like(q)
        rope = rope3d.Rope3D(128, interleaved=True, mode="fp32", **table)
        tab, tab_rows = rope.tables(q, lay)
        for exact in (False, True):
            timings = []
            for config in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (2, 4, 8)):
                ms = time_ms(lambda: kernels.rope3d(q, out, tab, tab_rows, interleaved=True, exact=exact,
                                                    config=config), 10, 3)
                timings.append((ms, config))
            timings.sort()
            print(f"sweep {'exact' if exact else 'fp32'}: (tokens, heads, warps) fastest first, "
                  f"default {kernels.ROPE3D_CONFIG}; GB/s for one tensor")
            for ms, config in timings[:5]:
                print(f"  {config}: {ms:.3f} ms, {moved / 2 / ms / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
