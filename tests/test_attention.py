"""The attention backend chooser (--attention, SCAIL_WIN_ATTENTION) and the single-process attention."""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scail_win.model.kernels import attention
from scail_win.errors import UserError


CACHES = (attention._kernels, attention._probes, attention._selected)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test starts with nothing imported, probed or chosen, and no environment override."""
    monkeypatch.delenv(attention.ENV, raising=False)
    saved = [dict(c) for c in CACHES]
    requested = list(attention._requested)
    for c in CACHES:
        c.clear()
    yield
    for c, old in zip(CACHES, saved):
        c.clear()
        c.update(old)
    attention._requested[:] = requested


def qkv(tokens=64, kv_tokens=None, heads=2, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_tokens = kv_tokens or tokens
    return tuple(torch.randn(2, heads, n, dim, generator=gen, dtype=dtype) for n in (tokens, kv_tokens, kv_tokens))


def fake_package(monkeypatch, module_name, attr, fn):
    module = types.ModuleType(module_name)
    setattr(module, attr, fn)
    monkeypatch.setitem(sys.modules, module_name, module)


def test_requested_backend_flag_env_and_errors(monkeypatch):
    assert attention.requested_backend(None) == "auto"
    assert attention.requested_backend("SDPA") == "sdpa"
    monkeypatch.setenv(attention.ENV, "flash")
    assert attention.requested_backend("auto") == "flash"  # the variable overrides the default
    assert attention.requested_backend("sdpa") == "sdpa"  # an explicit flag wins
    with pytest.raises(UserError, match="--attention 'fast' is not valid"):
        attention.requested_backend("fast")
    monkeypatch.setenv(attention.ENV, "xformers")
    with pytest.raises(UserError, match="SCAIL_WIN_ATTENTION='xformers' is not valid"):
        attention.requested_backend(None)


def test_auto_on_the_cpu_is_sdpa_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="scail_win.model.kernels.attention"):
        backend = attention.select_backend("auto", "cpu", torch.bfloat16)
        again = attention.select_backend("auto", "cpu", torch.bfloat16)
    assert backend is again and backend.name == "sdpa" and "cpu" in backend.reason
    assert [r.getMessage() for r in caplog.records].count(f"attention: sdpa ({backend.reason})") == 1


def test_single_process_attention_equals_sdpa_and_expands_kv_heads():
    q, k, v = qkv()
    attention.configure("sdpa")
    out = attention.single_process_attention(q, k, v, torch.ones(1, 1, 64, 64))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    k1, v1 = k[:, :1], v[:, :1]
    out = attention.single_process_attention(q, k1, v1, None)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k1.expand_as(q), v1.expand_as(q)))
    with pytest.raises(ValueError, match="partial attention mask"):
        attention.single_process_attention(q, k, v, torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("name,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_a_forced_missing_kernel_is_a_user_error_naming_the_flag(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ModuleNotFoundError
    with pytest.raises(UserError, match=rf"--attention {name}: {package} is not installed.*--attention auto"):
        attention.configure(name)
    if name == "sage":
        with pytest.raises(UserError, match="pip install triton-windows sageattention"):
            attention.configure(name)
    with pytest.raises(UserError, match=rf"--attention {name}: {package} needs a CUDA device, not cpu"):
        attention.select_backend(name, "cpu", torch.bfloat16)


def test_available_backends_reports_a_broken_install(monkeypatch):
    def broken(*a, **k):
        raise AssertionError("never called")

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    fake_package(monkeypatch, "sageattention", "sageattn", broken)
    found = attention.available_backends()
    assert found == {"sdpa": "available", "flash": "is not installed", "sage": "available"}


def exact_sageattn(q, k, v, tensor_layout, is_causal):
    """sageattn's signature and layouts, SDPA's math."""
    if tensor_layout == "NHD":
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def _gpu_tensors_as_cuda(monkeypatch):
    """Probe on the CPU as if it were CUDA: the chooser's GPU-only logic, with a fake kernel."""
    real = attention._probe

    def probe(name, device, dtype):
        return real(name, torch.device("cpu"), dtype)

    monkeypatch.setattr(attention, "_probe", probe)


def test_auto_prefers_a_working_sage_then_flash_and_skips_a_wrong_one(monkeypatch):
    _gpu_tensors_as_cuda(monkeypatch)
    calls = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        calls.append(tensor_layout)
        return torch.zeros_like(q)  # wrong: must fail the probe

    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal):
        # (batch, seq, heads, dim) in and out.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale)
        return out.transpose(1, 2)

    fake_package(monkeypatch, "sageattention", "sageattn", sageattn)
    fake_package(monkeypatch, "flash_attn", "flash_attn_func", flash_attn_func)
    backend = attention.select_backend("auto", "cuda:0", torch.bfloat16)
    assert backend.name == "flash"
    assert backend.reason == ("auto: sageattention is 1 off SDPA in its probe (relative; limit 0.05); "
                              "flash_attn works here")
    assert calls == ["NHD", "NHD"]  # self- and cross-attention shapes, the DiT's strides
    with pytest.raises(UserError, match="--attention sage: sageattention is 1 off SDPA in its probe"):
        attention.select_backend("sage", "cuda:0", torch.bfloat16)


