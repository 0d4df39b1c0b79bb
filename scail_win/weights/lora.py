"""LoRAs for SCAIL's DiT: read, map onto sat's names, check, and merge into the weights.

``--lora FILE[:STRENGTH]`` (repeatable) takes safetensors LoRAs made for
Wan2.1-14B, whose published naming schemes are all read here:

* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` /
  ``lora_B``; also with Wan's own module names
  (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``);
* kohya / ComfyUI: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` /
  ``lora_up`` / ``.alpha``, also dotted
  (``diffusion_model.blocks.0.cross_attn.k.lora_down.weight``);
* full deltas: ``<module>.diff`` (weight) and ``<module>.diff_b`` (bias),
  for linears, norms and the modulation tables alike.

SCAIL-Preview was converted from Wan2.1-I2V-14B to sat, so every Wan module
has a sat counterpart, found from the DiT's code (``AdaLNMixin`` and sat's
transformer layer): self-attention q, k and v are the row blocks [q; k; v]
of the fused ``query_key_value``; cross-attention k and v are [k; v] of
``key_value`` (its query is separate); the CLIP image keys and values
(``k_img``, ``v_img``) are [k; v] of the AdaLN mixin's
``clip_feature_key_value_list``; ``blocks.i.modulation`` is the mixin's
``adaLN_modulations[i]`` (same (1, 6, dim) layout and chunk order).
:data:`WAN_TO_SAT` is that table.

Merging: ``W += strength * (alpha / rank) * up @ down`` (``diff``: ``W +=
strength * diff``), computed in float32 and rounded once to the weight's
dtype, all LoRAs touching a tensor together. Where it happens depends on
where the weight lives (:func:`apply_loras`): in place on the GPU for
resident weights; once into the block swap's pinned masters; for masters the
swap streams from a read-only memory-mapped file (or keeps in fp8), on the
GPU each time the layer is brought in, the factors kept on the GPU when
small and in pinned RAM otherwise.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Row chunk of one merge step (float32 bytes): bounds the temporary memory.
CHUNK_BYTES = 128 * 2**20
# Factors of layers merged on every load stay on the GPU up to this size.
FACTORS_ON_GPU_MAX = 512 * 2**20
_SHOW = 5  # unmatched keys named in the warning

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


# -- the --lora flag --------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float = 1.0


def parse_lora_spec(text: str) -> LoraSpec:
    """``FILE`` or ``FILE:STRENGTH``; the last colon splits only when a number follows.

    So ``C:\\loras\\x.safetensors:0.8`` is that file at 0.8 and
    ``C:\\loras\\x.safetensors`` is the whole path at 1.0.
    """
    text = str(text).strip()
    if not text:
        raise UserError("--lora: empty value; pass FILE or FILE:STRENGTH")
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and _NUMBER.fullmatch(tail.strip()):
        path, strength = head, float(tail)
    elif sep and not tail.strip():
        raise UserError(f"--lora {text}: nothing after the colon; pass FILE or FILE:STRENGTH (e.g. :0.8)")
    if not path:
        raise UserError(f"--lora {text}: no file before the strength; pass FILE:STRENGTH")
    if not math.isfinite(strength):
        raise UserError(f"--lora {text}: strength must be a finite number")
    return LoraSpec(Path(path), strength)


def specs(values: Sequence[str]) -> List[LoraSpec]:
    """``FILE[:STRENGTH]`` strings parsed; the files must exist."""
    parsed = [parse_lora_spec(v) for v in values]
    for spec in parsed:
        if not spec.path.is_file():
            raise UserError(f"--lora {spec.path}: no such file; pass the path of a .safetensors LoRA")
    return parsed


def specs_from_args(args) -> List[LoraSpec]:
    """The run's ``--lora`` values (:mod:`scail_win.run_config`) parsed; the files must exist."""
    from ..run_config import of

    return specs(of(args).sampling.lora)


def identity(args) -> Optional[str]:
    """What ``args.lora`` merges, for a job's resume fingerprint: each file's path, size, mtime and strength.

    None without LoRAs, so fingerprints of jobs without any stay as they were.
    """
    from ..io.embed_cache import file_identity

    merged = specs_from_args(args)
    return ";".join(f"{file_identity(s.path)}@{s.strength!r}" for s in merged) if merged else None


