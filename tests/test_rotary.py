"""scail_win.rotary: sat's apply_rotary without Triton, and our Triton kernel.

The reference rotates pairs as complex numbers in float64, independently of
the implementation's real arithmetic.
"""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scail_win import rotary
from scail_win.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(x, cos, sin, position_ids, offsets, interleaved, conjugate):
    """float64 rotation by e^{i angle} of each channel pair; rows outside the table stay put.

    Returns the result and, per element, the size of the products it sums.
    """
    seqlen_ro, half = cos.shape
    rows = position_ids.long() + (offsets.long()[:, None] if torch.is_tensor(offsets) else offsets)
    valid = ((rows >= 0) & (rows < seqlen_ro))[:, None, :, None]
    rows = rows.clamp(0, seqlen_ro - 1)
    turn = torch.complex(cos.double()[rows], sin.double()[rows])[:, None]  # (b, 1, s, half)
    turn = torch.where(valid, turn, torch.ones_like(turn))
    if conjugate:
        turn = turn.conj()
    out = x.double().clone()
    first = torch.arange(0, 2 * half, 2) if interleaved else torch.arange(half)
    second = first + 1 if interleaved else first + half
    x0, x1 = out[..., first], out[..., second]
    z = torch.complex(x0, x1) * turn
    # Sizes of the products each output sums: the scale of float32 error.
    c, s = turn.real.abs(), turn.imag.abs()
    bound = torch.zeros_like(out)
    bound[..., first] = x0.abs() * c + x1.abs() * s
    bound[..., second] = x0.abs() * s + x1.abs() * c
    out[..., first], out[..., second] = z.real, z.imag
    return out, bound


def ulp(values: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of dtype at each value (float64)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(values, info.eps), exponent - 1)


def assert_rounded_once(out, ref, bound, dtype, rounding=0.5):
    """out is ref rounded once to dtype (within `rounding` ulp), up to float32 arithmetic error."""
    allowed = (0.0 if dtype == torch.float32 else rounding) * ulp(ref, dtype) + 2.0**-21 * bound + 1e-30
    err = (out.double() - ref).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, f"error {worst:.3f}x the one-rounding bound"


def make_case(dtype, *, batch=2, heads=3, seqlen=37, headdim=40, rotary_dim=24, seqlen_ro=50, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seqlen, headdim, generator=gen).to(device=device, dtype=dtype)
    angles = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen, dtype=torch.float64) * 20
    cos, sin = angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)
    # Includes rows past the table (left unrotated, as upstream's masked loads).
    position_ids = torch.randint(0, seqlen_ro + 6, (batch, seqlen), generator=gen).to(device)
    return x, cos, sin, position_ids


