"""LoRA merging on every weight path: one-time merge cost, per-step cost, output against resident.

A stack of ``--layers`` layer groups with sat's names and SCAIL's per-layer
sizes (hidden 5120, FFN 13824: fused qkv, dense, cross query / key_value /
dense, CLIP key_value, FFN, qk norms, AdaLN table; 0.81 GB a layer in bf16)
runs a forward over ``--tokens`` tokens. A random rank-``--rank`` LoRA in
kohya's naming covers every linear of every layer. Each path -- resident,
block swap with pinned masters, block swap streamed from a safetensors file
(bf16 and fp8), all layers swapped -- runs without and with the LoRA and
reports: the one-time merge, the step time and its cost over the same path
without the LoRA, peak allocated memory, and the output's relative
difference from the resident model with the LoRA.

    python benchmarks/bench_lora.py [--layers 8] [--tokens 8192] [--rank 32] [--json out.json]

Without CUDA it says so and exits 0 (``--device cpu`` with small sizes
checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scail_win.weights import lora as L  # noqa: E402
from scail_win.weights import checkpoint as W  # noqa: E402
from scail_win.placement.offload import BlockSwap, scail_layer_groups  # noqa: E402

GiB = 1 << 30


class _Norm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


def _layer(h, ffn):
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.query_key_value = nn.Linear(h, 3 * h)
    layer.attention.dense = nn.Linear(h, h)
    layer.cross_attention = nn.Module()
    layer.cross_attention.query = nn.Linear(h, h)
    layer.cross_attention.key_value = nn.Linear(h, 2 * h)
    layer.cross_attention.dense = nn.Linear(h, h)
    layer.post_cross_attention_layernorm = nn.LayerNorm(h)
    layer.mlp = nn.Module()
    layer.mlp.dense_h_to_4h = nn.Linear(h, ffn)
    layer.mlp.dense_4h_to_h = nn.Linear(ffn, h)
    return layer


class Stack(nn.Module):
    """SCAIL's per-layer tensors under sat's names; attention through SDPA, 40 heads of 128."""

    def __init__(self, layers, h, ffn, heads):
        super().__init__()
        self.heads = heads
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_layer(h, ffn) for _ in range(layers))
        ada = nn.Module()
        ada.adaLN_modulations = nn.ParameterList(nn.Parameter(torch.randn(1, 6, h) / h**0.5) for _ in range(layers))
        ada.query_layernorm_list = nn.ModuleList(_Norm(h) for _ in range(layers))
        ada.key_layernorm_list = nn.ModuleList(_Norm(h) for _ in range(layers))
        ada.clip_feature_key_value_list = nn.ModuleList(nn.Linear(h, 2 * h) for _ in range(layers))
        self.mixins = nn.ModuleDict({"adaln_layer": ada})
        self.hooks = {"layer_forward": self.layer_forward}

    def _attend(self, q, k, v):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    def layer_forward(self, x, ctx, *, layer_id):
        i = int(layer_id)
        ada, layer = self.mixins["adaln_layer"], self.transformer.layers[i]
        mod = ada.adaLN_modulations[i]
        q, k, v = layer.attention.query_key_value(x * (1 + mod[:, 1]) + mod[:, 0]).chunk(3, dim=-1)
        x = x + mod[:, 2] * layer.attention.dense(self._attend(ada.query_layernorm_list[i](q),
                                                                ada.key_layernorm_list[i](k), v))
        q = layer.cross_attention.query(x)
        k, v = layer.cross_attention.key_value(ctx).chunk(2, dim=-1)
        ki, vi = ada.clip_feature_key_value_list[i](ctx).chunk(2, dim=-1)
        x = x + layer.cross_attention.dense(self._attend(q, k, v) + self._attend(q, ki, vi))
        h = layer.post_cross_attention_layernorm(x)
        return x + mod[:, 5] * layer.mlp.dense_4h_to_h(F.gelu(layer.mlp.dense_h_to_4h(h), approximate="tanh"))

    def forward(self, x, ctx):
        for i in range(len(self.transformer.layers)):
            x = self.hooks["layer_forward"](x, ctx, layer_id=i)
        return x


LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def write_lora(path, layers, h, ffn, rank):
    shapes = {"ffn.0": (ffn, h), "ffn.2": (h, ffn)}
    sd = {}
    g = torch.Generator().manual_seed(1)
    for i in range(layers):
        for name in LINEARS:
            out, inp = shapes.get(name, (h, h))
            key = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
            sd[key + ".lora_down.weight"] = (torch.randn(rank, inp, generator=g) / inp**0.5).bfloat16()
            sd[key + ".lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.02).bfloat16()
            sd[key + ".alpha"] = torch.tensor(float(rank) / 2)
    save_file(sd, str(path))
    return sum(t.numel() * t.element_size() for t in sd.values())


def write_checkpoint(model, path, fp8):
    sd = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    scales = {}
    for n, t in list(sd.items()):
        if fp8 and W.is_fp8_candidate(n, tuple(t.shape)):
            sd[n], scales[n + W.FP8_SCALE_SUFFIX] = W.quantize_fp8(t)
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    tail = [(n, t.dtype, tuple(t.shape)) for n, t in scales.items()]
    everything = {**sd, **scales}
    with W.SafetensorsWriter(path, entries, tail=tail) as writer:
        for n in writer.pending:
            writer.write(n, everything[n])
        writer.commit()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, inputs, steps, device):
    with torch.no_grad():
        model(*inputs)  # warm-up: learns the swap order, allocates
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(*inputs)
        sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (time.perf_counter() - start) / steps, peak, out


def run_path(name, make, lora_spec, inputs, steps, device, reference):
    """(row without LoRA, row with LoRA) for one weight path; ``make()`` -> (model, swap or None, cleanup)."""
    rows = []
    base = None
    for with_lora in (False, True):
        model, swap, cleanup = make()
        merge_s = None
        if with_lora:
            sync(device)
            start = time.perf_counter()
            L.apply_loras(model, [lora_spec], device=device, swap=swap)
            sync(device)
            merge_s = time.perf_counter() - start
        step, peak, out = timed(model, inputs, steps, device)
        if reference.get("out") is None and with_lora:
            reference["out"] = out.float().cpu()
        diff = W.relative_error(out.float().cpu(), reference["out"]) if with_lora else None
        rows.append(dict(path=name, lora=with_lora, merge_s=merge_s, step_s=step,
                         vs_no_lora=step / base if base else None, peak_gib=peak / GiB, rel_diff=diff))
        base = base or step
        if swap is not None:
            swap.detach()
        cleanup()
        del model, swap, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt(value, spec):
    return "" if value is None else spec.format(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_lora: no CUDA device, nothing to measure")
        return 0

    torch.manual_seed(0)
    with torch.device(device):
        master = Stack(args.layers, args.hidden, args.ffn, args.heads).to(torch.bfloat16).eval()
    master = master.to("cpu")
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(1, n, args.hidden, generator=g) * 0.5).bfloat16().to(device)
              for n in (args.tokens, 512)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lora_path = tmp / "lora.safetensors"
        lora_bytes = write_lora(lora_path, args.layers, args.hidden, args.ffn, args.rank)
        spec = L.LoraSpec(lora_path, 0.8)
        files = {}
        for fp8 in (False, True):
            files[fp8] = tmp / f"dit_{'fp8' if fp8 else 'bf16'}.safetensors"
            write_checkpoint(master, files[fp8], fp8)

        def fresh():
            with torch.device("meta"):
                return Stack(args.layers, args.hidden, args.ffn, args.heads).eval()

        def resident():
            model = fresh()
            W.load_into(model, files[False], placement=device, dtype=torch.bfloat16)
            model.hooks = {"layer_forward": model.layer_forward}
            return model, None, lambda: None

        def pinned():
            model = fresh()
            W.load_into(model, files[False], placement="cpu", dtype=torch.bfloat16)
            model.hooks = {"layer_forward": model.layer_forward}
            swap = BlockSwap(model, scail_layer_groups(model), device, mode="pinned").attach()
            return model, swap, lambda: None

        def streamed(fp8):
            def make():
                model = fresh()
                src = W.open_state_dict(files[fp8])
                keep = (lambda n: n.startswith(("transformer.layers.", "mixins."))) if fp8 else False
                W.load_into(model, src, placement="cpu", dtype=torch.bfloat16, keep_fp8=keep)
                model.hooks = {"layer_forward": model.layer_forward}
                kwargs = {}
                if fp8:
                    cw = W.CheckpointWeights(src, dtype=torch.bfloat16)
                    kwargs = dict(source=cw, materialize=cw.materialize)
                swap = BlockSwap(model, scail_layer_groups(model), device, mode="stream", **kwargs).attach()
                return model, swap, src.close
            return make

        reference = {}
        rows = []
        for name, make in (("resident", resident), ("swap, pinned masters", pinned),
                           ("swap, streamed bf16 file", streamed(False)), ("swap, streamed fp8 file", streamed(True))):
            rows += run_path(name, make, spec, inputs, args.steps, device, reference)

    print(f"{args.layers} layer groups (hidden {args.hidden}, FFN {args.ffn}), {args.tokens} tokens, "
          f"rank-{args.rank} LoRA on every linear ({lora_bytes / 2**20:.0f} MiB), {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); all layers swapped")
    print("| path | LoRA | one-time merge | step | vs same path without LoRA | peak allocated "
          "| output vs resident+LoRA (rel.) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["path"], "yes" if r["lora"] else "no", _fmt(r["merge_s"], "{:.2f} s"), _fmt(r["step_s"], "{:.3f} s"),
                 _fmt(r["vs_no_lora"], "{:.3f}"), _fmt(r["peak_gib"], "{:.2f} GiB"), _fmt(r["rel_diff"], "{:.4f}")]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