# -- Wan2.1 names <-> sat names ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a Wan module's tensors live in the sat DiT.

    ``weight`` and ``bias`` are sat tensor names (``bias`` None for a bare
    parameter such as a modulation table); the Wan module is row block
    ``part`` of ``parts`` equal blocks of them (fused projections).
    """

    weight: str
    bias: Optional[str]
    part: int = 0
    parts: int = 1


# Wan module -> (sat module, part, parts); "{i}" is the block index. A sat
# name ending in "$" is a parameter itself (no .weight/.bias).
WAN_TO_SAT: Tuple[Tuple[str, str, int, int], ...] = (
    ("blocks.{i}.self_attn.q", "transformer.layers.{i}.attention.query_key_value", 0, 3),
    ("blocks.{i}.self_attn.k", "transformer.layers.{i}.attention.query_key_value", 1, 3),
    ("blocks.{i}.self_attn.v", "transformer.layers.{i}.attention.query_key_value", 2, 3),
    ("blocks.{i}.self_attn.o", "transformer.layers.{i}.attention.dense", 0, 1),
    ("blocks.{i}.self_attn.norm_q", "mixins.adaln_layer.query_layernorm_list.{i}", 0, 1),
    ("blocks.{i}.self_attn.norm_k", "mixins.adaln_layer.key_layernorm_list.{i}", 0, 1),
    ("blocks.{i}.cross_attn.q", "transformer.layers.{i}.cross_attention.query", 0, 1),
    ("blocks.{i}.cross_attn.k", "transformer.layers.{i}.cross_attention.key_value", 0, 2),
    ("blocks.{i}.cross_attn.v", "transformer.layers.{i}.cross_attention.key_value", 1, 2),
    ("blocks.{i}.cross_attn.o", "transformer.layers.{i}.cross_attention.dense", 0, 1),
    ("blocks.{i}.cross_attn.norm_q", "mixins.adaln_layer.cross_query_layernorm_list.{i}", 0, 1),
    ("blocks.{i}.cross_attn.norm_k", "mixins.adaln_layer.cross_key_layernorm_list.{i}", 0, 1),
    ("blocks.{i}.cross_attn.k_img", "mixins.adaln_layer.clip_feature_key_value_list.{i}", 0, 2),
    ("blocks.{i}.cross_attn.v_img", "mixins.adaln_layer.clip_feature_key_value_list.{i}", 1, 2),
    ("blocks.{i}.cross_attn.norm_k_img", "mixins.adaln_layer.clip_feature_key_layernorm_list.{i}", 0, 1),
    ("blocks.{i}.norm3", "transformer.layers.{i}.post_cross_attention_layernorm", 0, 1),
    ("blocks.{i}.ffn.0", "transformer.layers.{i}.mlp.dense_h_to_4h", 0, 1),
    ("blocks.{i}.ffn.2", "transformer.layers.{i}.mlp.dense_4h_to_h", 0, 1),
    ("blocks.{i}.modulation", "mixins.adaln_layer.adaLN_modulations.{i}$", 0, 1),
    ("patch_embedding", "mixins.patch_embed.proj", 0, 1),
    ("pose_patch_embedding", "mixins.patch_embed.proj_pose", 0, 1),  # Wan2GP's name for SCAIL's pose patches
    ("text_embedding.0", "text_embedding.0", 0, 1),
    ("text_embedding.2", "text_embedding.2", 0, 1),
    ("time_embedding.0", "time_embed.0", 0, 1),
    ("time_embedding.2", "time_embed.2", 0, 1),
    ("time_projection.1", "adaln_projection.1", 0, 1),
    ("head.head", "mixins.final_layer.linear", 0, 1),
    ("head.modulation", "mixins.final_layer.adaLN_modulation$", 0, 1),
    ("img_emb.proj.0", "clip_proj.proj.0", 0, 1),
    ("img_emb.proj.1", "clip_proj.proj.1", 0, 1),
    ("img_emb.proj.3", "clip_proj.proj.3", 0, 1),
    ("img_emb.proj.4", "clip_proj.proj.4", 0, 1),
)

# diffusers' WanTransformer3DModel names -> Wan's (inside "blocks.{i}." and at the top).
# diffusers swapped norm2 and norm3: its norm2 is Wan's cross-attention norm3.
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img", "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}
_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head", "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}
_DIFFUSERS_HINT = re.compile(r"(^|[._])(attn1|attn2|ffn[._]net|condition_embedder|proj_out|scale_shift_table)([._]|$)")

# Prefixes trainers put before the module path, longest first.
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.",
             "lora_unet_", "lora_transformer_")

# Key endings: (suffix, role).
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"), (".dora_scale", "dora"),
)


def _wan_to_diffusers(wan: str) -> Optional[str]:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", wan)
    if m:
        inverse = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
        rest = inverse.get(m.group(2))
        return f"blocks.{m.group(1)}.{rest}" if rest else None
    return {v: k for k, v in _DIFFUSERS_TOP.items()}.get(wan)


def sat_to_wan(sat_tensor_names: Iterable[str]) -> Dict[str, Target]:
    """Every Wan module (and bare parameter) of WAN_TO_SAT that the given sat tensors have."""
    names = set(sat_tensor_names)
    out: Dict[str, Target] = {}
    layers = sorted({int(m.group(1)) for n in names for m in [re.match(r"transformer\.layers\.(\d+)\.", n)] if m})
    for wan, sat, part, parts in WAN_TO_SAT:
        for i in (layers if "{i}" in wan else [None]):
            w, s = (wan, sat) if i is None else (wan.format(i=i), sat.format(i=i))
            if s.endswith("$"):
                target = Target(s[:-1], None, part, parts)
            else:
                target = Target(s + ".weight", s + ".bias" if s + ".bias" in names else None, part, parts)
            if target.weight in names or target.bias is not None:
                out[w] = target
    return out


class NameMap:
    """LoRA module paths (any scheme above, or sat's own) -> :class:`Target` for one model."""

    def __init__(self, sat_tensor_names: Iterable[str]):
        names = list(sat_tensor_names)
        self.wan = sat_to_wan(names)
        self.diffusers = {d: t for w, t in self.wan.items() for d in [_wan_to_diffusers(w)] if d}
        sat = {}
        for n in names:
            module, _, leaf = n.rpartition(".")
            if leaf == "weight" and module:
                sat[module] = Target(n, f"{module}.bias" if f"{module}.bias" in names else None)
        self.sat = sat
        self.flat_wan = {k.replace(".", "_"): t for k, t in self.wan.items()}
        self.flat_diffusers = {k.replace(".", "_"): t for k, t in self.diffusers.items()}

    def lookup(self, module: str, diffusers: bool) -> Optional[Target]:
        bare = module[len("model.diffusion_model."):] if module.startswith("model.diffusion_model.") else module
        if bare in self.sat:
            return self.sat[bare]
        for prefix in ("",) + _PREFIXES:
            if prefix and not module.startswith(prefix):
                continue
            path = module[len(prefix):]
            table, flat = (self.diffusers, self.flat_diffusers) if diffusers else (self.wan, self.flat_wan)
            found = table.get(path) or flat.get(path)
            if found is not None:
                return found
        return None


def split_key(key: str) -> Tuple[Optional[str], Optional[str]]:
    """(module path, role) of a LoRA key; (None, None) for keys of no known role."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None, None


# -- reading a LoRA file ----------------------------------------------------------------


@dataclass(eq=False)
class Term:
    """One LoRA's change to row block ``[row0, row1)`` of a tensor (viewed as rows x rest)."""

    row0: int
    row1: int
    scale: float
    up: Optional["torch.Tensor"] = None  # (rows, rank)
    down: Optional["torch.Tensor"] = None  # (rank, rest)
    diff: Optional["torch.Tensor"] = None  # (rows, rest)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down, self.diff) if t is not None)

    def to(self, device, pin: bool = False) -> None:
        for attr in ("up", "down", "diff"):
            t = getattr(self, attr)
            if t is not None:
                t = t.to(device)
                setattr(self, attr, t.pin_memory() if pin and t.device.type == "cpu" else t)

    def add_to(self, acc: "torch.Tensor", r0: int) -> None:
        """Add this term to ``acc``, float32 rows ``[r0, r0 + len(acc))`` of the target."""
        import torch

        lo, hi = max(r0, self.row0), min(r0 + acc.shape[0], self.row1)
        if lo >= hi:
            return
        dst = acc[lo - r0: hi - r0]
        rows = slice(lo - self.row0, hi - self.row0)
        # non_blocking: from pinned memory on a copy stream, a blocking copy would wait for the compute stream.
        if self.diff is not None:
            dst.add_(self.diff[rows].to(acc.device, non_blocking=True).to(torch.float32), alpha=self.scale)
        else:
            up = self.up[rows].to(acc.device, non_blocking=True).to(torch.float32)
            down = self.down.to(acc.device, non_blocking=True).to(torch.float32)
            dst.addmm_(up, down, alpha=self.scale)


@dataclass
class LoraFile:
    """What one LoRA file changes: sat tensor name -> terms."""

    spec: LoraSpec
    terms: Dict[str, List[Term]] = field(default_factory=dict)
    unmatched: List[str] = field(default_factory=list)


def _open(path: Path):
    from safetensors import safe_open

    from .checkpoint import HeaderError, read_safetensors_header

    try:
        read_safetensors_header(path)
    except HeaderError as e:
        raise UserError(f"--lora {path}: not a valid safetensors file ({e}); re-download it") from None
    except OSError as e:
        raise UserError(f"--lora {path}: cannot be read ({e.strerror})") from None
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # the library's own checks; its error types vary across versions
        raise UserError(f"--lora {path}: safetensors cannot open it ({e}); re-download it") from None


def read_lora(spec: LoraSpec, shapes: Dict[str, Tuple[int, ...]], names: Optional[NameMap] = None) -> LoraFile:
    """Parse ``spec``'s file against a model's tensor shapes (sat names); UserError on a bad file."""
    names = names or NameMap(shapes)
    path = spec.path
    result = LoraFile(spec)
    with _open(path) as f:
        keys = list(f.keys())
        groups: Dict[str, Dict[str, str]] = {}
        for key in keys:
            module, role = split_key(key)
            if module is None:
                result.unmatched.append(key)
                continue
            if role == "dora":
                raise UserError(f"--lora {path}: {key}: DoRA LoRAs (dora_scale) are not supported; "
                                "use a plain LoRA")
            groups.setdefault(module, {})[role] = key
        diffusers = any(_DIFFUSERS_HINT.search(m) for m in groups)
        for module, roles in groups.items():
            target = names.lookup(module, diffusers)
            if target is None:
                result.unmatched.extend(roles.values())
                continue
            for term_name, term in _terms(f, path, module, roles, target, shapes, spec.strength):
                result.terms.setdefault(term_name, []).append(term)
    if not keys:
        raise UserError(f"--lora {path}: the file holds no tensors; re-download it")
    if not result.terms:
        raise UserError(f"--lora {path}: none of its {len(keys)} keys names a layer of SCAIL's DiT "
                        f"(first: {keys[0]}); is it a LoRA for Wan2.1-14B?")
    return result


def _rows(path, key, target: Target, shape) -> Tuple[int, int]:
    if target.parts > 1 and shape[0] % target.parts:
        raise UserError(f"--lora {path}: {key}: its target has {shape[0]} rows, not {target.parts} equal parts")
    size = shape[0] // target.parts
    return target.part * size, (target.part + 1) * size


def _terms(f, path, module, roles, target: Target, shapes, strength):
    """The terms of one module's keys (validated against the model's shapes)."""

    def get(role):
        tensor = f.get_tensor(roles[role])
        if not tensor.is_floating_point():
            raise UserError(f"--lora {path}: {roles[role]} is {tensor.dtype}, not floating point")
        return tensor

    out = []
    if "up" in roles or "down" in roles:
        missing = "up" if "down" in roles else "down"
        if missing not in roles:
            have = roles["down" if missing == "up" else "up"]
            peft = "lora_B" if missing == "up" else "lora_A"
            raise UserError(f"--lora {path}: {have} has no matching lora_{missing}/{peft} weight; "
                            "the file is incomplete")
        if target.weight not in shapes:
            raise UserError(f"--lora {path}: {roles['up']}: its target {target.weight} takes no LoRA")
        up, down = get("up"), get("down")
        shape = shapes[target.weight]
        if up.dim() > 2 and any(s != 1 for s in up.shape[2:]):
            raise UserError(f"--lora {path}: {roles['up']}: shape {list(up.shape)}: only 1x1 up kernels are supported")
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise UserError(f"--lora {path}: {roles['up']}: rank mismatch, up has rank {up.shape[1]} and "
                            f"down {rank}; the file is corrupt")
        row0, row1 = _rows(path, roles["up"], target, shape)
        rest = math.prod(shape[1:])
        if up.shape[0] != row1 - row0 or down.shape[1] != rest:
            raise UserError(f"--lora {path}: {roles['up']}: makes a {up.shape[0]}x{down.shape[1]} change, but "
                            f"{target.weight} takes {row1 - row0}x{rest}; is this LoRA for another model?")
        alpha = float(get("alpha").float().reshape(-1)[0]) if "alpha" in roles else float(rank)
        out.append((target.weight, Term(row0, row1, strength * alpha / rank,
                                        up=up, down=down)))
    for role, name in (("diff", target.weight), ("diff_b", target.bias)):
        if role not in roles:
            continue
        if name is None or name not in shapes:
            raise UserError(f"--lora {path}: {roles[role]}: {module} has no {'bias' if role == 'diff_b' else 'weight'}"
                            " in SCAIL's DiT")
        diff, shape = get(role), shapes[name]
        row0, row1 = _rows(path, roles[role], target, shape)
        want = (row1 - row0,) + tuple(shape[1:])
        if tuple(diff.shape) != want:
            raise UserError(f"--lora {path}: {roles[role]}: shape {list(diff.shape)}, but {name} takes "
                            f"{list(want)}; is this LoRA for another model?")
        out.append((name, Term(row0, row1, strength,
                               diff=diff.reshape(want[0], -1))))
    if "alpha" in roles and not ("up" in roles or "down" in roles):
        raise UserError(f"--lora {path}: {roles['alpha']} has no lora_up/lora_down pair; the file is incomplete")
    return out


# -- merging -----------------------------------------------------------------------------


def _row_view(t: "torch.Tensor") -> "torch.Tensor":
    return t.reshape(t.shape[0] if t.dim() else 1, -1)


def merged(tensor: "torch.Tensor", terms: List[Term], compute=None, out: Optional["torch.Tensor"] = None):
    """``tensor`` plus ``terms``, in float32 rounded once to its dtype, written into ``out``.

    ``out`` defaults to a new tensor beside ``tensor``; pass ``tensor``
    itself to merge in place (it must be contiguous). ``compute`` is where
    the arithmetic runs (default: where the tensor is), a row chunk at a time.
    """
    import torch

    compute = torch.device(compute) if compute is not None else tensor.device
    if out is None:
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    if not out.is_contiguous():
        raise ValueError("merged: out must be contiguous")
    src, dst = _row_view(tensor), _row_view(out)
    step = max(1, CHUNK_BYTES // (4 * max(1, src.shape[1])))
    for r0 in range(0, src.shape[0], step):
        acc = src[r0: r0 + step].to(compute, torch.float32, copy=True)
        for term in terms:
            term.add_to(acc, r0)
        dst[r0: r0 + step].copy_(acc)
    return out


def merged_fp8(q: "torch.Tensor", scale: "torch.Tensor", terms: List[Term], compute=None):
    """An fp8 weight with per-row ``scale``: dequantized, merged, requantized; (q, scale) in place."""
    import torch

    from .checkpoint import FP8_MAX

    compute = torch.device(compute) if compute is not None else q.device
    src = _row_view(q)
    step = max(1, CHUNK_BYTES // (4 * max(1, src.shape[1])))
    scale_rows = scale.reshape(-1)
    for r0 in range(0, src.shape[0], step):
        acc = src[r0: r0 + step].to(compute).to(torch.float32)
        acc.mul_(scale_rows[r0: r0 + step].to(compute, torch.float32).unsqueeze(1))
        for term in terms:
            term.add_to(acc, r0)
        amax = acc.abs().amax(dim=1)
        new_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        src[r0: r0 + step].copy_((acc / new_scale.unsqueeze(1)).clamp_(-FP8_MAX, FP8_MAX).to(q.dtype))
        scale_rows[r0: r0 + step].copy_(new_scale.to(scale.dtype))
    return q, scale


class LoraMerge:
    """The LoRAs applied to a DiT: what changed where, and the per-load step of the block swap."""

    def __init__(self, files: List[LoraFile]):
        self.files = files
        self.terms: Dict[str, List[Term]] = {}
        for lf in files:
            for name, terms in lf.terms.items():
                self.terms.setdefault(name, []).extend(terms)
        self.on_load: Dict[str, List[Term]] = {}  # merged by the swap each time the tensor is loaded
        self.inner = None  # the swap's materialize that on_load wraps

    def materialize(self, src, device, name):
        """The block swap's materialize, then this tensor's LoRAs (in place on the new copy)."""
        out = self.inner(src, device, name)
        terms = self.on_load.get(name)
        if terms:
            merged(out, terms, out=out)
        return out

    def apply(self, dit: "nn.Module", *, device=None, swap=None) -> None:
        """Merge into ``dit``'s weights wherever they live now; call after the memory plan is applied.

        * a tensor on the GPU (resident, or kept there by the block swap): in place;
        * a block-swap master the swap owns (pinned mode on CUDA): in place,
          once, the arithmetic on ``device``;
        * any other swapped master (streamed from the memory-mapped file, or
          fp8): not touched; the swap's materialize merges it on the GPU each
          time the layer is loaded;
        * another CPU tensor (CPU runs, a DiT moved between phases): replaced
          by a merged copy, computed on ``device``;
        * an fp8 tensor with its ``<name>_scale`` buffer: dequantized, merged
          and requantized.
        """
        import torch

        device = torch.device(device) if device is not None else torch.device("cpu")
        tensors = _tensors(dit)
        swapped = swap.swapped_masters() if swap is not None else {}
        fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
        with torch.no_grad():
            for name, terms in self.terms.items():
                tensor = tensors[name]
                if name in swapped:
                    master, owned = swapped[name]
                    if owned and master.dtype == tensor.dtype:
                        merged(master, terms, compute=device, out=master)
                    else:
                        self.on_load[name] = terms
                    continue
                module, leaf = _owning_module(dit, name)
                scale = getattr(module, leaf + "_scale", None)
                if tensor.dtype in fp8 and isinstance(scale, torch.Tensor):
                    if tensor.device.type == "cpu":  # possibly file-backed: merge into copies
                        tensor.data, scale.data = tensor.data.clone(), scale.data.clone()
                    merged_fp8(tensor.data, scale.data, terms, compute=device)
                elif tensor.device.type != "cpu" and tensor.is_contiguous():
                    merged(tensor.data, terms, out=tensor.data)
                else:
                    tensor.data = merged(tensor.data, terms, compute=device)
        if self.on_load:
            on_load_bytes = sum(t.nbytes for terms in self.on_load.values() for t in terms)
            gpu = device.type == "cuda" and on_load_bytes <= FACTORS_ON_GPU_MAX
            for terms in self.on_load.values():
                for t in terms:
                    t.to(device if gpu else "cpu", pin=device.type == "cuda" and not gpu)
            self.inner = swap.materialize
            swap.materialize = self.materialize
            log.info("LoRA: %d swapped tensors are merged on %s each time their layer is loaded "
                     "(%.1f GFLOP per pass over the swapped layers; factors %.0f MiB %s)",
                     len(self.on_load), device, self.flops_per_load() / 1e9, on_load_bytes / 2**20,
                     "on the GPU" if gpu else "in RAM")
        for lf in self.files:
            if lf.unmatched:
                log.warning("LoRA %s: %d keys match no layer of SCAIL's DiT and are ignored (first: %s)",
                            lf.spec.path, len(lf.unmatched), ", ".join(lf.unmatched[:_SHOW]))
            log.info("LoRA %s (strength %g): changed %d tensors", lf.spec.path, lf.spec.strength, len(lf.terms))

    def flops_per_load(self) -> int:
        """Multiply-add FLOPs the swap spends on LoRAs for one pass over every swapped layer."""
        return sum(2 * t.up.shape[0] * t.up.shape[1] * t.down.shape[1]
                   for terms in self.on_load.values() for t in terms if t.up is not None)


def _owning_module(model: "nn.Module", name: str):
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _tensors(dit: "nn.Module") -> Dict[str, "torch.Tensor"]:
    tensors: Dict[str, "torch.Tensor"] = {}
    for name, t in list(dit.named_parameters()) + list(dit.named_buffers()):
        tensors.setdefault(name, t)
    return tensors


def read_loras(dit: "nn.Module", specs: List[LoraSpec]) -> LoraMerge:
    """Read and check every LoRA against ``dit``'s names and shapes (``dit`` may still be on meta)."""
    shapes = {n: tuple(t.shape) for n, t in _tensors(dit).items()}
    name_map = NameMap(shapes)
    return LoraMerge([read_lora(spec, shapes, name_map) for spec in specs])


def apply_loras(dit: "nn.Module", specs: List[LoraSpec], *, device=None, swap=None) -> Optional[LoraMerge]:
    """:func:`read_loras` then :meth:`LoraMerge.apply`; None without specs."""
    if not specs:
        return None
    merge = read_loras(dit, specs)
    merge.apply(dit, device=device, swap=swap)
    return merge
