"""A memory-lean layer forward for SCAIL's DiT, with upstream's math.

Upstream's ``AdaLNMixin.layer_forward`` (with its ``attention_forward`` and
``cross_attention_forward``) runs every stage on all tokens at once, and each
stage leaves new full-size tensors behind: the normalised and modulated
input, the (tokens x 3 hidden) qkv projection, the q/k RMSNorms' float32
copies (the qk-norm spans the whole hidden size and upcasts to float32: one
float32 tokens x 5120 tensor is the 954 MiB allocation seen failing), the
rotated q and k, the attention output and its projection, three new residual
streams, and the FFN's (tokens x ffn) inner activation.  The residual stream
itself stays in the model dtype (bf16): the modulation, the embeddings and
every projection are bf16.

:func:`install_lean_layers` replaces that hook with :class:`LeanLayers`,
which computes the same operations, in the same order and dtypes for every
token, but a chunk of tokens at a time wherever the work is per token:

1. for each chunk: input LayerNorm, modulate, qkv projection, q/k RMSNorm;
   q, k, v are written into three preallocated (batch, tokens, hidden)
   buffers;
2. RoPE on the whole q and k, in place (scail-win's fused RoPE mixin is told
   to rotate in place while lean layers are installed);
3. attention over the whole sequence through the model's ``attention_fn``
   hook (the ``--attention`` kernel, :mod:`scail_win.model.kernels.attention`; none keeps
   tokens x tokens temporaries); q, k, v are freed;
4. for each chunk: output projection and gated residual add, cross-attention
   (text and CLIP keys/values are projected once per layer; only the
   queries are chunked) and its residual add, modulated FFN and its gated
   residual add -- all added in place into the residual stream.

Every per-token operation is the module upstream calls (the layer's own
LayerNorms, RMSNorms, linears and MLP), so per token the result is what
upstream computes.  On CUDA with Triton, the qk RMSNorms, the LayerNorm +
modulate pairs and the gated residual adds run as :mod:`scail_win.model.kernels.layer_ops`'
fused kernels instead, which round where upstream's ops round (their float32
sums over a row are ordered differently: last-bit differences).  Bitwise
equality holds where the kernels are row-independent; a matrix multiply may
round a row differently when it has a different number of rows (BLAS/cuBLAS
pick kernels by shape), which gives last-bit differences (see the tests).

The residual stream is updated in place: the layer's input tensor holds the
layer's output afterwards (sat's transformer never reads a layer's input
again; ``output_hidden_states`` would see every layer's entry alias the
same tensor).  Inference only: with autograd recording, under autocast, or
when the modulation's dtype differs from the residual stream's (upstream
would then promote the residual), the call goes to upstream's layer.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from .registry import LAYER_FORWARD, HookRegistry

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# Widths (one tokens x hidden tensor of the activation dtype, per sample) at
# each stage's peak, read off the code below for a bf16 model on CUDA; see
# lean_activation_widths.
_RESIDUAL = 1.0  # the residual stream, updated in place
_QKV = 3.0  # q, k and v buffers
_ATTN_OUT = 1.0  # attention output (batch, heads, tokens, head_dim)
# Projection chunk: the qkv projection (3) beside the q or k RMSNorm's two
# live float32 temporaries (2 x 2).
_PROJECT_CHUNK = 3.0 + 2 * 2.0
# After attention, per chunk: the cross-attention query (1) beside its
# RMSNorm's float32 temporaries (2 x 2), or the modulated FFN input (1)
# beside the FFN's inner activation and its GELU (2 x ffn/hidden).
_CROSS_CHUNK = 1.0 + 2 * 2.0
_FFN_CHUNK_FIXED = 1.0
_FFN_CHUNK_PER_FFN = 2.0


def lean_activation_widths(chunk_tokens: Optional[int], tokens: int, hidden: int, ffn: int, batch: int) -> float:
    """Peak activation of one lean layer call, in widths of all ``batch`` samples.

    A width is one (tokens x hidden) tensor of the activation dtype (bf16:
    ``tokens * hidden * 2`` bytes) for one sample; the result counts every
    sample of the batch.  With ``f = min(1, chunk_tokens / tokens)`` (1 when
    ``chunk_tokens`` is None) and ``F = ffn / hidden``::

        batch * max(1 + 3 + 7 f,                # projection loop: residual, q/k/v, chunk
                    1 + 3 + 1,                  # attention: residual, q/k/v, output
                    1 + 1 + max(5, 1 + 2 F) f)  # tail loop: residual, attention output, chunk

    (7 f and 5 f are bf16 models' qk RMSNorms, whose float32 temporaries
    count two widths each.)  RoPE runs in place: no memory with the Triton
    kernel, a fixed 64 MiB or so on the PyTorch path (scail_win.rotary's
    TORCH_CHUNK_ELEMENTS).  Left to the planner's fixed costs as well: the
    text/CLIP keys and values (769 tokens) and attention's log-sum-exp
    (batch x heads x tokens float32).
    """
    for name, value in (("tokens", tokens), ("hidden", hidden), ("ffn", ffn), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_chunk(chunk_tokens)
    f = 1.0 if chunk_tokens is None else min(1.0, chunk_tokens / tokens)
    project = _RESIDUAL + _QKV + _PROJECT_CHUNK * f
    attend = _RESIDUAL + _QKV + _ATTN_OUT
    tail = _RESIDUAL + _ATTN_OUT + max(_CROSS_CHUNK, _FFN_CHUNK_FIXED + _FFN_CHUNK_PER_FFN * ffn / hidden) * f
    return batch * max(project, attend, tail)


def _check_chunk(chunk_tokens) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _spans(tokens: int, chunk_tokens: Optional[int]):
    """(start, stop) of near-equal chunks of at most ``chunk_tokens`` tokens.

    Equal sizes rather than a short last chunk: a matrix multiply over a
    handful of rows takes other kernels (and rounds differently) than one
    over many.
    """
    count = 1 if chunk_tokens is None else -(-tokens // chunk_tokens)
    bounds = [tokens * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _autocast_on(device_type: str) -> bool:
    import torch

    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _modulate(x, shift, one_plus_scale):
    # Upstream's modulate: x * (1 + scale) + shift, with 1 + scale made once.
    return x * one_plus_scale + shift


def _fusable_rms_norm(norm) -> bool:
    """SCAIL's qk RMSNorm (float32 math, optional weight), which layer_ops.rms_norm computes."""
    forward = getattr(type(norm), "forward", None)
    if getattr(forward, "__qualname__", None) != "RMSNorm.forward":
        return False
    if not isinstance(getattr(norm, "variance_epsilon", None), float):
        return False
    if not getattr(norm, "elementwise_affine", False):
        return True
    weight = getattr(norm, "weight", None)
    return weight is not None and weight.dim() == 1


