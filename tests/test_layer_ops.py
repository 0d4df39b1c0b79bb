"""scail_win.model.kernels.layer_ops: fused RMSNorm, LayerNorm + modulate and gated add against upstream's op chains.

The references are the chains of PyTorch ops SCAIL's layer runs (qk RMSNorm
in float32, LayerNorm then ``x * (1 + scale) + shift``, ``x + gate * y``),
evaluated in float64 where a kernel may only differ by its float32 sums.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scail_win.model.kernels import layer_ops
from scail_win.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (batch, tokens, features): odd widths, a single token, a batch of one.
SHAPES = ((2, 7, 5120), (1, 1, 33), (3, 17, 100))


def rnd(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + 0.3).to(device=device, dtype=dtype)


def upstream_rms_norm(x, weight, eps):
    """SCAIL's qk-norm chain: float32 statistics, weight times the normalised input, one cast back."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = weight * h
    return h.to(x.dtype)


def upstream_modulate(x, shift, scale, eps, weight=None, bias=None):
    """LayerNorm (float32 math, rounded), then upstream's modulate with 1 + scale made first."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps).to(x.dtype)
    return normed * (1 + scale) + shift


def ulp(x):
    """The spacing of x's dtype at |x| (bounds a rounding difference)."""
    finfo = torch.finfo(x.dtype)
    return torch.clamp(x.abs().float(), min=finfo.tiny) * finfo.eps


def assert_within_ulps(out, ref, ulps):
    diff = (out.float() - ref.float()).abs()
    bound = ulps * torch.maximum(ulp(ref), ulp(out)) + 1e-30
    worst = float((diff / bound).max())
    assert worst <= 1.0, f"off by {worst * ulps:.2f} ulps"


def modulation(batch, features, dtype, device="cpu", seed=5):
    shift = rnd(batch, 6, features, dtype=dtype, device=device, seed=seed, scale=0.1)
    # Chunks of a (batch, 6, features) tensor, as the AdaLN mixin hands them out.
    return shift[:, 0:1], shift[:, 1:2], shift[:, 2:3]


# ---------------------------------------------------------------- PyTorch path

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", (True, False), ids=("weight", "no-weight"))
def test_rms_norm_is_the_upstream_chain(dtype, shape, affine):
    x = rnd(*shape, dtype=dtype)
    weight = rnd(shape[-1], dtype=dtype, seed=1) if affine else None
    assert torch.equal(layer_ops.rms_norm(x, weight, 1e-6), upstream_rms_norm(x, weight, 1e-6))


