"""Self-attention for SCAIL's DiT in a single process.

Upstream's ``UlyessAttentionMixin`` sends q, k, v and the output through
``all_to_all_single`` even with one process (identities there, but each is
a copy, and with gloo -- Windows' only backend -- a trip through the host),
and sat's ``attention_fn_default`` turns the mask into two Python bools
(two host syncs per call) and copies k and v with ``.contiguous()``.
With sequence parallel size 1 none of that changes the result, so this
mixin calls PyTorch's fused attention directly. Its constructor also does
not query the CUDA device, so the DiT can be built on a machine without one.
"""
from __future__ import annotations

import torch.nn.functional as F


def single_process_attention(query_layer, key_layer, value_layer, attention_mask,
                             attention_dropout=None, log_attention_weights=None,
                             scaling_attention_score=True, **kwargs):
    """Full (non-causal) attention over (batch, heads, seq, head_dim) tensors.

    The DiT passes a dummy all-ones mask and no dropout at inference, which is
    what makes sat's default take the same scaled_dot_product_attention path.
    """
    if log_attention_weights is not None or not scaling_attention_score:
        raise ValueError("single-process attention supports plain scaled attention only")
    if attention_mask is not None and attention_mask.device.type == "cpu" \
            and not bool((attention_mask.float() > 0).all()):
        # The DiT's masks are all-ones CPU tensors (sat casts them to its
        # first parameter's dtype: fp8 when that layer is stored in fp8), so
        # this check costs no device sync; anything else would need sat's
        # masked path.
        raise ValueError("single-process attention got a partial attention mask")
    dropout_p = 0.0
    if attention_dropout is not None and attention_dropout.training:
        dropout_p = attention_dropout.p
    num_q, num_kv = query_layer.shape[1], key_layer.shape[1]
    if num_kv != num_q:
        # Multi-query layouts: expand k/v heads as sat does.
        key_layer = key_layer.repeat_interleave(num_q // num_kv, dim=1)
        value_layer = value_layer.repeat_interleave(num_q // num_kv, dim=1)
    return F.scaled_dot_product_attention(query_layer, key_layer, value_layer,
                                          attn_mask=None, dropout_p=dropout_p)


def make_single_process_mixin_class():
    """A sat ``BaseMixin`` subclass standing in for ``UlyessAttentionMixin``.

    Built on demand because sat must be importable first (it is the user's
    SCAIL tree or PyPI's SwissArmyTransformer).
    """
    from sat.model.mixins import BaseMixin

    class SingleProcessAttentionMixin(BaseMixin):
        def attention_fn(self, query_layer, key_layer, value_layer, attention_mask,
                         attention_dropout=None, log_attention_weights=None,
                         scaling_attention_score=True, **kwargs):
            return single_process_attention(query_layer, key_layer, value_layer, attention_mask,
                                            attention_dropout, log_attention_weights,
                                            scaling_attention_score)

    return SingleProcessAttentionMixin