def _fusable_layer_norm(norm) -> bool:
    """A plain last-dim LayerNorm (torch's, or sat's subclass without pb_relax)."""
    import torch

    return (isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1
            and not getattr(norm, "pb_relax", False))


def _norm_modulate(norm, rows, shift, one_plus_scale, fused):
    """``norm(rows) * one_plus_scale + shift``, in one kernel where layer_ops can."""
    if fused and _fusable_layer_norm(norm):
        from scail_win.model.kernels import layer_ops

        return layer_ops.layer_norm_modulate(rows, shift, one_plus_scale, norm.eps, norm.weight, norm.bias)
    return _modulate(norm(rows), shift, one_plus_scale)


def _rms_norm(norm, x, fused, out=None):
    """``norm(x)``, written into ``out`` when given; one kernel where layer_ops can."""
    if fused and _fusable_rms_norm(norm):
        from scail_win.model.kernels import layer_ops

        weight = norm.weight if norm.elementwise_affine else None
        return layer_ops.rms_norm(x, weight, norm.variance_epsilon, out=out)
    y = norm(x)
    if out is None:
        return y
    return out.copy_(y)


def _gated_add_(rows, gate, update, fused):
    if fused:
        from scail_win.model.kernels import layer_ops

        layer_ops.gated_add_(rows, gate, update)
    else:
        rows += gate * update