def test_rms_norm_writes_into_a_strided_out_from_a_strided_input():
    # q is a slice of the fused qkv projection; the result goes into a slice of the q buffer.
    mixed = rnd(2, 9, 3 * 40, dtype=torch.bfloat16)
    q = mixed[..., :40]
    buffer = torch.zeros(2, 20, 40, dtype=torch.bfloat16)
    weight = rnd(40, dtype=torch.bfloat16, seed=2)
    out = layer_ops.rms_norm(q, weight, 1e-6, out=buffer[:, 5:14])
    assert out.data_ptr() == buffer[:, 5:14].data_ptr()
    assert torch.equal(buffer[:, 5:14], upstream_rms_norm(q, weight, 1e-6))
    assert not buffer[:, :5].any() and not buffer[:, 14:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", (True, False), ids=("affine", "plain"))
def test_layer_norm_modulate_is_the_upstream_chain(dtype, shape, affine):
    batch, _, n = shape
    x = rnd(*shape, dtype=dtype)
    shift, scale, _ = modulation(batch, n, dtype)
    weight, bias = (rnd(n, dtype=dtype, seed=3), rnd(n, dtype=dtype, seed=4)) if affine else (None, None)
    out = layer_ops.layer_norm_modulate(x, shift, 1 + scale, 1e-6, weight, bias)
    assert torch.equal(out, upstream_modulate(x, shift, scale, 1e-6, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_add_is_in_place_and_the_upstream_chain(dtype):
    residual = rnd(2, 11, 96, dtype=dtype)
    update = rnd(2, 11, 96, dtype=dtype, seed=7)
    _, _, gate = modulation(2, 96, dtype)
    expected = residual + gate * update
    ptr = residual.data_ptr()
    out = layer_ops.gated_add_(residual, gate, update)
    assert out.data_ptr() == ptr and torch.equal(residual, expected)


def test_a_modulation_shared_by_the_batch_broadcasts():
    x = rnd(3, 5, 64, dtype=torch.bfloat16)
    shift, scale, gate = modulation(1, 64, torch.bfloat16)
    out = layer_ops.layer_norm_modulate(x, shift, 1 + scale, 1e-5)
    assert torch.equal(out, upstream_modulate(x, shift, scale, 1e-5))
    residual = x.clone()
    layer_ops.gated_add_(residual, gate, out)
    assert torch.equal(residual, x + gate * out)


def test_bad_arguments_are_errors_not_asserts():
    x = rnd(2, 4, 8)
    shift, scale, gate = modulation(2, 8, torch.float32)
    with pytest.raises(ValueError, match="batch, tokens, features"):
        layer_ops.rms_norm(x[0], None, 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        layer_ops.rms_norm(x.transpose(1, 2), None, 1e-6)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        layer_ops.rms_norm(x, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        layer_ops.rms_norm(x, None, 1e-6, out=torch.empty(2, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="shift must be"):
        layer_ops.layer_norm_modulate(x, shift[:1].expand(3, 1, 8), scale, 1e-6)
    with pytest.raises(ValueError, match="one_plus_scale must match"):
        layer_ops.layer_norm_modulate(x, shift, scale.double(), 1e-6)
    with pytest.raises(ValueError, match="update must be"):
        layer_ops.gated_add_(x, gate, x[:, :2])
    with pytest.raises(TypeError, match="x must be a tensor"):
        layer_ops.rms_norm([1.0], None, 1e-6)


def test_backend_choice(monkeypatch):
    x = rnd(1, 2, 8)
    monkeypatch.delenv(layer_ops.BACKEND_ENV, raising=False)
    assert layer_ops.select_backend(x) == "torch"  # a CPU tensor
    monkeypatch.setenv(layer_ops.BACKEND_ENV, "torch")
    assert layer_ops.select_backend(x) == "torch"
    monkeypatch.setenv(layer_ops.BACKEND_ENV, "triton")
    with pytest.raises(UserError, match="SCAIL_WIN_LAYER_OPS=triton but the tensor is on cpu"):
        layer_ops.select_backend(x)
    monkeypatch.setenv(layer_ops.BACKEND_ENV, "fast")
    with pytest.raises(UserError, match="SCAIL_WIN_LAYER_OPS='fast' is not valid"):
        layer_ops.select_backend(x)


# ---------------------------------------------------------------- Triton kernels

INTERPRETER_CHECK = """
import torch, torch.nn.functional as F
from scail_win.model.kernels import layer_ops_triton as k
g = torch.Generator().manual_seed(0)
for batch, tokens, n in ((2, 3, 100), (1, 2, 64)):
    x = torch.randn(batch, tokens, 3 * n, generator=g)[..., n:2 * n]  # strided, as q/k are
    w = torch.randn(n, generator=g)
    mod = torch.randn(batch, 3, n, generator=g) * 0.1
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
    out = torch.empty(batch, tokens, n)
    k.rms_norm(x, w, 1e-6, out)
    h = x.double()
    ref = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    k.layer_norm_modulate(x, None, None, 1e-6, shift, 1 + scale, out)
    ref = F.layer_norm(h, (n,), eps=1e-6) * (1 + scale.double()) + shift.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    residual = x.contiguous()
    expected = residual + gate * out
    k.gated_add_(residual, gate, out)
    assert torch.equal(residual, expected)
print("interpreted kernels OK")
"""


def test_kernels_in_the_interpreter():
    # A fresh interpreter: Triton's own jit helpers (tl.sum) must be created
    # with TRITON_INTERPRET set.  float32 only: the interpreter truncates to
    # 16-bit floats where GPUs round.
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted kernels OK" in done.stdout


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_kernels_match_the_upstream_chains_on_gpu(dtype, shape, monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.setenv(layer_ops.BACKEND_ENV, "triton")
    batch, tokens, n = shape
    x = rnd(batch, tokens, 3 * n, dtype=dtype, device="cuda")[..., n:2 * n]  # a strided slice, as q/k are
    weight = rnd(n, dtype=dtype, device="cuda", seed=1)
    shift, scale, gate = modulation(batch, n, dtype, device="cuda")

    # Only the order of a row's float32 sums (and rsqrt's last bits) differ:
    # one ulp of a 16-bit output, a few of a float32 one.
    ulps = 4 if dtype == torch.float32 else 1
    assert_within_ulps(layer_ops.rms_norm(x, weight, 1e-6), upstream_rms_norm(x, weight, 1e-6), ulps)
    # The LayerNorm's rounding error passes through the rounded multiply and add.
    mod = layer_ops.layer_norm_modulate(x, shift, 1 + scale, 1e-6)
    ref = upstream_modulate(x, shift, scale, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(mod, ref, rtol=1e-5, atol=1e-5)
    else:
        # Rounded three times to 16 bits: a float32 difference rarely shows.
        equal = float((mod == ref).float().mean())
        assert equal > 0.97, f"only {equal:.1%} of elements equal upstream's chain"
        torch.testing.assert_close(mod.double(), ref.double(), rtol=0, atol=float(4 * ulp(ref).max()))

    residual = x.contiguous()
    expected = residual + gate * mod
    layer_ops.gated_add_(residual, gate, mod)
    assert torch.equal(residual, expected)
