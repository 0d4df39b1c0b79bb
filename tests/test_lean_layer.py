"""Lean layers on a tiny DiT built from SCAIL's own classes, against upstream's layer.

The DiT is SCAIL's ``DiffusionTransformer`` with its AdaLN, patch-embedding
and final-layer mixins, as ``scail_win.diffusion_video.build_dit`` builds it
(fused RoPE, single-process attention), at hidden size 128 and 228 tokens
per sample.  Reference: the same model without lean layers.
"""
import argparse
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scail_win.placement.lean_layer import install_lean_layers, lean_activation_widths

MODEL_YAML = "configs/video_model/Wan2.1-i2v-14Bsc-pose-xc-latent.yaml"
TINY = dict(num_layers=2, hidden_size=128, time_embed_dim=128, inner_hidden_size=256, num_attention_heads=2,
            text_dim=64, num_frames=9, latent_height=16, latent_width=16,
            modules={"pos_embed_config": {"params": {"hidden_size_head": 64}},
                     "adaln_layer_config": {"params": {"hidden_size_head": 128}}})
# Latent 3 frames of 16 x 12: 48 reference + 144 video + 36 pose tokens.
LATENT = dict(frames=3, height=16, width=12)
TOKENS = 228
HIDDEN, FFN = 128, 256
# Chunk sizes for the bitwise tests (None: one chunk).  The CPU's matrix
# multiplies (also inside its SDPA, which takes queries 32 or 64 at a time)
# round a row the same way whatever the row count, from 8 rows up; these
# leave no product with fewer rows (chunks are near-equal: 228 = 3 x 76 for
# 100, 45 and 46 for 48).
CHUNKS = (None, 100, 48)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SCAIL_PACKAGES = ("sat", "sgm", "dit_video_crossattn_sc_xc")


def _scail_module_names():
    return [name for name in sys.modules if name.split(".")[0] in _SCAIL_PACKAGES]


@pytest.fixture(scope="module")
def scail():
    """SCAIL's vendored sat and sgm imported for this module, whatever ``sat`` was before.

    PyPI's SwissArmyTransformer (what ``import sat`` finds first here) lacks
    the sequence-parallel API SCAIL's sgm imports; the DiT needs the tree's
    copy.  Modules imported before are put back afterwards.
    """
    from scail_win import arguments, hook
    from scail_win.model.kernels import rope3d

    root = os.environ.get("SCAIL_ROOT")
    if not root or not (Path(root) / MODEL_YAML).is_file():
        pytest.skip("needs a SCAIL checkout named by SCAIL_ROOT")
    saved = {name: sys.modules.pop(name) for name in _scail_module_names()}
    sys.path.insert(0, root)
    rope3d._mixin_class.cache_clear()  # it subclasses whichever sat's BaseMixin
    hooked = any(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path)
    hook.install()
    started = not torch.distributed.is_initialized()
    try:
        arguments.initialize_distributed(argparse.Namespace(
            device="cpu", world_size=1, rank=0, model_parallel_size=1, sequence_parallel_size=1,
            num_multi_query_heads=0, distributed_backend="gloo", deepspeed=False))
        yield Path(root)
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not hooked:
            hook.uninstall()
        for name in _scail_module_names():
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(root)
        rope3d._mixin_class.cache_clear()


