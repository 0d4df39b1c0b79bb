"""Time the attention backends and the fp8 matmul at SCAIL's shapes; print two tables.

    python benchmarks/bench_kernels.py [--batch 1 2] [--tokens 48832] [--skip-attention] [--skip-linear]

Attention: q, k, v of (batch, 40 heads, 48,832 tokens, 128) bf16 -- one
self-attention call of SCAIL's DiT (batch 2: both CFG halves) -- and a
cross-attention call against 512 text tokens; each backend's output against
SDPA's (relative L2 and max abs). A backend whose package is missing or
fails its probe gets a row saying so; "peak MiB" is what one call
allocates beyond its inputs (output included). Linear: the DiT's projections
(5120 -> 15360 qkv, 5120 -> 13824 FFN in, 13824 -> 5120 FFN out) on
batch x tokens rows: bf16 ``F.linear`` against fp8 ``scaled_linear``
(per-row activation quantization included, and ``torch._scaled_mm`` alone),
with the fp8 output's error against the bf16 product of the same fp8
weights upcast (what the default path computes) and against the original
bf16 weights.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win.model.kernels import attention  # noqa: E402
from scail_win.model.kernels import fp8_linear
from scail_win.weights.checkpoint import dequantize, quantize_fp8, relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rope3d import time_ms  # noqa: E402  (one CUDA-event timer for the kernel benchmarks)

LINEARS = (("qkv", 5120, 15360), ("ffn in", 5120, 13824), ("ffn out", 13824, 5120))


def attention_rows(batch, tokens, kv_tokens, heads, head_dim, iters, warmup):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda n: (batch, heads, n, head_dim)  # noqa: E731
    q = torch.randn(shape(tokens), device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(shape(kv_tokens), device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    reference = attention._sdpa(q, k, v)
    flops = 4 * batch * heads * tokens * kv_tokens * head_dim
    rows = []
    sdpa_ms = None
    for name in ("sdpa", "flash", "sage"):
        why = None if name == "sdpa" else attention.probe(name, "cuda", torch.bfloat16)
        if why is not None:
            rows.append((name, None, f"{attention.PACKAGES[name][0]} {why}"))
            continue
        backend = attention.select_backend(name, "cuda", torch.bfloat16)
        ms = time_ms(lambda: backend(q, k, v), iters, warmup)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = backend(q, k, v)
        torch.cuda.synchronize()
        # Beyond the inputs: the output plus the kernel's own temporaries.
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        sdpa_ms = ms if name == "sdpa" else sdpa_ms
        rel = attention.relative_l2(out, reference)
        max_abs = float((out.float() - reference.float()).abs().max())
        rows.append((name, (ms, flops / ms / 1e9, sdpa_ms / ms, rel, max_abs, extra), None))
        del out
    return rows


def print_attention(args):
    print(f"attention on {torch.cuda.get_device_name()}, bf16, {args.heads} heads x {args.head_dim}")
    print(f"{'call':<26}{'backend':<8}{'ms':>10}{'TFLOP/s':>10}{'vs sdpa':>9}{'rel L2':>10}{'max abs':>10}"
          f"{'peak MiB':>10}")
    for batch in args.batch:
        for label, kv in (("self", args.tokens), ("cross (text)", args.text_tokens)):
            call = f"B={batch} {label} {args.tokens}x{kv}"
            for name, result, why in attention_rows(batch, args.tokens, kv, args.heads, args.head_dim,
                                                    args.iters, args.warmup):
                if result is None:
                    print(f"{call:<26}{name:<8}  {why}")
                    continue
                ms, tflops, speed, rel, max_abs, extra = result
                print(f"{call:<26}{name:<8}{ms:>10.2f}{tflops:>10.0f}{speed:>8.2f}x{rel:>10.2e}{max_abs:>10.2e}"
                      f"{extra:>10.0f}")
            torch.cuda.empty_cache()


def print_linear(args):
    why = fp8_linear.fp8_matmul_support("cuda")
    print(f"\nlinear on {torch.cuda.get_device_name()}: bf16 F.linear vs fp8 scaled_linear (per-row x scale, "
          f"per-channel w scale, bf16 out, bias)")
    if why is not None:
        print(f"fp8 matmul not available: {why}")
    print(f"{'layer':<10}{'rows':>8}{'bf16 ms':>10}{'fp8 ms':>9}{'mm only':>9}{'quant':>8}{'speedup':>9}"
          f"{'vs upcast':>11}{'vs bf16 w':>11}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in args.batch:
        rows = batch * args.tokens
        for name, n_in, n_out in LINEARS:
            x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16, generator=gen)
            w = (torch.randn(n_out, n_in, device="cuda", generator=gen) / n_in ** 0.5).to(torch.bfloat16)
            bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.1
            wq, ws = quantize_fp8(w)
            upcast_w = dequantize(wq, ws, torch.bfloat16)
            bf16_ms = time_ms(lambda: F.linear(x, upcast_w, bias), args.iters, args.warmup)
            if why is not None:
                print(f"{name:<10}{rows:>8}{bf16_ms:>10.2f}{'-':>9}")
                continue
            fp8_ms = time_ms(lambda: fp8_linear.scaled_linear(x, wq, ws, bias), args.iters, args.warmup)
            q, xs = fp8_linear.quantize_rows(x)
            quant_ms = time_ms(lambda: fp8_linear.quantize_rows(x), args.iters, args.warmup)
            mm_ms = time_ms(lambda: torch._scaled_mm(q, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1), bias=bias,
                                                     out_dtype=torch.bfloat16), args.iters, args.warmup)
            out = fp8_linear.scaled_linear(x, wq, ws, bias)
            vs_upcast = relative_error(out, F.linear(x, upcast_w, bias))
            vs_bf16 = relative_error(out, F.linear(x, w, bias))
            print(f"{name:<10}{rows:>8}{bf16_ms:>10.2f}{fp8_ms:>9.2f}{mm_ms:>9.2f}{quant_ms:>8.2f}"
                  f"{bf16_ms / fp8_ms:>8.2f}x{vs_upcast:>11.2e}{vs_bf16:>11.2e}")
            del x, w, wq, upcast_w, q, out
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="samples per call (2: CFG)")
    parser.add_argument("--tokens", type=int, default=48832, help="tokens per sample (512x896, 81 frames)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-linear", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    print(f"torch {torch.__version__}; available: " + ", ".join(
        f"{name} ({state})" for name, state in attention.available_backends().items()))
    if not args.skip_attention:
        print_attention(args)
    if not args.skip_linear:
        print_linear(args)


if __name__ == "__main__":
    main()
