"""A tiny SCAIL with random weights in the real file formats: the whole pipeline in seconds.

:func:`make_smoke_setup` writes, under one folder:

* ``smoke.yaml``: the packaged config with the DiT shrunk (2 layers, hidden
  128, heads of 64; same ``DiffusionTransformer`` class and mixins) and
  tiny stand-ins for umT5-XXL and CLIP ViT-H: :class:`TinyT5EncoderModel`
  and :class:`TinyCLIPModel` subclass upstream's ``T5EncoderModel`` and
  ``CLIPModel`` but build sgm's own ``T5Encoder`` and ``VisionTransformer``
  (inside ``XLMRobertaCLIP``) at small sizes;
* ``weights/``: a SCAIL-Preview folder -- ``model/latest`` and
  ``model/1/mp_rank_00_model_states.pt`` (``{'module': ...}`` with the
  engine's keys, ``model.diffusion_model.*``), ``Wan2.1_VAE.pth`` (the real
  Wan 2.1 VAE architecture, 127 M parameters), the T5 and CLIP ``.pth``
  files, and a umT5-style tokenizer (a Unigram ``tokenizer.json`` made
  with the ``tokenizers`` library, loaded offline by sgm's
  ``HuggingfaceTokenizer``);
* ``scail-win-smoke/``: an example folder, ``ref.jpg`` and ``rendered.mp4``.

Everything is a function of the seed (and of ``device``, where the random
weights are drawn). A folder already holding a complete setup made with the
same arguments is reused as it is.

Needs SCAIL's code importable (``sat``, ``sgm``, ``dit_video_crossattn_sc_xc``):
run inside a SCAIL checkout, or with the checkout on ``PYTHONPATH``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import string
from pathlib import Path
from typing import NamedTuple, Optional, Union

log = logging.getLogger(__name__)

# The defaults of a smoke run: a few steps on a small, short video.
SMOKE_STEPS = 4
SMOKE_SIZE = (64, 96)
SMOKE_FRAMES = 5
EXAMPLE_NAME = "scail-win-smoke"
SMOKE_PROMPT = "the figure is dancing"
CONFIG_NAME = "smoke.yaml"
_STAMP = "smoke.json"
_FORMAT = 1
_FPS = 16

# The stand-ins' sizes.  The DiT's CLIP projection is MLPProj(1280, hidden):
# the CLIP feature width stays ViT-H's 1280, everything else shrinks.
TINY_T5 = dict(vocab=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32,
               shared_pos=False)
TINY_CLIP = dict(embed_dim=64, image_size=28, patch_size=14, vision_dim=1280, vision_mlp_ratio=1,
                 vision_heads=16, vision_layers=2, vision_pool="token", activation="gelu")
FULL_T5_DIM = 4096  # umT5-XXL's width, for full_encoders=True
TINY_DIT = dict(num_layers=2, hidden_size=128, time_embed_dim=128, inner_hidden_size=256, num_attention_heads=2,
                modules={"pos_embed_config": {"params": {"hidden_size_head": 64}},
                         # upstream's qk-norm spans the whole hidden size
                         "adaln_layer_config": {"params": {"hidden_size_head": 128}}})

PathLike = Union[str, "os.PathLike[str]"]


class SmokeSetup(NamedTuple):
    config: Path    # the model config (--base)
    weights: Path   # the weights folder (--weights), SCAIL-Preview layout
    example: Path   # an example folder: ref.jpg + rendered.mp4


# -- the tiny encoders ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _encoder_classes() -> dict:
    """Build the stand-in classes (sgm is imported only now)."""
    import torch

    from ..diffusion_video import cpu_safe_defaults

    with cpu_safe_defaults():
        from sgm.modules.encoders import clip, umt5
    from sgm.modules.encoders.modules import AbstractEmbModel
    from sgm.modules.encoders.tokenizers import HuggingfaceTokenizer

    class TinyT5EncoderModel(umt5.T5EncoderModel):
        """Upstream's T5EncoderModel (same params, same ``__call__``) around a tiny ``T5Encoder``."""

        def __init__(self, max_length, dtype=torch.bfloat16, device="cpu", checkpoint_path=None,
                     tokenizer_path=None, varlen_text=False, uncond_text_length=1):
            # T5EncoderModel.__init__ would build the 5.7 B-parameter umT5-XXL.
            AbstractEmbModel.__init__(self)
            from sat.mpu import get_model_parallel_world_size, get_sequence_parallel_world_size

            self.max_length, self.dtype, self.device = max_length, dtype, device
            self.checkpoint_path, self.tokenizer_path = checkpoint_path, tokenizer_path
            self.varlen_text, self.uncond_text_length = varlen_text, uncond_text_length
            self.cond_length_multiple = get_model_parallel_world_size() * get_sequence_parallel_world_size()
            with torch.device(device):
                model = umt5.T5Encoder(**TINY_T5)
            model = model.to(dtype=dtype, device=device).eval().requires_grad_(False)
            model.load_state_dict(torch.load(checkpoint_path, map_location="cpu"))
            self.model = model
            self.tokenizer = HuggingfaceTokenizer(name=tokenizer_path, seq_len=max_length, clean="whitespace")

    class TinyCLIPModel(clip.CLIPModel):
        """Upstream's CLIPModel (same params, same ``visual``) around a tiny ViT with 1280-wide features."""

        def __init__(self, dtype=torch.float16, device="cpu", checkpoint_path=None):
            # CLIPModel.__init__ would build the 632 M-parameter ViT-H/14.
            torch.nn.Module.__init__(self)
            self.dtype, self.device, self.checkpoint_path = dtype, device, checkpoint_path
            self.model, self.transforms = clip._clip(pretrained=False, pretrained_name="open-clip-xlm-roberta",
                                                     model_cls=clip.XLMRobertaCLIP, return_transforms=True,
                                                     dtype=dtype, device=device, **TINY_CLIP)
            self.model = self.model.eval().requires_grad_(False)
            self.model.load_state_dict(torch.load(checkpoint_path, map_location="cpu"))

    for cls in (TinyT5EncoderModel, TinyCLIPModel):
        cls.__module__ = __name__
    return {"TinyT5EncoderModel": TinyT5EncoderModel, "TinyCLIPModel": TinyCLIPModel}