def make_dit(root, dtype="fp32", rope_mode="exact", seed=0, **overrides):
    """The tiny DiT with random weights (norm weights near 1)."""
    from omegaconf import OmegaConf

    from scail_win.diffusion_video import build_dit

    net = OmegaConf.load(root / MODEL_YAML).model.network_config
    net.params = OmegaConf.merge(net.params, TINY, overrides)
    dit = build_dit(net, dtype_str=dtype, use_i2v_clip=net.params.get("use_i2v_clip", True), rope_mode=rope_mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            value = torch.randn(p.shape, generator=g) * 0.1
            if "norm" in name and name.endswith("weight"):
                value += 1.0
            p.copy_(value)
    return dit.eval()


def make_inputs(dtype, batch=1, seed=1, frames=LATENT["frames"], height=LATENT["height"], width=LATENT["width"]):
    g = torch.Generator().manual_seed(seed)
    t, h, w = frames, height, width

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DTYPES[dtype])

    return dict(x=rnd(batch, t, 16, h, w), timesteps=torch.rand(batch, generator=g) * 900,
                context=rnd(batch, 11, 64), concat_images=rnd(batch, t, 16, h, w),
                ref_concat=rnd(batch, 1, 16, h, w), concat_smpl_render=rnd(batch, t, 16, h // 2, w // 2),
                image_clip_features=rnd(batch, 7, 1280))


def spy_on_lean_path(handle):
    """A list that gets one entry per layer call that took the lean path."""
    calls = []
    tail = handle._tail
    handle._tail = lambda *args, **kwargs: calls.append(1) or tail(*args, **kwargs)
    return calls


def run(dit, inputs, chunk=False):
    """The DiT's output; with lean layers of ``chunk`` tokens unless chunk is False."""
    if chunk is False:
        with torch.no_grad():
            return dit(**inputs)
    handle = install_lean_layers(dit, chunk)
    calls = spy_on_lean_path(handle)
    try:
        with torch.no_grad():
            out = dit(**inputs)
    finally:
        handle.remove()
    assert len(calls) == dit.num_layers, "a layer fell back to upstream's forward"
    return out


@pytest.fixture(scope="module")
def fp32_dit(scail):
    return make_dit(scail)


# ------------------------------------------------------------------ same output


@pytest.mark.scail
@pytest.mark.parametrize("batch", (1, 2))
def test_fp32_output_is_bitwise_upstreams(fp32_dit, batch):
    inputs = make_inputs("fp32", batch)
    reference = run(fp32_dit, inputs)
    for chunk in CHUNKS:
        assert torch.equal(run(fp32_dit, inputs, chunk), reference), f"chunk {chunk}"


@pytest.mark.scail
def test_fp32_rope_mode_is_bitwise_upstreams(scail):
    dit = make_dit(scail, rope_mode="fp32")
    inputs = make_inputs("fp32", 2)
    reference = run(dit, inputs)
    for chunk in (None, 64):
        assert torch.equal(run(dit, inputs, chunk), reference), f"chunk {chunk}"


@pytest.mark.scail
def test_bf16_output_is_bitwise_upstreams(scail):
    # sat's LayerNorm runs bf16 on the CPU only with affine weights.
    dit = make_dit(scail, "bf16", elementwise_affine=True)
    inputs = make_inputs("bf16", 2)
    reference = run(dit, inputs)
    assert reference.dtype == torch.bfloat16
    for chunk in CHUNKS:
        assert torch.equal(run(dit, inputs, chunk), reference), f"chunk {chunk}"


class ReferenceKernels:
    """layer_ops' kernel module, computed by its PyTorch references; counts the calls."""

    def __init__(self):
        from scail_win.model.kernels import layer_ops

        self.ops = layer_ops
        self.calls = {"rms_norm": 0, "layer_norm_modulate": 0, "gated_add_": 0}

    def _reference(self, fn, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(self.ops, "select_backend", lambda x: "torch")
            return fn(*args, **kwargs)

    def rms_norm(self, x, weight, eps, out):
        self.calls["rms_norm"] += 1
        self._reference(self.ops.rms_norm, x, weight, eps, out=out)

    def layer_norm_modulate(self, x, weight, bias, eps, shift, one_plus_scale, out):
        self.calls["layer_norm_modulate"] += 1
        out.copy_(self._reference(self.ops.layer_norm_modulate, x, shift, one_plus_scale, eps, weight, bias))

    def gated_add_(self, residual, gate, update):
        self.calls["gated_add_"] += 1
        self._reference(self.ops.gated_add_, residual, gate, update)


@pytest.mark.scail
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_fused_layer_ops_path_equals_the_module_path(scail, dtype, monkeypatch):
    # Where Triton runs (CUDA), lean layers hand the qk norms, LayerNorm +
    # modulate and gated adds to scail_win.model.kernels.layer_ops: the same math, fewer
    # passes.  Here the kernels are the PyTorch references, so the outputs
    # must be equal, and every such op of every layer must go through them.
    from scail_win.model.kernels import layer_ops

    # sat's LayerNorm on the CPU in bf16 ignores its eps (takes
    # F.layer_norm's 1e-5); on CUDA, where the fused path runs, it uses it.
    dit = make_dit(scail, dtype, elementwise_affine=True, layernorm_epsilon=1e-5)
    inputs = make_inputs(dtype, 2)
    reference = run(dit, inputs, 100)
    kernels = ReferenceKernels()
    monkeypatch.setattr(layer_ops, "select_backend", lambda x: "triton")
    monkeypatch.setattr(layer_ops.BACKEND, "kernels", lambda: kernels)
    out = run(dit, inputs, 100)
    assert torch.equal(out, reference)
    chunks, layers = 3, dit.num_layers  # 228 tokens in chunks of at most 100
    # q and k norms per chunk plus the cross-attention query's; two
    # modulated norms and two gated adds per chunk.
    assert kernels.calls == {"rms_norm": 3 * chunks * layers, "layer_norm_modulate": 2 * chunks * layers,
                             "gated_add_": 2 * chunks * layers}


# Row-independent stand-ins for the two matrix-multiplying ops: float64
# products summed per output element, rounded once, so a row's result no
# longer depends on how many rows share the call.


def _linear(x, weight, bias=None):
    out = (x.double().unsqueeze(-2) * weight.double()).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, **kwargs):
    if attn_mask is not None or dropout_p or kwargs.get("is_causal"):
        raise NotImplementedError("plain attention only")
    scores = (query.double().unsqueeze(-2) * key.double().unsqueeze(-3)).sum(-1) / query.shape[-1] ** 0.5
    weights = scores.softmax(-1)
    return (weights.unsqueeze(-1) * value.double().unsqueeze(-3)).sum(-2).to(query.dtype)


@pytest.mark.scail
def test_single_token_chunks_differ_only_by_matmul_row_count(fp32_dit, monkeypatch):
    inputs = make_inputs("fp32", frames=1)  # 108 tokens
    reference = run(fp32_dit, inputs)
    single = run(fp32_dit, inputs, 1)
    # One-row products may take other CPU kernels than many-row ones: a few
    # units in the last place at most ...
    torch.testing.assert_close(single, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    # ... and none once the products do not depend on the row count.
    monkeypatch.setattr(F, "linear", _linear)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _sdpa)
    reference = run(fp32_dit, inputs)
    assert torch.equal(run(fp32_dit, inputs, 1), reference)


@pytest.mark.scail
@pytest.mark.parametrize("variant", ["share_adaln=False", "qk_ln=False", "use_i2v_clip=False", "sandwich"])
def test_other_layer_variants(scail, variant):
    overrides = {"share_adaln=False": dict(share_adaln=False),
                 "qk_ln=False": {"modules": {"adaln_layer_config": {"params": {"qk_ln": False}}}},
                 "use_i2v_clip=False": dict(use_i2v_clip=False),
                 "sandwich": {"transformer_args": {"layernorm_order": "sandwich"}}}[variant]
    dit = make_dit(scail, **overrides)
    # Upstream's final layer broadcasts share_adaln=False's modulation over
    # the batch only for batch 1.
    inputs = make_inputs("fp32", 1 if variant == "share_adaln=False" else 2)
    if variant == "use_i2v_clip=False":
        del inputs["image_clip_features"]
    reference = run(dit, inputs)
    assert torch.equal(run(dit, inputs, 64), reference)


@pytest.mark.scail
def test_composes_with_block_swap(fp32_dit):
    from scail_win.placement import offload

    inputs = make_inputs("fp32", 2)
    reference = run(fp32_dit, inputs)
    original = fp32_dit.hooks["layer_forward"]
    handle = install_lean_layers(fp32_dit, 64)
    swap = offload.BlockSwap(fp32_dit, offload.scail_layer_groups(fp32_dit), "cpu", resident_groups=0,
                             mode="stream", prefetch=1)
    calls = spy_on_lean_path(handle)
    with swap:
        with torch.no_grad():
            out = fp32_dit(**inputs)
        assert swap.stats.misses + swap.stats.hits == fp32_dit.num_layers
        # Under the swap: the registry re-wraps the swap around upstream's layer.
        handle.remove()
        assert fp32_dit.hooks["layer_forward"] is not original
        with torch.no_grad():
            assert torch.equal(fp32_dit(**inputs), reference)
    assert calls == [1, 1] and torch.equal(out, reference)
    assert fp32_dit.hooks["layer_forward"] is original


@pytest.mark.scail
def test_install_under_an_attached_swap(fp32_dit):
    from scail_win.placement import offload
    from scail_win.placement.registry import HookRegistry

    inputs = make_inputs("fp32", 1)
    reference = run(fp32_dit, inputs)
    original = fp32_dit.hooks["layer_forward"]
    with offload.BlockSwap(fp32_dit, offload.scail_layer_groups(fp32_dit), "cpu", resident_groups=0):
        handle = install_lean_layers(fp32_dit, 64)
        calls = spy_on_lean_path(handle)
        assert HookRegistry.of(fp32_dit).names() == ["lean_layers", "block_swap"]
        with torch.no_grad():
            assert torch.equal(fp32_dit(**inputs), reference)
        assert len(calls) == fp32_dit.num_layers
    assert HookRegistry.of(fp32_dit).names() == ["lean_layers"]
    handle.remove()
    assert fp32_dit.hooks["layer_forward"] is original


@pytest.mark.scail
def test_install_and_remove_restore_hooks_and_rope(fp32_dit):
    rope = fp32_dit.mixins["pos_embed"]
    original = fp32_dit.hooks["layer_forward"]
    assert rope.rope_inplace is False
    handle = install_lean_layers(fp32_dit, 64)
    assert fp32_dit.hooks["layer_forward"] is handle and rope.rope_inplace is True
    with pytest.raises(ValueError, match="'lean_layers' is already on"):
        install_lean_layers(fp32_dit, 64)
    handle.chunk_tokens = 32
    assert handle.chunk_tokens == 32
    with pytest.raises(ValueError, match="chunk_tokens"):
        handle.chunk_tokens = 0
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert fp32_dit.hooks["layer_forward"] is original and rope.rope_inplace is False


@pytest.mark.scail
def test_autograd_runs_upstreams_layer(fp32_dit):
    inputs = make_inputs("fp32")
    reference = run(fp32_dit, inputs)
    handle = install_lean_layers(fp32_dit, 64)
    handle._self_attention = None  # the lean path would fail
    try:
        out = fp32_dit(**inputs)  # grad enabled, parameters require grad
    finally:
        handle.remove()
    assert out.requires_grad and torch.equal(out.detach(), reference)


@pytest.mark.scail
@pytest.mark.parametrize("chunk", (0, -5, 2.5, True, "64"))
def test_bad_chunk_sizes(fp32_dit, chunk):
    with pytest.raises(ValueError, match="chunk_tokens"):
        install_lean_layers(fp32_dit, chunk)
    with pytest.raises(ValueError, match="chunk_tokens"):
        lean_activation_widths(chunk, TOKENS, HIDDEN, FFN, 1)


@pytest.mark.scail
def test_unsupported_models_are_refused(fp32_dit, monkeypatch):
    with pytest.raises(ValueError, match="not a sat model"):
        install_lean_layers(torch.nn.Linear(2, 2), 64)
    monkeypatch.setattr(fp32_dit.transformer, "is_decoder", False)
    with pytest.raises(ValueError, match="is_decoder"):
        install_lean_layers(fp32_dit, 64)
    monkeypatch.undo()
    monkeypatch.setitem(fp32_dit.hooks, "cross_attention_forward", lambda *a, **k: None)
    with pytest.raises(ValueError, match="cross_attention_forward"):
        install_lean_layers(fp32_dit, 64)
    monkeypatch.undo()
    monkeypatch.setattr(fp32_dit.mixins["adaln_layer"], "num_multi_query_heads", 8)
    with pytest.raises(ValueError, match="multi-query"):
        install_lean_layers(fp32_dit, 64)


# ------------------------------------------------------------------ memory


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created while active and still alive (CPU).

    An op output whose storage is not one of its inputs' was allocated by
    the op; it counts until its storage is freed.  Views and in-place
    results share an input's storage and count nothing.  ``peak`` is the
    most seen since ``base`` was last set.
    """

    def __init__(self):
        super().__init__()
        self.live = {}
        self.now = self.base = self.peak = 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def layer_activation_widths(dit, inputs, chunk, monkeypatch):
    """Largest activation of one layer call in a forward, in fp32 widths (tokens x hidden).

    Counts the layer's input (the residual stream) and what the layer
    allocates while it runs; chunk False measures upstream's layer.
    """
    from scail_win import rotary

    # Bound the PyTorch RoPE path's temporaries as on a full-size model
    # (there they are 64 MiB against 0.5 GiB widths; Triton has none).
    monkeypatch.setattr(rotary, "TORCH_CHUNK_ELEMENTS", 4096)
    handle = install_lean_layers(dit, chunk) if chunk is not False else None
    layer_forward = dit.hooks["layer_forward"]
    peaks = []

    def measured(hidden_states, mask, *args, **kwargs):
        tracker.base = tracker.peak = tracker.now
        out = layer_forward(hidden_states, mask, *args, **kwargs)
        peaks.append(tracker.peak - tracker.base + hidden_states.untyped_storage().nbytes())
        return out

    try:
        with torch.no_grad():
            dit(**inputs)  # RoPE tables are built and cached on the first call
            with monkeypatch.context() as patch, LiveBytes() as tracker:
                patch.setitem(dit.hooks, "layer_forward", measured)
                dit(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    assert len(peaks) == dit.num_layers
    return max(peaks) / (TOKENS * HIDDEN * 4)


@pytest.mark.scail
@pytest.mark.parametrize("batch", (1, 2))
def test_activation_peak_stays_within_the_estimate(fp32_dit, batch, monkeypatch):
    inputs = make_inputs("fp32", batch)
    upstream = layer_activation_widths(fp32_dit, inputs, False, monkeypatch)
    # What the estimate leaves to fixed costs: the text (11) and CLIP (7)
    # key/value projections and normed keys, and attention's log-sum-exp.
    fixed = batch * (3 * (11 + 7) / TOKENS + 2 / HIDDEN)
    for chunk in (None, 64, 16) if batch == 1 else (16,):
        lean = layer_activation_widths(fp32_dit, inputs, chunk, monkeypatch)
        estimate = lean_activation_widths(chunk, TOKENS, HIDDEN, FFN, batch)
        assert lean <= estimate + fixed, f"chunk {chunk}: {lean:.2f} widths, estimated {estimate:.2f}"
    # Small chunks: the residual, q/k/v and the attention output; upstream
    # holds more than twice that.
    assert lean <= batch * 5 + fixed < upstream / 2


@pytest.mark.gpu
@pytest.mark.scail
@pytest.mark.parametrize("batch", (1, 2))
def test_cuda_bf16_matches_and_stays_within_the_estimate(scail, batch, monkeypatch):
    # 3 latent frames of 64 x 48: 3,648 tokens, so that widths (0.9 MB a
    # sample) dwarf the allocator's rounding and the 18 text/CLIP tokens.
    dev = torch.device("cuda")
    dit = make_dit(scail, "bf16", latent_height=64, latent_width=64).to(dev)
    inputs = {k: v.to(dev) for k, v in make_inputs("bf16", batch, height=64, width=48).items()}
    tokens = 768 + 3 * 768 + 3 * 192

    def run_measured(chunk):
        """Output and the largest layer activation (input included), in bf16 widths."""
        handle = install_lean_layers(dit, chunk) if chunk is not False else None
        layer_forward = dit.hooks["layer_forward"]
        peaks = []

        def measured(hidden_states, mask, *args, **kwargs):
            base = torch.cuda.memory_allocated() - hidden_states.untyped_storage().nbytes()
            torch.cuda.reset_peak_memory_stats()
            out = layer_forward(hidden_states, mask, *args, **kwargs)
            peaks.append(torch.cuda.max_memory_allocated() - base)
            return out

        try:
            with torch.no_grad():
                dit(**inputs)  # RoPE tables, kernels
                with monkeypatch.context() as patch:
                    patch.setitem(dit.hooks, "layer_forward", measured)
                    out = dit(**inputs)
        finally:
            if handle is not None:
                handle.remove()
        return out, max(peaks) / (batch * tokens * HIDDEN * 2)

    reference, upstream = run_measured(False)
    for chunk in (None, 512):
        out, lean = run_measured(chunk)
        # cuBLAS picks kernels by row count: bf16 rounding differences only.
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max()))
        # Text/CLIP keys and values and attention's log-sum-exp: < 0.1 width.
        assert lean <= lean_activation_widths(chunk, tokens, HIDDEN, FFN, batch) + 0.1 * batch, chunk
    assert lean < 0.6 * upstream


def test_estimate_formula():
    # 512x896x81 on the 14B DiT, 4096-token chunks: attention's 5 widths dominate.
    assert lean_activation_widths(4096, 48832, 5120, 13824, 1) == 5.0
    assert lean_activation_widths(4096, 48832, 5120, 13824, 2) == 10.0
    f = 16384 / 48832
    assert lean_activation_widths(16384, 48832, 5120, 13824, 1) == pytest.approx(4 + 7 * f)
    assert lean_activation_widths(None, 48832, 5120, 13824, 1) == 11.0  # the unchunked projection
    assert lean_activation_widths(None, 100, 64, 512, 1) == 2 + 1 + 2 * 8  # an FFN 8x wide dominates
    assert lean_activation_widths(10**6, 100, 64, 256, 1) == lean_activation_widths(None, 100, 64, 256, 1)
    with pytest.raises(ValueError, match="tokens"):
        lean_activation_widths(64, 0, 64, 256, 1)


def test_importing_the_module_does_not_import_torch():
    # memory.py's planner imports the estimate on --help paths.
    code = "import sys, scail_win.placement.lean_layer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "SCAIL_WIN_DISABLE": "1"})
    assert result.stdout.strip() == "False"
