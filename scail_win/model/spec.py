"""The DiT's dimensions, read from the model config: what the planner and the job checks size by.

Upstream's ``dit_video_crossattn_sc_xc.DiffusionTransformer`` is built from
``model.network_config.params``; :class:`ModelSpec` reads the same keys (with
the same defaults where upstream has one) plus what sits elsewhere: the text
length (the umT5 embedder's ``max_length``), whether the CLIP branch exists
(``model.use_i2v_clip``, which upstream's engine copies into the network
params) and the sampling arguments ``vae_compress_size``, ``latent_channels``
and ``representation``.  Parameter counts follow the modules that upstream and
sat build for those dimensions, layer by layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Mapping

# CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token. Fixed by the
# image encoder, which the config names by its checkpoint only.
CLIP_TOKENS = 257
# Width of the CLIP features the DiT projects (upstream's MLPProj(1280, hidden)).
CLIP_FEATURE_DIM = 1280
# The text length when a network config comes without its model config:
# SCAIL-Preview's umT5 ``max_length``.
DEFAULT_TEXT_LENGTH = 512

# DiffusionTransformer's arguments without a default.
_REQUIRED = ("num_frames", "time_compressed_rate", "latent_width", "latent_height", "patch_size",
             "in_channels", "out_channels", "hidden_size", "text_dim", "num_layers", "num_attention_heads",
             "elementwise_affine")
# Upstream options that change the network in ways the counts below do not model.
_UNMODELLED = ("num_multi_query_heads", "cross_num_multi_query_heads", "num_classes", "ofs_embed_dim",
               "cfg_embed_dim")


def _plain(node: Any) -> Any:
    """An OmegaConf node as plain Python (interpolations left unresolved: weight paths need a resolver)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _ints(value: Any, count: int, key: str) -> tuple[int, ...]:
    value = _plain(value)
    if not (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{key} must be a list of {count} positive ints, got {value!r}")
    return tuple(value)


def _positive(params: Mapping, key: str, where: str) -> int:
    value = params[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}{key} must be a positive int, got {value!r}")
    return value


def _optional(params: Mapping, key: str, where: str, default: int) -> int:
    """``params[key]`` where set (a positive int), else ``default`` (upstream's default for it)."""
    return default if params.get(key) is None else _positive(params, key, where)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@dataclass(frozen=True)
class ModelSpec:
    """SCAIL's DiT as configured: sizes, token layout, frame and size limits, parameter counts."""

    num_layers: int
    hidden_size: int
    ffn_size: int  # inner_hidden_size (upstream default: 4 x hidden)
    num_heads: int
    text_dim: int  # width of the text encoder's output
    text_length: int  # text tokens per prompt (the umT5 max_length)
    in_channels: int  # latent channels + mask channels the patch embedding takes
    out_channels: int
    latent_channels: int
    patch_size: tuple[int, int, int]  # (t, h, w) in latent positions
    vae_stride: tuple[int, int, int]  # (t, h, w): pixels (frames) per latent position
    time_compressed_rate: int  # the DiT's own temporal stride, for its frame tables
    num_frames: int  # frames the DiT's RoPE and AdaLN tables are sized for
    latent_height: int  # the RoPE table's extent in latent positions
    latent_width: int
    time_embed_dim: int
    time_freq_dim: int
    qk_norm_size: int  # width of each q/k RMSNorm (the AdaLN mixin's hidden_size_head; SCAIL: the hidden size)
    qk_norm_affine: bool
    qk_norm: bool
    share_adaln: bool
    elementwise_affine: bool
    use_rmsnorm: bool
    swiglu: bool
    conv_patch_embed: bool
    use_i2v_clip: bool
    half_size_pose: bool  # representation smpl_downsample: the pose video is rendered at half size

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def from_network_config(cls, network_config: Any, *, text_length: int = DEFAULT_TEXT_LENGTH,
                            use_i2v_clip: bool = True, vae_compress_size=None, latent_channels: int | None = None,
                            representation: str = "dwpose") -> "ModelSpec":
        """From ``model.network_config`` (its ``params``, or the node holding them), OmegaConf or dict.

        ``use_i2v_clip`` applies unless the params carry it (upstream's engine
        writes it there); ``vae_compress_size`` defaults to the DiT's
        ``time_compressed_rate`` over the Wan VAE's 8 x 8; ``latent_channels``
        to ``out_channels``; ``representation`` is upstream's flag (default
        dwpose). ValueError names a missing or malformed key.
        """
        from .vae_tiling import WAN_SPATIAL_FACTOR

        node = _plain(network_config)
        if not isinstance(node, Mapping):
            raise ValueError(f"network_config must be a mapping, got {type(node).__name__}")
        params = _plain(node.get("params", node)) or {}
        where = "model.network_config.params."
        missing = [key for key in _REQUIRED if params.get(key) is None]
        if missing:
            raise ValueError(f"the model config lacks {where}{missing[0]}"
                             + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))
        for key in _UNMODELLED:
            if params.get(key):
                raise ValueError(f"{where}{key} is set; scail-win's memory plan does not model it")
        hidden = _positive(params, "hidden_size", where)
        heads = _positive(params, "num_attention_heads", where)
        if hidden % heads:
            raise ValueError(f"{where}hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        time_rate = _positive(params, "time_compressed_rate", where)
        modules = params.get("modules") or {}
        adaln = (modules.get("adaln_layer_config") or {}).get("params") or {}
        patch = (modules.get("patch_embed_config") or {}).get("params") or {}
        affine = bool(params["elementwise_affine"])
        time_embed = _optional(params, "time_embed_dim", where, hidden)
        qk_norm = bool(adaln.get("qk_ln", True))
        adaln_where = where + "modules.adaln_layer_config.params."
        if qk_norm and adaln.get("hidden_size_head") is None:
            raise ValueError(f"the model config lacks {adaln_where}hidden_size_head (the q/k norms' width)")
        out_channels = _positive(params, "out_channels", where)
        if "use_i2v_clip" in params:
            use_i2v_clip = bool(params["use_i2v_clip"])
        vae_stride = ((time_rate, WAN_SPATIAL_FACTOR, WAN_SPATIAL_FACTOR) if vae_compress_size is None
                      else _ints(vae_compress_size, 3, "vae_compress_size"))
        if not isinstance(text_length, int) or text_length <= 0:
            raise ValueError(f"the text length must be a positive int, got {text_length!r}")
        return cls(
            num_layers=_positive(params, "num_layers", where), hidden_size=hidden,
            ffn_size=_optional(params, "inner_hidden_size", where, 4 * hidden), num_heads=heads,
            text_dim=_positive(params, "text_dim", where), text_length=text_length,
            in_channels=_positive(params, "in_channels", where), out_channels=out_channels,
            latent_channels=_optional({"latent_channels": latent_channels}, "latent_channels", "", out_channels),
            patch_size=_ints(params["patch_size"], 3, where + "patch_size"), vae_stride=vae_stride,
            time_compressed_rate=time_rate, num_frames=_positive(params, "num_frames", where),
            latent_height=_positive(params, "latent_height", where),
            latent_width=_positive(params, "latent_width", where),
            time_embed_dim=time_embed, time_freq_dim=_optional(params, "time_freq_dim", where, time_embed),
            qk_norm_size=_optional(adaln, "hidden_size_head", adaln_where, hidden),
            qk_norm_affine=affine if adaln.get("qk_ln_affine") is None else bool(adaln["qk_ln_affine"]),
            qk_norm=qk_norm, share_adaln=bool(params.get("share_adaln", False)),
            elementwise_affine=affine, use_rmsnorm=bool(params.get("use_RMSNorm", False)),
            swiglu=bool(params.get("use_SwiGLU", False)), conv_patch_embed=bool(patch.get("use_conv", True)),
            use_i2v_clip=use_i2v_clip, half_size_pose="smpl_downsample" in str(representation),
        )

    @classmethod
    def from_model_config(cls, model_config: Any, **upstream_args) -> "ModelSpec":
        """From the config's ``model:`` section; ``upstream_args``: vae_compress_size, latent_channels, representation."""
        model = _plain(model_config)
        if not isinstance(model, Mapping) or model.get("network_config") is None:
            raise ValueError("the model config lacks model.network_config")
        return cls.from_network_config(model["network_config"], text_length=_text_length(model),
                                       use_i2v_clip=bool(model.get("use_i2v_clip", False)), **upstream_args)

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """From a whole config (``model:`` and ``args:``, as ``--base`` files merge)."""
        whole = _plain(config)
        if not isinstance(whole, Mapping) or whole.get("model") is None:
            raise ValueError("the config has no model: section")
        return cls.from_model_config(whole["model"], **_upstream_args(whole.get("args") or {}))

    @classmethod
    def from_args(cls, args) -> "ModelSpec":
        """From upstream-style ``args`` (``args.model_config`` and the sampling arguments)."""
        return cls.from_model_config(args.model_config, **_upstream_args(vars(args)))

    # -- shapes ------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_tokens(self) -> int:
        """Cross-attention context per sample: text tokens plus CLIP image tokens."""
        return self.text_length + (CLIP_TOKENS if self.use_i2v_clip else 0)

    @property
    def latent_frames_max(self) -> int:
        """Latent frames the DiT's RoPE and AdaLN tables hold (upstream: (num_frames - 1) // rate + 1)."""
        return (self.num_frames - 1) // self.time_compressed_rate + 1

    @property
    def max_frames(self) -> int:
        """The most video frames a sample may have: that many latent frames through the VAE."""
        return (self.latent_frames_max - 1) * self.vae_stride[0] + 1

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: VAE stride x patch, x2 for a half-size pose video."""
        multiple = self.vae_stride[1] * self.patch_size[1]
        return multiple * 2 if self.half_size_pose else multiple

    @property
    def max_height(self) -> int:
        """Pixels the RoPE table reaches: latent_height patches' worth through the VAE."""
        return self.latent_height // self.patch_size[1] * self.patch_size[1] * self.vae_stride[1]

    @property
    def max_width(self) -> int:
        return self.latent_width // self.patch_size[2] * self.patch_size[2] * self.vae_stride[2]

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) latent positions of a ``frames`` x ``height`` x ``width`` video (first frame alone)."""
        for name, value in (("height", height), ("width", width), ("frames", frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        st, sh, sw = self.vae_stride
        return (frames - 1) // st + 1, height // sh, width // sw

    def tokens_per_sample(self, frames: int, height: int, width: int) -> int:
        """DiT tokens for one sample: the video, one reference frame, and the half-size pose video.

        SCAIL's DiT concatenates the noisy video's patches, the reference
        image's (one latent frame) and the pose video's, whose latent is half
        the size on each side (upstream's ``pose_length``: t * (h // 2) * (w // 2)
        over the patch). 512x896x81 -> 37,632 + 1,792 + 9,408 = 48,832.
        """
        t, h, w = self.latent_shape(frames, height, width)
        pt, ph, pw = self.patch_size
        video, ref = (t // pt) * (h // ph) * (w // pw), (h // ph) * (w // pw)
        pose = (t // pt) * (h // 2 // ph) * (w // 2 // pw)
        return video + ref + pose

    # -- parameters ------------------------------------------------------------------------------

    def _norm_params(self, width: int) -> int:
        if not self.elementwise_affine:
            return 0
        return width if self.use_rmsnorm else 2 * width

    @property
    def layer_params(self) -> int:
        """Parameters of one layer group: sat's layer plus this layer's entries in the AdaLN mixin's lists."""
        d, ffn = self.hidden_size, self.ffn_size
        count = (
            _linear(d, 3 * d) + _linear(d, d)  # self-attention qkv, output
            + _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)  # cross-attention q, kv, output
            + 2 * d  # sat's post-cross-attention LayerNorm, always affine for Wan
            + 2 * self._norm_params(d)  # input and post-attention norms
            + _linear(d, ffn) + _linear(ffn, d) + (_linear(d, ffn) if self.swiglu else 0)
            + (6 * d if self.share_adaln else _linear(self.time_embed_dim, 6 * d))  # AdaLN modulation
        )
        if self.use_i2v_clip:
            count += _linear(d, 2 * d)  # CLIP image key/value
        if self.qk_norm and self.qk_norm_affine:
            count += (5 if self.use_i2v_clip else 4) * self.qk_norm_size  # q, k, cross q, cross k, CLIP k
        return count

    @property
    def resident_params(self) -> int:
        """Parameters outside the layer groups: embeddings, time/AdaLN projections, CLIP projection, final layer."""
        d, ted = self.hidden_size, self.time_embed_dim
        patch = prod(self.patch_size)
        if self.conv_patch_embed:
            embed = 2 * _linear(self.in_channels * patch, d)  # video/reference and pose Conv3d
        else:
            embed = _linear(self.in_channels * patch, d)
        count = (
            embed
            + _linear(self.time_freq_dim, ted) + _linear(ted, ted)  # time embedding
            + _linear(self.text_dim, d) + _linear(d, d)  # text embedding
            + _linear(d, patch * self.out_channels)  # final linear
            + (2 * d if self.elementwise_affine else 0)  # final LayerNorm
            + (2 * d if self.share_adaln else _linear(ted, 2 * d))  # final modulation
        )
        if self.share_adaln:
            count += _linear(ted, 6 * d)  # the shared AdaLN projection
        if self.use_i2v_clip:
            c = CLIP_FEATURE_DIM
            count += 2 * c + _linear(c, c) + _linear(c, d) + 2 * d  # MLPProj: LayerNorm, 2 Linear, LayerNorm
        return count

    @property
    def total_params(self) -> int:
        return self.num_layers * self.layer_params + self.resident_params


def _text_length(model: Mapping) -> int:
    """``max_length`` of the conditioner's T5 embedder (upstream requires it there)."""
    conditioner = model.get("conditioner_config") or {}
    for emb in (conditioner.get("params") or {}).get("emb_models") or []:
        if "T5EncoderModel" in str(emb.get("target", "")):
            length = (emb.get("params") or {}).get("max_length")
            if not isinstance(length, int) or length <= 0:
                raise ValueError("the model config's T5 embedder (model.conditioner_config.params.emb_models) "
                                 f"needs params.max_length, a positive int; got {length!r}")
            return length
    raise ValueError("the model config lacks a T5EncoderModel in model.conditioner_config.params.emb_models")


def _upstream_args(values: Mapping) -> dict:
    """The sampling arguments a ModelSpec reads, where given."""
    out = {}
    for key in ("vae_compress_size", "latent_channels", "representation"):
        value = _plain(values.get(key))
        if value is not None:
            out[key] = value
    return out


__all__ = ["CLIP_TOKENS", "DEFAULT_TEXT_LENGTH", "ModelSpec"]