def test_auto_falls_back_to_sdpa_when_a_kernel_raises(monkeypatch):
    _gpu_tensors_as_cuda(monkeypatch)

    def sageattn(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    fake_package(monkeypatch, "sageattention", "sageattn", sageattn)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    backend = attention.select_backend("auto", "cuda:0", torch.float16)
    assert backend.name == "sdpa"
    assert backend.reason == ("auto: sageattention failed its probe (RuntimeError: no kernel image is available "
                              "for execution on the device); flash_attn is not installed")


def test_fp32_never_runs_a_kernel(monkeypatch):
    assert attention.probe("sage", "cuda:0", torch.float32) == "needs float16 or bfloat16, not torch.float32"
    _gpu_tensors_as_cuda(monkeypatch)
    fake_package(monkeypatch, "sageattention", "sageattn", exact_sageattn)
    assert "needs float16 or bfloat16" in attention.select_backend("auto", "cuda:0", torch.float32).reason
    # Forced, it is probed in bf16 and used for what it can take.
    forced = attention.select_backend("sage", "cuda:0", torch.float32)
    assert forced.name == "sage" and forced.kernel is not None
    q, k, v = qkv()
    assert torch.equal(forced(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_a_chosen_kernel_hands_unsupported_calls_to_sdpa(caplog):
    seen = []

    def kernel(q, k, v):
        seen.append(q.shape)
        return torch.full_like(q, 7.0)

    backend = attention.Backend("sage", "test", kernel)
    q, k, v = qkv(dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="scail_win.model.kernels.attention"):
        assert torch.equal(backend(q, k, v), F.scaled_dot_product_attention(q, k, v))  # CPU tensors
        backend(q, k, v)
    assert not seen
    assert sum("sage cannot take a tensor on cpu" in r.getMessage() for r in caplog.records) == 1
    assert attention._unsupported("sage", *qkv(dim=96)).startswith("a tensor on")
    fake_cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 1, 1, 96), stride=lambda d: 1)
    assert attention._unsupported("sage", fake_cuda, fake_cuda, fake_cuda) == "head size 96"
    assert attention._unsupported("flash", fake_cuda, fake_cuda, fake_cuda) is None
    wide = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(1, 1, 1, 512), stride=lambda d: 1)
    assert attention._unsupported("flash", wide, wide, wide) == "head size 512"
    fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=(1, 1, 1, 128), stride=lambda d: 1)
    assert attention._unsupported("flash", fp32, fp32, fp32) == "dtype torch.float32"


def test_the_engine_reads_args_attention(monkeypatch):
    from scail_win.diffusion_video import SATVideoDiffusionEngine

    monkeypatch.setitem(sys.modules, "sageattention", None)
    args = types.SimpleNamespace(attention="sage", model_config={}, bf16=True)
    with pytest.raises(UserError, match="--attention sage: sageattention is not installed"):
        SATVideoDiffusionEngine(args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_this_gpu_matches_sdpa():
    backend = attention.select_backend("auto", "cuda", torch.bfloat16)
    q, k, v = (t.cuda() for t in qkv(tokens=1024, kv_tokens=512, heads=4, dim=128, dtype=torch.bfloat16))
    for layout in ("contiguous", "views of (batch, seq, heads, dim)"):
        if layout != "contiguous":
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        err = attention.relative_l2(backend(q, k, v), F.scaled_dot_product_attention(q, k, v))
        assert err <= attention.PROBE_TOLERANCE.get(backend.name, 0.0), (backend, layout, err)


def test_the_doctor_names_the_usable_kernels(monkeypatch):
    from scail_win.cli import doctor

    def sageattn(*a, **k):
        raise AssertionError("the doctor only imports")

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    fake_package(monkeypatch, "sageattention", "sageattn", sageattn)
    check = doctor.check_attention()
    assert check.status == "OK"
    assert check.detail == "--attention auto can use sdpa, sage (flash_attn is not installed)"
    assert any(c.name == "attention" for c in doctor.run_checks(output=str(Path.cwd())))


def test_sage_gets_contiguous_inputs_in_the_layout_that_needs_no_copy_of_q():
    seen = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        seen.append((tensor_layout, q.is_contiguous(), k.is_contiguous(), v.is_contiguous()))
        return exact_sageattn(q, k, v, tensor_layout, is_causal)

    call = attention._sage_call(sageattn)
    gen = torch.Generator().manual_seed(0)
    # As the DiT makes them: q from a (batch, seq, heads * dim) buffer, k and v
    # halves of one key/value projection (cross-attention).
    q = torch.randn(2, 64, 4 * 32, generator=gen).view(2, 64, 4, 32).permute(0, 2, 1, 3)
    k, v = torch.randn(2, 16, 2 * 4 * 32, generator=gen).chunk(2, dim=-1)
    k, v = (t.reshape(2, 16, 4, 32).permute(0, 2, 1, 3) for t in (k, v))
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(call(q, k, v), expected)
    torch.testing.assert_close(call(q.contiguous(), k, v), expected)
    assert seen == [("NHD", True, True, True), ("HND", True, True, True)]