def __getattr__(name):
    # The config's targets name these; building them needs sgm, so on first access.
    if name in ("TinyT5EncoderModel", "TinyCLIPModel"):
        return _encoder_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- random weights ------------------------------------------------------------------------------


def randomize_(module, device, seed: int, dtype) -> None:
    """Give every parameter of ``module`` seeded random values on ``device``, in place.

    Matrices get N(0, 1/fan_in) so activations keep their scale through the
    layers; per-channel scales (norm weights) 1 + N(0, 0.1^2) and biases
    N(0, 0.1^2): no zero-initialised output layer, so every weight matters.
    """
    import torch

    from ..model.lazy_init import materialize_

    materialize_(module, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.empty(p.shape, dtype=torch.float32, device=device)
            if p.dim() <= 1 or p.numel() == p.shape[0]:
                values.normal_(0.0, 0.1, generator=generator)
                if name.rsplit(".", 1)[-1] in ("weight", "gamma"):
                    values += 1.0
            else:
                values.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
            p.copy_(values.to(p.dtype))


def _save(obj, path: Path) -> None:
    """torch.save ``obj`` atomically (a temporary file, then a rename)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:
        # A full disk shows up as torch's "unexpected pos" RuntimeError.
        from ..errors import UserError
        from ..weights.checkpoint import human_bytes

        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot write {path}: {reason} ({human_bytes(free)} free on its disk); "
                        "free some space and run again") from None
    os.replace(tmp, path)


def _on_cpu(state_dict, dtype) -> dict:
    """``state_dict`` on the CPU, floating-point tensors in ``dtype``."""
    return {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
            for k, v in state_dict.items()}


def _t5_encoder(full: bool):
    import torch

    from ..diffusion_video import cpu_safe_defaults

    with cpu_safe_defaults():
        from sgm.modules.encoders import umt5
    if full:
        return umt5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.float32, device="meta")
    with torch.device("meta"):
        return umt5.T5Encoder(**TINY_T5)


def _clip_model(full: bool):
    import torch

    from ..diffusion_video import cpu_safe_defaults

    with cpu_safe_defaults():
        from sgm.modules.encoders import clip
    if full:
        return clip.clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=False, dtype=torch.float32,
                                              device="meta")
    return clip._clip(pretrained=False, model_cls=clip.XLMRobertaCLIP, dtype=torch.float32, device="meta",
                      **TINY_CLIP)


def _vae():
    import torch
    from sgm.models import wan_vae

    # The architecture upstream's _video_vae builds for Wan2.1_VAE.pth.
    with torch.device("meta"):
        return wan_vae.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True], dropout=0.0)


def _dit_state_dict(config, device, seed: int):
    """The engine-level state dict (``model.diffusion_model.*``) of the config's DiT, random."""
    import argparse

    import torch

    from .. import arguments
    from ..diffusion_video import build_dit

    # The DiT's parallel layers ask sat's model-parallel group for its size.
    arguments.initialize_distributed(argparse.Namespace(
        device="cpu", world_size=1, rank=0, model_parallel_size=1, sequence_parallel_size=1,
        num_multi_query_heads=0, distributed_backend="gloo", deepspeed=False))
    dit = build_dit(config.model.network_config, dtype_str="fp32", use_i2v_clip=True, rope_mode="fp32",
                    empty_weights=True)
    randomize_(dit, device, seed, torch.float32)
    return {f"model.diffusion_model.{k}": v for k, v in dit.state_dict().items()}


# -- the tokenizer -----------------------------------------------------------------------------


def _write_tokenizer(folder: Path) -> None:
    """A Unigram tokenizer in umT5's style (Metaspace, ``</s>`` appended, ``<pad>`` = 0)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    words = ["the", "a", "figure", "person", "girl", "boy", "man", "woman", "is", "dancing", "walking",
             "and", "with", "in", "on", "her", "his", "arms", "legs"]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-"
    pieces = ([(s, 0.0) for s in specials] + [("\u2581", -2.0)]
              + [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
              + [("\u2581" + c, -6.0) for c in chars] + [(c, -7.0) for c in chars])
    if len(pieces) > TINY_T5["vocab"]:
        raise ValueError("the smoke tokenizer has more pieces than the tiny T5 has embeddings")
    tok = Tokenizer(models.Unigram(pieces, unk_id=specials.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special_map = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
              "additional_special_tokens": [], **special_map}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")


# -- the example ---------------------------------------------------------------------------------


def _figure(height: int, width: int, t: float, background, body):
    """A stick figure on a gradient, limbs swinging with phase ``t`` (uint8 H x W x 3)."""
    import numpy as np
    from PIL import Image, ImageDraw

    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(background, np.float32) * (0.6 + 0.4 * ramp)).repeat(width, axis=1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    unit = min(height, width) / 8
    cx, cy = width / 2 + unit * math.sin(2 * math.pi * t), height / 2
    line = max(1, round(unit / 3))
    hip, neck = (cx, cy + unit), (cx, cy - unit)
    swing = 0.8 * math.sin(2 * math.pi * t)
    for origin, angle, length in ((neck, 0.6 + swing, 1.5), (neck, -0.6 - swing, 1.5),
                                  (hip, 0.4 - swing, 2.0), (hip, -0.4 + swing, 2.0)):
        end = (origin[0] + length * unit * math.sin(angle), origin[1] + length * unit * math.cos(angle))
        draw.line([origin, end], fill=body, width=line)
    draw.line([neck, hip], fill=body, width=line)
    draw.ellipse([cx - 0.6 * unit, neck[1] - 1.4 * unit, cx + 0.6 * unit, neck[1] - 0.2 * unit], fill=body)
    return np.asarray(image)


def _write_example(folder: Path, height: int, width: int, frames: int) -> None:
    import numpy as np
    from PIL import Image

    from ..io import video as video_io

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_figure(height, width, 0.0, (90, 140, 200), (240, 200, 60))).save(folder / "ref.jpg",
                                                                                       quality=95)
    pose = np.stack([_figure(height, width, i / max(1, frames - 1), (0, 0, 0), (255, 255, 255))
                     for i in range(frames)])
    video_io.write_video(pose, folder / "rendered.mp4", _FPS, overwrite=True)


# -- the setup ---------------------------------------------------------------------------------------


def _write_config(path: Path, weights: Path, cache: Path, *, height: int, width: int, frames: int, bf16: bool,
                  full_encoders: bool) -> None:
    from omegaconf import OmegaConf

    from ..arguments import packaged_config_path

    config = OmegaConf.load(packaged_config_path())
    config.args.weights = str(weights)
    config.args.embed_cache = str(cache)
    config.args.sampling_image_size = [height, width]
    config.args.bf16 = bf16
    model = config.model
    latent = max(height, width) // 8
    model.network_config.params = OmegaConf.merge(model.network_config.params, TINY_DIT, {
        "text_dim": FULL_T5_DIM if full_encoders else TINY_T5["dim"], "num_frames": frames,
        "latent_height": latent, "latent_width": latent})
    model.sampler_config.params.num_steps = SMOKE_STEPS
    if not full_encoders:
        model.conditioner_config.params.emb_models[0].target = f"{__name__}.TinyT5EncoderModel"
        model.i2v_clip_config.target = f"{__name__}.TinyCLIPModel"
    header = ("# A tiny SCAIL with random weights, written by scail_win.testing.smoke (for pipeline checks only).\n"
              "# Same classes and mixins as the packaged config; see the model: section for the sizes.\n")
    path.write_text(header + OmegaConf.to_yaml(config), encoding="utf-8")


def make_smoke_setup(root: PathLike, *, height: int = SMOKE_SIZE[0], width: int = SMOKE_SIZE[1],
                     frames: int = SMOKE_FRAMES, device=None, seed: int = 0, bf16: Optional[bool] = None,
                     full_encoders: bool = False) -> SmokeSetup:
    """Write a tiny SCAIL under ``root`` (see the module docstring); returns its paths.

    ``height`` x ``width`` is the sampling size (multiples of 32) and the
    example's size; ``frames`` (1 + 4k) the example's frame count and the
    DiT's frame limit. ``device`` draws the random weights (default: the
    CPU). ``bf16`` is the config's precision; by default bf16 on CUDA and
    fp32 on the CPU (sat's LayerNorm cannot run bf16 on the CPU without
    affine weights, which SCAIL's config asks for). ``full_encoders`` uses
    upstream's umT5-XXL and CLIP ViT-H classes at full size (12 GB of
    random weights) instead of the tiny stand-ins.
    """
    import torch

    from .. import arguments
    from ..model.loader import require_scail_code

    if height % 32 or width % 32 or min(height, width) < 32:
        raise ValueError(f"height and width must be multiples of 32, got {height}x{width}")
    if frames < 5 or (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k and at least 5, got {frames}")
    require_scail_code()
    device = torch.device(device or "cpu")
    if bf16 is None:
        bf16 = device.type == "cuda"
    root = Path(root).absolute()
    setup = SmokeSetup(root / CONFIG_NAME, root / "weights", root / EXAMPLE_NAME)
    stamp = {"format": _FORMAT, "height": height, "width": width, "frames": frames, "device": device.type,
             "seed": seed, "bf16": bf16, "full_encoders": full_encoders}
    try:
        if json.loads((root / _STAMP).read_text(encoding="utf-8")) == stamp:
            return setup
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    (root / _STAMP).unlink(missing_ok=True)

    weights = setup.weights
    _write_config(setup.config, weights, root / "embed-cache", height=height, width=width, frames=frames,
                  bf16=bf16, full_encoders=full_encoders)
    _write_tokenizer(weights / "umt5-xxl")
    _write_example(setup.example, height, width, frames)
    config = arguments.load_config([setup.config])
    log.info("writing random weights to %s", weights)

    # The real files' dtypes: DiT and T5 in bf16, CLIP in fp16, the VAE in fp32.
    module = _on_cpu(_dit_state_dict(config, device, seed), torch.bfloat16)
    _save({"module": module, "iteration": 1}, weights / "model" / "1" / "mp_rank_00_model_states.pt")
    (weights / "model" / "latest").write_text("1", encoding="utf-8")
    components = [
        (functools.partial(_t5_encoder, full_encoders), "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth", torch.bfloat16),
        (functools.partial(_clip_model, full_encoders),
         "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth", torch.float16),
        (_vae, "Wan2.1_VAE.pth", torch.float32),
    ]
    for index, (build, name, dtype) in enumerate(components, start=1):
        component = build()
        randomize_(component, device, seed + index, dtype)
        _save(_on_cpu(component.state_dict(), dtype), weights / name)
        del component  # the full-size T5 is 11 GB
    (root / _STAMP).write_text(json.dumps(stamp), encoding="utf-8")
    return setup