def _find_adaln_mixin(dit):
    """The mixin whose bound ``layer_forward`` is the model's own hook (under any others), or ValueError."""
    hooks = getattr(dit, "hooks", None)
    mixins = getattr(dit, "mixins", None)
    if not isinstance(hooks, dict) or mixins is None or not hasattr(dit, "transformer"):
        raise ValueError(f"{type(dit).__name__} is not a sat model (no hooks/mixins/transformer)")
    hook = HookRegistry.of(dit).original(LAYER_FORWARD)
    owner = getattr(hook, "__self__", None)
    if owner is None or getattr(hook, "__name__", None) != "layer_forward" or not hasattr(owner, "adaLN_modulations"):
        raise ValueError(f"lean layers replace the AdaLN mixin's layer_forward hook, but the model's hook is {hook!r}")
    if not any(m is owner for m in mixins.values()):
        raise ValueError("the layer_forward hook belongs to a mixin this model does not hold")
    return owner


def _check_config(dit, mixin) -> None:
    """ValueError for the layer variants this forward does not reproduce."""
    hooks = dit.hooks
    for name in ("attention_forward", "cross_attention_forward"):
        hook = hooks.get(name)
        if getattr(hook, "__self__", None) is not mixin or getattr(hook, "__name__", None) != name:
            raise ValueError(f"lean layers reproduce the AdaLN mixin's {name}, but the model's hook is {hook!r}")
    transformer = dit.transformer
    problems = []
    if not getattr(transformer, "is_decoder", False):
        problems.append("is_decoder is False (upstream's AdaLN layer needs cross-attention)")
    if getattr(transformer, "is_rotary_emb", False):
        problems.append("is_rotary_emb is True (sat's 1D rotary in attention_forward)")
    if getattr(mixin, "num_multi_query_heads", 0) or getattr(mixin, "cross_num_multi_query_heads", 0):
        problems.append("multi-query attention")
    layers = getattr(transformer, "layers", None)
    if not layers:
        problems.append("no transformer layers")
    else:
        attention = layers[0].attention
        if attention.stride != 3:
            problems.append(f"qkv stride {attention.stride!r} (expected 3)")
        if not getattr(layers[0], "is_decoder", True):
            problems.append("layers without cross-attention")
    if mixin.use_i2v_clip and not hasattr(mixin, "clip_feature_key_value_list"):
        problems.append("use_i2v_clip without CLIP key/value projections")
    if mixin.qk_ln and not hasattr(mixin, "query_layernorm_list"):
        problems.append("qk_ln without its layer norms")
    if problems:
        raise ValueError("lean layers do not support this DiT: " + "; ".join(problems))


