"""fp8 matmuls for fp8-stored linears: quantization, the hook, its fallback, the block swap."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from scail_win.model.kernels import fp8_linear
from scail_win.placement import offload
from scail_win.weights.checkpoint import FP8_MAX, dequantize, quantize_fp8, relative_error

FP8 = torch.float8_e4m3fn


class Block(nn.Module):
    def __init__(self, d=32, ffn=48):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.fc = nn.Linear(d, ffn, bias=False)
        self.out = nn.Linear(ffn, d)
        self.odd = nn.Linear(d, 24)  # 24 outputs: not a multiple of 16

    def forward(self, x):
        return self.out(self.fc(x)) + self.qkv(x)[..., :x.shape[-1]] + self.odd(x).sum(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def to_fp8(module: nn.Module, names) -> None:
    """Store the named weights as load_into(keep_fp8=...) does: fp8 plus a weight_scale buffer."""
    owners = dict(module.named_modules())
    for name in names:
        owner = owners[name.rsplit(".", 1)[0]]
        q, scale = quantize_fp8(owner.weight.detach())
        owner.weight = nn.Parameter(q, requires_grad=False)
        owner.register_buffer("weight_scale", scale, persistent=False)


def upcast(module: nn.Module) -> None:
    """The upcast path: every fp8 weight dequantized to bf16, as the loader does without fp8 matmul."""
    for m in module.modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dtype == FP8:
            m.weight = nn.Parameter(dequantize(m.weight, m.weight_scale, torch.bfloat16), requires_grad=False)


def make(seed=0):
    torch.manual_seed(seed)
    return Net().to(torch.bfloat16).eval()


def test_eligible_weights_are_block_linears_with_sizes_of_16():
    names = fp8_linear.fp8_linear_weights(make())
    assert names == {f"layers.{i}.{n}.weight" for i in range(2) for n in ("qkv", "fc", "out")}
    with torch.device("meta"):
        assert fp8_linear.fp8_linear_weights(Net()) == names


@pytest.mark.parametrize("fused", [True, False], ids=["fused division", "float32 chunks"])
def test_quantize_rows_against_a_float64_reference(monkeypatch, fused):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 50, 40, generator=gen) * torch.logspace(-3, 3, 40)).to(torch.bfloat16)
    x[1, 7] = 0  # an all-zero row: scale 1, zeros
    monkeypatch.setattr(fp8_linear, "_fused_division", {"cpu": fused})
    monkeypatch.setattr(fp8_linear, "QUANT_CHUNK_ELEMENTS", 7 * 40 + 3)  # several chunks, the last one short
    q, scale = fp8_linear.quantize_rows(x)
    assert fp8_linear._fused_division["cpu"] is fused
    rows = x.reshape(-1, 40).double()
    amax = rows.abs().amax(dim=1, keepdim=True)
    ref_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    assert q.shape == (150, 40) and q.dtype == FP8 and scale.shape == (150, 1) and scale.dtype == torch.float32
    # The scale is the float64 scale rounded once to float32.
    assert torch.equal(scale, ref_scale.float())
    assert float(scale[57]) == 1.0 and not q[57].float().any()
    # Every value is the float64 quotient rounded to e4m3 ...
    ref_q = (rows / scale.double()).to(FP8)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    # ... and dequantizes within e4m3's half unit (3 mantissa bits) of the input.
    back = q.double() * scale.double()
    assert bool(((back - rows).abs() <= rows.abs() * 2**-4 + scale.double() * 2**-10).all())
    assert q.float().abs().max() <= FP8_MAX


def test_the_fallback_equals_the_upcast_path_exactly():
    names = fp8_linear.fp8_linear_weights(make())
    model, reference = make(), make()
    to_fp8(model, names)
    to_fp8(reference, names)
    upcast(reference)
    hooks = fp8_linear.install_fp8_linears(model, names, device="cpu")
    assert not hooks.use_scaled_mm
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # The fp8 weights are put back after each call.
    assert all(model.get_submodule(n.rsplit(".", 1)[0]).weight.dtype == FP8 for n in names)


def test_a_call_the_fp8_path_cannot_take_upcasts_and_says_why_once(caplog):
    names = fp8_linear.fp8_linear_weights(make())
    model, reference = make(), make()
    to_fp8(model, names)
    to_fp8(reference, names)
    upcast(reference)
    hooks = fp8_linear.install_fp8_linears(model, names)
    hooks.use_scaled_mm = True  # as on a GPU with fp8 tensor cores; the inputs here are CPU tensors
    x = torch.randn(3, 32).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="scail_win.model.kernels.fp8_linear"), torch.no_grad():
        assert torch.equal(model(x), reference(x))
        model(x)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fp8 matmul: an input on cpu for a weight on cpu; such calls upcast the fp8 weight"]


def test_install_and_remove_restore_the_modules():
    model = make()
    names = fp8_linear.fp8_linear_weights(model)
    before = {n: type(m).forward for n, m in model.named_modules()}
    hooks = fp8_linear.install_fp8_linears(model, names, device="cpu")
    hooked = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert sorted(hooked) == sorted(n.rsplit(".", 1)[0] for n in names)
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        plain = make()(x)
        # bf16 weights: the hook calls the module's own forward.
        assert torch.equal(model(x), plain)
    with pytest.raises(ValueError, match="already has an instance forward"):
        fp8_linear.install_fp8_linears(model, names)
    hooks.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert {n: type(m).forward for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="no linear owns layers.0.nope.weight"):
        fp8_linear.install_fp8_linears(model, {"layers.0.nope.weight"})


def test_plan_logs_one_line_why_it_is_off(caplog):
    model = make()
    with caplog.at_level(logging.INFO, logger="scail_win.model.kernels.fp8_linear"):
        assert fp8_linear.plan_fp8_matmul(model, "cpu", enabled=False, weights_fp8=True) == set()
        assert fp8_linear.plan_fp8_matmul(model, "cpu", enabled=True, weights_fp8=True) == set()
        assert fp8_linear.plan_fp8_matmul(model, "cuda", enabled=True, weights_fp8=False) == set()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "fp8 matmul off: the DiT runs on cpu; fp8 matmuls need a CUDA GPU; fp8 weights are upcast to bf16 on the GPU",
        "fp8 matmul off: the DiT weights are not fp8 (convert them with `scail-win convert --dtype fp8_e4m3fn`); "
        "fp8 weights are upcast to bf16 on the GPU",
    ]


def test_block_swap_keeps_the_hooked_weights_fp8_through_materialize():
    """A swap whose materialize keeps fp8 (CheckpointWeights(keep_fp8=...)) feeds the hook fp8 weights."""
    names = fp8_linear.fp8_linear_weights(make())
    model, reference = make(), make()
    to_fp8(model, names)
    to_fp8(reference, names)
    upcast(reference)
    seen = []

    def materialize(src, device, name):
        seen.append((name, src.dtype))
        return src.clone()

    fp8_linear.install_fp8_linears(model, names, device="cpu")
    swap = offload.BlockSwap(model, offload.groups_from_modulelists(model, ["layers"]), "cpu",
                             resident_groups=0, mode="stream", materialize=materialize)
    x = torch.randn(3, 32).to(torch.bfloat16)
    with swap, torch.no_grad():
        out = model(x)
    assert torch.equal(out, reference(x))
    assert ("layers.1.fc.weight", FP8) in seen and ("layers.1.fc.weight_scale", torch.float32) in seen


def test_checkpoint_weights_keep_fp8_for_named_weights(tmp_path):
    from safetensors.torch import save_file

    from scail_win.weights.checkpoint import CheckpointWeights, open_state_dict

    w = torch.randn(32, 16)
    q, scale = quantize_fp8(w)
    save_file({"a.weight": q, "a.weight_scale": scale, "b.weight": q.clone(), "b.weight_scale": scale.clone()},
              str(tmp_path / "w.safetensors"))
    with open_state_dict(tmp_path / "w.safetensors") as source:
        cw = CheckpointWeights(source, keep_fp8={"a.weight"}.__contains__)
        kept = cw.materialize(source.raw("a.weight")[0], torch.device("cpu"), "a.weight")
        upcast_b = cw.materialize(source.raw("b.weight")[0], torch.device("cpu"), "b.weight")
    assert kept.dtype == FP8 and torch.equal(kept.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(upcast_b, dequantize(q, scale))


def _scaled_mm_runs(device) -> bool:
    try:
        x = torch.zeros(16, 16, device=device).to(FP8)
        torch._scaled_mm(x, x.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _check_scaled_linear(device):
    gen = torch.Generator().manual_seed(0)
    for n_in, n_out in ((512, 1536), (1024, 512)):
        x = torch.randn(2, 77, n_in, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
        bias = torch.randn(n_out, generator=gen).to(device, torch.bfloat16)
        q, scale = (t.to(device) for t in quantize_fp8(w))
        out = fp8_linear.scaled_linear(x, q, scale, bias)
        reference = nn.functional.linear(x, dequantize(q, scale, torch.bfloat16), bias)
        assert out.shape == reference.shape and out.dtype == torch.bfloat16
        # Only the activation's e4m3 rounding separates them: ~2-3 % relative.
        assert relative_error(out, reference) < 0.05


def test_scaled_linear_on_the_cpu_where_torch_has_a_cpu_scaled_mm():
    if not _scaled_mm_runs("cpu"):
        pytest.skip("this torch has no CPU torch._scaled_mm")
    _check_scaled_linear("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scaled_mm_matches_the_bf16_upcast_on_the_gpu():
    why = fp8_linear.fp8_matmul_support("cuda")
    if why is not None:
        pytest.skip(why)
    _check_scaled_linear("cuda")
    model, reference = make(), make()
    names = fp8_linear.fp8_linear_weights(model)
    to_fp8(model, names)
    to_fp8(reference, names)
    upcast(reference)
    model.cuda(), reference.cuda()
    assert fp8_linear.install_fp8_linears(model, names, "cuda").use_scaled_mm
    x = torch.randn(4, 96, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        # Two quantized activations in a row (about 3.3 % on the CPU's _scaled_mm).
        assert relative_error(model(x), reference(x)) < 0.06


def test_a_device_whose_division_cannot_write_e4m3_quantizes_through_float32(monkeypatch, caplog):
    x = torch.randn(9, 32).to(torch.bfloat16)
    expected = fp8_linear.quantize_rows(x)
    real_div = torch.div

    def div(*args, out=None, **kwargs):
        if out is not None and out.dtype == FP8:
            raise RuntimeError('"div_true_cuda" not implemented for \'Float8_e4m3fn\'')
        return real_div(*args, out=out, **kwargs)

    monkeypatch.setattr(torch, "div", div)
    monkeypatch.setattr(fp8_linear, "_fused_division", {})
    with caplog.at_level(logging.INFO, logger="scail_win.model.kernels.fp8_linear"):
        for _ in range(2):
            q, scale = fp8_linear.quantize_rows(x)
            assert torch.equal(q.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(scale, expected[1])
    assert fp8_linear._fused_division["cpu"] is False
    assert sum("quantizing through float32" in r.getMessage() for r in caplog.records) == 1


def test_the_memory_plan_counts_fp8_weights_at_one_byte():
    from scail_win.model.loader import largest_group_gpu_bytes

    class Sat(nn.Module):  # the shape of a sat model: transformer.layers
        def __init__(self):
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.layers = Net().layers

    with torch.device("meta"):
        model = Sat()
    groups = offload.scail_layer_groups(model)
    params = max(g.numel for g in groups)
    assert largest_group_gpu_bytes(model, groups) == 2 * params
    names = fp8_linear.fp8_linear_weights(model)
    fp8_params = sum(p.numel() for n, p in model.named_parameters() if n in names) // 2  # per layer
    assert largest_group_gpu_bytes(model, groups, frozenset(names)) == 2 * params - fp8_params