FLAGS = list(itertools.product((False, True), (False, True), (False, True), ("int", "tensor")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved,inplace,conjugate,offset_kind", FLAGS)
def test_torch_path_matches_reference(dtype, interleaved, inplace, conjugate, offset_kind, monkeypatch):
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")
    x, cos, sin, pos = make_case(dtype)
    offsets = 3 if offset_kind == "int" else torch.tensor([0, 5], dtype=torch.int32)
    ref, bound = reference(x, cos, sin, pos, offsets, interleaved, conjugate)
    original = x.clone()
    out = rotary.apply_rotary(x, cos, sin, pos, seqlen_offsets=offsets, max_seqlen=40,
                              interleaved=interleaved, inplace=inplace, conjugate=conjugate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rounded_once(out, ref, bound, dtype)
    assert torch.equal(out[..., 24:], original[..., 24:])
    if inplace:
        assert out.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, original)


def test_full_rotary_dim_strided_input_and_expanded_positions(monkeypatch):
    """SCAIL's layout: x is a (b, s, h, d) buffer seen as (b, h, s, d); positions broadcast over batch."""
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")
    x, cos, sin, pos = make_case(torch.bfloat16, batch=2, heads=4, seqlen=33, headdim=64, rotary_dim=64)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    pos = pos[:1].expand(2, -1)
    ref, bound = reference(x, cos, sin, pos, 0, True, False)
    out = rotary.apply_rotary(x, cos, sin, pos, max_seqlen=50, interleaved=True)
    assert out.stride() == x.stride()
    assert_rounded_once(out, ref, bound, torch.bfloat16)


def test_rotation_is_undone_by_conjugate(monkeypatch):
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")
    x, cos, sin, pos = make_case(torch.float32, rotary_dim=40)
    there = rotary.apply_rotary(x, cos, sin, pos, max_seqlen=50, interleaved=True)
    back = rotary.apply_rotary(there, cos, sin, pos, max_seqlen=50, interleaved=True, conjugate=True)
    assert (there - x).abs().max() > 0.1
    assert (back - x).abs().max() < 1e-5


def bad_calls():
    x, cos, sin, pos = make_case(torch.float32)
    ok = dict(max_seqlen=40)
    yield "3-D x", ValueError, (x[0], cos, sin, pos[0]), ok
    yield "cu_seqlens", ValueError, (x, cos, sin, pos), dict(ok, cu_seqlens=torch.tensor([0, 37, 74]))
    yield "positions shape", ValueError, (x, cos, sin, pos[:, :5]), ok
    yield "sin shape", ValueError, (x, cos, sin[:, :4], pos), ok
    yield "rotary_dim > headdim", ValueError, (x[..., :16], cos, sin, pos), ok
    yield "no max_seqlen", TypeError, (x, cos, sin, pos), {}
    yield "table too short", ValueError, (x, cos, sin, pos), dict(max_seqlen=51)
    yield "offset past table", ValueError, (x, cos, sin, pos), dict(max_seqlen=40, seqlen_offsets=11)
    yield "cos/sin dtypes", TypeError, (x, cos, sin.double(), pos), ok
    yield "x/cos dtypes", TypeError, (x.half(), cos, sin, pos), ok
    yield "float positions", TypeError, (x, cos, sin, pos.float()), ok
    yield "offsets shape", ValueError, (x, cos, sin, pos), dict(ok, seqlen_offsets=torch.zeros(3, dtype=torch.long))
    yield "float offsets", TypeError, (x, cos, sin, pos), dict(ok, seqlen_offsets=torch.zeros(2))


@pytest.mark.parametrize("name,error,args,kwargs", list(bad_calls()), ids=[c[0] for c in bad_calls()])
def test_bad_arguments(name, error, args, kwargs):
    with pytest.raises(error):
        rotary.apply_rotary(*args, **kwargs)


def test_backend_choice(monkeypatch):
    x = torch.zeros(1, 1, 4, 8)
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")
    assert rotary.select_backend(x, headdim=8) == "torch"
    monkeypatch.delenv(rotary.BACKEND_ENV)
    assert rotary.select_backend(x, headdim=8) == "torch"  # CPU tensor
    monkeypatch.setenv(rotary.BACKEND_ENV, "triton")
    with pytest.raises(UserError, match="SCAIL_WIN_ROTARY=triton"):
        rotary.select_backend(x, headdim=8)
    monkeypatch.setenv(rotary.BACKEND_ENV, "cuda")
    with pytest.raises(UserError, match="not valid"):
        rotary.select_backend(x, headdim=8)


@pytest.mark.slow
def test_imports_without_triton_and_serves_sat():
    """Loads where Triton is missing, without rotary_triton; sat's
    FastRotaryEmbedding imports apply_rotary from it and rotates q, k in place."""
    script = """
import importlib.util, sys
sys.modules["triton"] = None  # as on Windows: import triton raises ImportError
import torch, scail_win.rotary
assert "scail_win.model.kernels.rotary_triton" not in sys.modules
if importlib.util.find_spec("sat") is None:
    print("ok (no sat)")
    raise SystemExit
from scail_win import hook
hook.install()  # what scail_win.pth does: sat's triton_rotary is scail_win.rotary
from sat.model.position_embedding.triton_rotary_embeddings import FastRotaryEmbedding
rope = FastRotaryEmbedding(32, interleaved=True)
q, k = torch.randn(2, 4, 9, 32), torch.randn(2, 4, 9, 32)
q0, k0 = q.clone(), k.clone()
pos = torch.arange(9)[None]
rope(q, k, pos, max_seqlen=pos.max() + 1)
z = torch.view_as_complex(q0.unflatten(-1, (16, 2)).contiguous())
ang = torch.arange(9.0)[:, None] * rope.inv_freq[None]
expected = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
assert not torch.equal(k, k0)
assert sys.modules["sat.model.position_embedding.triton_rotary"] is scail_win.rotary
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(rotary.BACKEND_ENV, None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().startswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved,conjugate,offset_kind", [(True, False, "int"), (False, True, "tensor")])
def test_triton_kernel_in_interpreter(dtype, interleaved, conjugate, offset_kind, rotary_triton_interpreted):
    x, cos, sin, pos = make_case(dtype, seqlen=21, headdim=40, rotary_dim=36)
    offsets = 2 if offset_kind == "int" else torch.tensor([1, 4])
    ref, bound = reference(x, cos, sin, pos, offsets, interleaved, conjugate)
    out = torch.empty_like(x)
    out[..., 36:] = x[..., 36:]
    rotary_triton_interpreted.rotary(x, out, cos, sin, pos, offsets, interleaved=interleaved, conjugate=conjugate,
                                     config=(8, 2, 4))
    # The interpreter truncates float32 -> bfloat16 where GPUs round to nearest.
    assert_rounded_once(out, ref, bound, dtype, rounding=1.0 if dtype == torch.bfloat16 else 0.5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved,inplace,conjugate,offset_kind", FLAGS)
def test_triton_path_on_gpu(dtype, interleaved, inplace, conjugate, offset_kind, monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    x, cos, sin, pos = make_case(dtype, seqlen=301, headdim=128, rotary_dim=96, device="cuda")
    offsets = 3 if offset_kind == "int" else torch.tensor([0, 5], device="cuda")
    ref, bound = reference(x.cpu(), cos.cpu(), sin.cpu(), pos.cpu(), offsets if offset_kind == "int" else offsets.cpu(),
                           interleaved, conjugate)
    monkeypatch.setenv(rotary.BACKEND_ENV, "torch")
    by_torch = rotary.apply_rotary(x.clone(), cos, sin, pos, offsets, max_seqlen=40, interleaved=interleaved,
                                   inplace=inplace, conjugate=conjugate)
    monkeypatch.setenv(rotary.BACKEND_ENV, "triton")
    src = x.clone()
    by_triton = rotary.apply_rotary(src, cos, sin, pos, offsets, max_seqlen=40, interleaved=interleaved,
                                    inplace=inplace, conjugate=conjugate)
    assert (by_triton.data_ptr() == src.data_ptr()) == inplace
    assert_rounded_once(by_triton.cpu(), ref, bound, dtype)
    assert_rounded_once(by_torch.cpu(), ref, bound, dtype)
    assert torch.equal(by_triton[..., 96:], x[..., 96:])


@pytest.mark.gpu
@cuda
def test_auto_picks_triton_on_gpu(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.delenv(rotary.BACKEND_ENV, raising=False)
    x = torch.zeros(1, 2, 8, 128, device="cuda", dtype=torch.bfloat16)
    assert rotary.select_backend(x, headdim=128) == "triton"
    assert rotary.select_backend(x, headdim=512) == "torch"
    assert rotary.select_backend(x.double(), headdim=128) == "torch"