class LeanLayers:
    """The lean ``layer_forward`` hook (``lean_layers`` in the DiT's :class:`HookRegistry`).

    ``chunk_tokens`` (tokens per sample in each chunk, None for all at once)
    may be changed while installed; :meth:`remove` restores upstream's layer.
    """

    name = "lean_layers"
    slot = LAYER_FORWARD

    def __init__(self, dit: nn.Module, chunk_tokens: Optional[int]):
        mixin = _find_adaln_mixin(dit)
        _check_config(dit, mixin)
        _check_chunk(chunk_tokens)
        self._chunk_tokens = chunk_tokens
        self.dit = dit
        self.mixin = mixin
        self.transformer = dit.transformer
        self._original = None
        self._fallback_logged = False
        self._rope_restore = []
        self.installed = False
        HookRegistry.of(dit).add(self)

    @property
    def chunk_tokens(self) -> Optional[int]:
        return self._chunk_tokens

    @chunk_tokens.setter
    def chunk_tokens(self, value: Optional[int]) -> None:
        _check_chunk(value)
        self._chunk_tokens = value

    def on_add(self, dit) -> None:
        # scail-win's fused RoPE can rotate q and k in their own storage;
        # upstream's RoPE mixin always makes rotated copies.
        for m in dit.mixins.values():
            if hasattr(m, "rope_inplace"):
                self._rope_restore.append((m, m.rope_inplace))
                m.rope_inplace = True
        if not self._rope_restore:
            log.info("lean layers: the RoPE mixin rotates out of place (two extra q/k-sized tensors)")
        self.installed = True

    def wrap(self, inner):
        self._original = inner
        return self

    def on_remove(self, dit) -> None:
        for m, value in self._rope_restore:
            m.rope_inplace = value
        self._rope_restore.clear()
        self.installed = False

    def remove(self) -> None:
        """Put upstream's layer_forward back (whatever else is installed stays)."""
        if self.installed:
            HookRegistry.of(self.dit).remove(self.name)

    # ------------------------------------------------------------------ the hook

    def __call__(self, hidden_states, mask, *args, **kwargs):
        import torch

        reason = self._unsupported_call(hidden_states, kwargs)
        modulation = None
        if reason is None:
            modulation = self._modulation(int(kwargs["layer_id"]), kwargs["emb"])
            if any(t.dtype != hidden_states.dtype for t in modulation):
                reason = "the modulation's dtype differs from the residual stream's"
        if reason is not None:
            if not self._fallback_logged:
                log.info("lean layers: running upstream's layer (%s)", reason)
                self._fallback_logged = True
            return self._original(hidden_states, mask, *args, **kwargs)
        layer_id = int(kwargs["layer_id"])
        if not hidden_states.is_contiguous():
            hidden_states = hidden_states.contiguous()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        spans = _spans(hidden_states.shape[1], self._chunk_tokens)
        layer = self.transformer.layers[layer_id]
        from scail_win.model.kernels import layer_ops

        fused = layer_ops.select_backend(hidden_states) == "triton"
        with torch.no_grad():
            context = self._self_attention(layer, layer_id, hidden_states, mask, spans, shift_msa,
                                           1 + scale_msa, fused, kwargs)
            cross = self._cross_keys_values(layer, layer_id, kwargs)
            self._tail(layer, layer_id, hidden_states, context, cross, spans, gate_msa, shift_mlp,
                       1 + scale_mlp, gate_mlp, fused, kwargs)
        return hidden_states

    def _unsupported_call(self, hidden_states, kwargs) -> Optional[str]:
        import torch

        if torch.is_grad_enabled() and (hidden_states.requires_grad
                                        or any(p.requires_grad for p in self.mixin.adaLN_modulations)):
            return "autograd is recording"
        if _autocast_on(hidden_states.device.type):
            return "autocast is on"
        if hidden_states.dim() != 3:
            return f"hidden states of shape {tuple(hidden_states.shape)}"
        missing = [k for k in ("layer_id", "emb", "encoder_outputs", "cross_attention_mask") if k not in kwargs]
        if self.mixin.use_i2v_clip and "image_clip_features" not in kwargs:
            missing.append("image_clip_features")
        if missing:
            return "missing " + ", ".join(missing)
        return None

    def _modulation(self, layer_id, emb):
        """shift/scale/gate for attention and MLP, each (batch, 1, hidden), as upstream makes them."""
        modulation = self.mixin.adaLN_modulations[layer_id]
        if not self.mixin.share_adaln:
            return modulation(emb).unsqueeze(1).chunk(6, dim=2)
        return (emb.unflatten(1, (6, modulation.shape[-1])) + modulation).chunk(6, dim=1)

    def _attention_fn(self, module):
        from sat.transformer_defaults import attention_fn_default

        return module.hooks.get("attention_fn", attention_fn_default)

    def _self_attention(self, layer, layer_id, hidden_states, mask, spans, shift, one_plus_scale, fused, kwargs):
        """Steps 1-3: chunked projections into q/k/v buffers, attention on all tokens."""
        import torch
        from sat.mpu.utils import split_tensor_along_last_dim

        mixin = self.mixin
        attention = layer.attention
        norms = (None, None, None)
        if mixin.qk_ln:
            norms = (mixin.query_layernorm_list[layer_id], mixin.key_layernorm_list[layer_id], None)
        buffers = [None, None, None]
        batch, tokens = hidden_states.shape[:2]
        for start, stop in spans:
            x = _norm_modulate(layer.input_layernorm, hidden_states[:, start:stop], shift, one_plus_scale, fused)
            mixed = attention.query_key_value(x)
            del x
            for i, part in enumerate(split_tensor_along_last_dim(mixed, attention.stride)):
                if buffers[i] is None:
                    # A norm keeps its input's dtype (upstream's casts back).
                    buffers[i] = torch.empty((batch, tokens, part.shape[-1]), dtype=part.dtype, device=part.device)
                # Stored before the next norm runs: one norm's float32
                # temporaries at a time beside the projection.
                if norms[i] is not None:
                    _rms_norm(norms[i], part, fused, out=buffers[i][:, start:stop])
                else:
                    buffers[i][:, start:stop].copy_(part)
                del part
            del mixed  # before the next chunk's projection is made
        query, key, value = (attention._transpose_for_scores(b) for b in buffers)
        del buffers
        dropout = attention.attention_dropout if attention.training else None
        # RoPE (in place with scail-win's mixin) and attention, as upstream calls them.
        return self._attention_fn(attention)(query, key, value, mask, dropout, **kwargs)

    def _cross_keys_values(self, layer, layer_id, kwargs):
        """Text (and CLIP image) keys and values for this layer, projected once."""
        from sat.mpu.utils import split_tensor_along_last_dim

        mixin = self.mixin
        cross = layer.cross_attention
        key, value = split_tensor_along_last_dim(cross.key_value(kwargs["encoder_outputs"]), 2)
        if mixin.qk_ln:
            key = mixin.cross_key_layernorm_list[layer_id](key)
        pairs = [(cross._transpose_for_scores(key), cross._transpose_for_scores(value))]
        if mixin.use_i2v_clip:
            projection = mixin.clip_feature_key_value_list[layer_id]
            clip_key, clip_value = split_tensor_along_last_dim(projection(kwargs["image_clip_features"]), 2)
            if mixin.qk_ln:
                clip_key = mixin.clip_feature_key_layernorm_list[layer_id](clip_key)
            pairs.append((cross._transpose_for_scores(clip_key), cross._transpose_for_scores(clip_value)))
        return pairs

    def _tail(self, layer, layer_id, hidden_states, context, cross_pairs, spans, gate_msa, shift_mlp,
              one_plus_scale_mlp, gate_mlp, fused, kwargs):
        """Step 4, chunk by chunk; every update goes into ``hidden_states`` in place."""
        mixin = self.mixin
        attention = layer.attention
        cross = layer.cross_attention
        sandwich = self.transformer.layernorm_order == "sandwich"
        cross_fn = self._attention_fn(cross)
        cross_dropout = cross.attention_dropout if cross.training else None
        cross_mask = kwargs["cross_attention_mask"]
        cross_kwargs = {k: v for k, v in kwargs.items() if k not in ("cross_attention_mask", "encoder_outputs")}
        cross_query_norm = mixin.cross_query_layernorm_list[layer_id] if mixin.qk_ln else None
        for start, stop in spans:
            rows = hidden_states[:, start:stop]
            # Self-attention output projection and gated residual.
            part = context[:, :, start:stop].permute(0, 2, 1, 3).contiguous()
            part = part.view(*part.size()[:-2], attention.hidden_size_per_partition)
            out = attention.dense(part)
            del part
            if sandwich:
                out = layer.third_layernorm(out)
            _gated_add_(rows, gate_msa, out, fused)
            del out

            # Cross-attention on text, plus CLIP image tokens, ungated.
            query = cross.query(layer.post_cross_attention_layernorm(rows))
            if cross_query_norm is not None:
                query = _rms_norm(cross_query_norm, query, fused)
            query = cross._transpose_for_scores(query)
            summed = None
            for key, value in cross_pairs:
                ctx = cross_fn(query, key, value, cross_mask, cross_dropout, cross_attention=True,
                               mem_cross=(key, value), **cross_kwargs)
                ctx = ctx.permute(0, 2, 1, 3).contiguous()
                ctx = ctx.view(*ctx.size()[:-2], cross.hidden_size_per_partition)
                summed = ctx if summed is None else summed + ctx
                del ctx
            del query
            rows += cross.dense(summed)
            del summed

            # Modulated FFN and gated residual.
            x = _norm_modulate(layer.post_attention_layernorm, rows, shift_mlp, one_plus_scale_mlp, fused)
            out = layer.mlp(x, **kwargs)
            del x
            if sandwich:
                out = layer.fourth_layernorm(out)
            _gated_add_(rows, gate_mlp, out, fused)
            del out


def install_lean_layers(dit: nn.Module, chunk_tokens: Optional[int]) -> LeanLayers:
    """Run ``dit``'s layers with :class:`LeanLayers` (``chunk_tokens`` tokens per chunk).

    ``dit`` is SCAIL's ``DiffusionTransformer`` (a sat model whose
    ``layer_forward`` hook is the AdaLN mixin's), before or after a block
    swap or step cache: the hook registry keeps lean layers innermost.
    Raises ValueError for a DiT this forward does not reproduce (keep
    upstream's layer then).  sat rebuilds its hooks when a mixin is added or
    removed, which drops lean layers.
    """
    return LeanLayers(dit, chunk_tokens)
