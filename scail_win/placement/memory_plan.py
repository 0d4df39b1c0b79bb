"""The memory plan: for a VRAM budget, where each model part lives and how
the DiT's activations are cut so that every phase fits.

Phases run one after another and each has only its own weights on the GPU:
text encoder (umT5), image encoder (CLIP), VAE encode, DiT denoising, VAE
decode.  :func:`plan_memory` decides, in order of cost:

* DiT weights: all layers resident if everything fits; otherwise
  ``blocks_on_gpu`` resident layer groups and the rest swapped through the
  GPU by :class:`scail_win.placement.offload.BlockSwap` (``1 + prefetch`` swapped
  groups on the GPU at a time; ``prefetch`` drops to 0 only as a last
  resort, which costs the copy/compute overlap, a few percent on consumer
  cards).
* DiT activations: first run every per-token stage of each layer in token
  chunks (:mod:`scail_win.placement.lean_layer`: projections, qk-norms, cross-attention
  and FFN a chunk at a time, RoPE and residual adds in place), then run the
  two CFG halves one after the other (``cfg_split``), which halves every
  activation.
* umT5 on the GPU, block-swapped, or on the CPU; CLIP on the GPU; the VAE
  on the GPU, tiled (sizes from :mod:`scail_win.model.vae_tiling`'s fitted
  estimate) when a whole frame does not fit.

Activation sizes are modelled in "widths": one (tokens x hidden) tensor in
the activation dtype, which at 512x896x81 (48,832 tokens per sample, hidden
5120, bf16) is 0.47 GiB.  How many widths are live at a lean layer's peak
comes from :func:`scail_win.placement.lean_layer.lean_activation_widths` (derived
from its buffers, checked against measured peaks), times ``ACT_SAFETY``,
plus attention's log-sum-exp and the PyTorch RoPE path's working set.
T5/CLIP costs come from measured peaks (see ``scail_specs``).

Phases are :class:`scail_win.phases.Phase` (``text``, ``clip``,
``vae_encode``, ``denoise``, ``vae_decode``), the engine's names too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from scail_win.errors import UserError
from scail_win.model.spec import ModelSpec
from scail_win.model.vae_tiling import WAN_SPATIAL_FACTOR
from scail_win.phases import Phase

log = logging.getLogger(__name__)

GiB = 1 << 30

# Token chunk sizes tried, largest first (None = no chunking).
# Below ~7,000 tokens a lean layer's peak no longer shrinks (attention's q/k/v).
_CHUNKS = (None, 32768, 16384, 8192, 4096)


def default_budget_bytes(total_vram_bytes: int) -> int:
    """Card total minus 1 GiB (CUDA context, desktop) minus 1/8 (allocator slack).

    An 8 GiB card gets 6 GiB of allocations; 24 GiB gets 20 GiB.
    """
    return int(total_vram_bytes - GiB - total_vram_bytes / 8)


# Margin over the lean layer's counted buffers (allocator rounding, small
# temporaries such as the modulation vectors).
ACT_SAFETY = 1.1
# The PyTorch RoPE path's working set (scail_win.rotary's chunking).
ROPE_WORKSPACE = 64 << 20


@dataclass(frozen=True)
class DiTSpec:
    """What the planner needs to know about the DiT and one sample."""

    num_layers: int
    hidden: int
    ffn: int
    head_dim: int
    tokens_per_sample: int
    group_bytes: int  # one layer group on the GPU (after any upcast)
    resident_bytes: int  # parameters outside the layer groups
    cfg_batch: int = 2  # samples per model call (2 with classifier-free guidance)
    context_tokens: int = 512 + 257  # text + CLIP image tokens (ModelSpec.context_tokens)
    act_bytes: int = 2
    group_host_bytes: int | None = None  # one group in host memory (fp8: half); default group_bytes
    label: str = ""  # e.g. "512x896, 81 frames", for messages


@dataclass(frozen=True)
class ComponentSpec:
    """An encoder run once per prompt/image (umT5, CLIP)."""

    name: str
    weight_bytes: int
    activation_bytes: int
    group_bytes: int = 0  # one swappable block; 0 when it cannot be swapped
    resident_bytes: int = 0  # what stays on the GPU while its blocks swap


@dataclass(frozen=True)
class VaeSpec:
    """The video the Wan VAE encodes (the i2v clip) and decodes, in pixels."""

    height: int
    width: int
    frames: int
    spatial_stride: int = WAN_SPATIAL_FACTOR  # pixels per latent position (ModelSpec.vae_stride)


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    total_vram_bytes: int | None
    num_layers: int
    blocks_on_gpu: int
    prefetch: int
    offload_mode: str  # 'none' | 'pinned' | 'stream'
    cfg_split: bool
    layer_chunk_tokens: int | None  # lean layers' token chunk; None: whole sequence
    t5_placement: str  # 'gpu' | 'swap' | 'cpu'
    clip_placement: str  # 'gpu' | 'cpu'
    vae_encode_tile_px: tuple[int, int] | None  # (height, width); None = whole frames
    vae_decode_tile_px: tuple[int, int] | None
    peaks: dict = field(default_factory=dict)  # Phase -> estimated peak allocated bytes
    resident_phases: tuple[Phase, ...] = ()  # phases whose weights may stay on the GPU afterwards
    label: str = ""
    vae_spatial_stride: int = WAN_SPATIAL_FACTOR  # the VAE's pixels per latent position, for tile sizes

    @property
    def swapped_blocks(self) -> int:
        return self.num_layers - self.blocks_on_gpu

    @property
    def budget_gb(self) -> float:
        return self.budget_bytes / GiB

    @property
    def vae_tiling(self) -> bool:
        return self.vae_encode_tile_px is not None or self.vae_decode_tile_px is not None

    def vae_tile_kwargs_for(self, op: str) -> dict:
        """Keyword arguments for ``vae_tiling.tiled_encode``/``tiled_decode`` (``op``: encode/decode)."""
        from scail_win.model.vae_tiling import DEFAULT_OVERLAP_PX

        tile = {"encode": self.vae_encode_tile_px, "decode": self.vae_decode_tile_px}[op]
        if tile is None:
            return {}
        f = self.vae_spatial_stride
        if op == "encode":
            return {"tile_px": tile, "overlap_px": DEFAULT_OVERLAP_PX, "factor": f}
        return {
            "tile_latent": (tile[0] // f, tile[1] // f),
            "overlap_latent": (DEFAULT_OVERLAP_PX[0] // f, DEFAULT_OVERLAP_PX[1] // f),
            "factor": f,
        }

    def describe(self) -> str:
        """A few lines for the log, printed once per run."""

        def gib(n):
            return f"{n / GiB:.1f} GiB"

        head = f"Memory plan{' for ' + self.label if self.label else ''}: budget {gib(self.budget_bytes)}"
        if self.total_vram_bytes:
            head += f" of {gib(self.total_vram_bytes)} on the card"
        lines = [head]
        t5 = {
            "gpu": "on the GPU",
            "swap": "blocks swapped through the GPU",
            "cpu": "on the CPU (slow, cached)",
        }

        def vae(tile):
            return "on the GPU, whole frames" if tile is None else f"tiled, {tile[0]}x{tile[1]} px tiles"

        rows = [
            (Phase.TEXT, "text encoder", t5[self.t5_placement]),
            (Phase.CLIP, "image encoder", "on the GPU" if self.clip_placement == "gpu" else "on the CPU"),
            (Phase.VAE_ENCODE, "VAE encode", vae(self.vae_encode_tile_px)),
        ]
        if self.offload_mode == "none":
            dit = f"all {self.num_layers} layers on the GPU"
        else:
            dit = (
                f"{self.blocks_on_gpu} of {self.num_layers} layers resident, {self.swapped_blocks} "
                f"swapped ({self.offload_mode} memory, prefetch {self.prefetch})"
            )
        cuts = []
        if self.cfg_split:
            cuts.append("CFG halves one after the other")
        if self.layer_chunk_tokens:
            cuts.append(f"per-token work in chunks of {self.layer_chunk_tokens} tokens")
        if cuts:
            dit += "; " + "; ".join(cuts)
        rows += [(Phase.DENOISE, "DiT", dit), (Phase.VAE_DECODE, "VAE decode", vae(self.vae_decode_tile_px))]
        for phase, title, what in rows:
            peak = self.peaks.get(phase)
            tail = f"  (peak ~{gib(peak)})" if peak is not None else ""
            lines.append(f"  {title:<14} {what}{tail}")
        return "\n".join(lines)


# ----------------------------------------------------------------- SCAIL sizes


# Measured (UPSTREAM.md, baseline/README.md, bf16, H200): umT5-XXL peaks at
# 10.85 GiB with 10.62 GiB of weights for 512 tokens; CLIP 1.24 / 1.20 GiB.
_UMT5 = dict(layers=24, d=4096, ff=10240, vocab=256_384, weights=10.62 * GiB, act=0.23 * GiB)
_CLIP = dict(weights=1.20 * GiB, act=0.04 * GiB)


def scail_specs(
    model: ModelSpec,
    height: int,
    width: int,
    frames: int,
    *,
    cfg_batch: int = 2,
    dit_host_bytes_per_param: int = 2,
    group_bytes: int | None = None,
    resident_bytes: int | None = None,
) -> tuple[DiTSpec, ComponentSpec, ComponentSpec, VaeSpec]:
    """Specs for SCAIL (DiT as ``model`` describes it, umT5-XXL, CLIP, VAE) at a resolution.

    Pass ``group_bytes``/``resident_bytes`` measured from the loaded model
    (``LayerGroup.numel * 2``) when available; the defaults are the bf16
    sizes of ``model``'s parameter counts.
    """
    if not isinstance(model, ModelSpec):
        raise TypeError(f"scail_specs needs a ModelSpec, got {type(model).__name__}")
    per_group = model.layer_params
    if group_bytes is None:
        group_bytes = per_group * 2
    if resident_bytes is None:
        resident_bytes = model.resident_params * 2
    dit = DiTSpec(
        num_layers=model.num_layers, hidden=model.hidden_size, ffn=model.ffn_size, head_dim=model.head_dim,
        tokens_per_sample=model.tokens_per_sample(frames, height, width),
        group_bytes=group_bytes, resident_bytes=resident_bytes, cfg_batch=cfg_batch,
        context_tokens=model.context_tokens, group_host_bytes=per_group * dit_host_bytes_per_param,
        label=f"{height}x{width}, {frames} frames",
    )
    u = _UMT5
    block = (4 * u["d"] * u["d"] + 3 * u["d"] * u["ff"]) * 2
    t5 = ComponentSpec("umT5-XXL", int(u["weights"]), int(u["act"]), group_bytes=block,
                       resident_bytes=u["vocab"] * u["d"] * 2)
    clip = ComponentSpec("CLIP ViT-H/14", int(_CLIP["weights"]), int(_CLIP["act"]))
    return dit, t5, clip, VaeSpec(height, width, frames, spatial_stride=model.vae_stride[1])


# ------------------------------------------------------------------- estimates


def dit_activation_bytes(spec: DiTSpec, batch: int, chunk: int | None) -> int:
    """Peak activation bytes of one lean DiT layer call with ``batch`` samples."""
    from scail_win.placement.lean_layer import lean_activation_widths

    n = spec.tokens_per_sample
    widths = lean_activation_widths(chunk, n, spec.hidden, spec.ffn, batch)
    width = n * spec.hidden * spec.act_bytes
    lse = batch * (spec.hidden // spec.head_dim) * n * 4
    return int(width * widths * ACT_SAFETY) + lse + ROPE_WORKSPACE


def dit_fixed_bytes(spec: DiTSpec, blocks_on_gpu: int, prefetch: int, batch: int) -> int:
    """Weights on the GPU plus the small per-call tensors (RoPE tables, text/CLIP context)."""
    weights = spec.resident_bytes + blocks_on_gpu * spec.group_bytes
    if blocks_on_gpu < spec.num_layers:
        weights += (1 + prefetch) * spec.group_bytes
    rope = spec.tokens_per_sample * spec.head_dim * 8  # fp32 cos + sin
    context = 4 * batch * spec.context_tokens * spec.hidden * spec.act_bytes
    return weights + rope + context


def _fit_activations(spec: DiTSpec, room: int, batch: int):
    """The largest lean chunk (None: unchunked) whose activations fit ``room`` bytes; False if none."""
    for chunk in _CHUNKS:
        if chunk is not None and chunk >= spec.tokens_per_sample:
            continue
        if dit_activation_bytes(spec, batch, chunk) <= room:
            return chunk
    return False


def _dit_configs(prefetch: int):
    """Activation/prefetch settings in order of preference (cheapest first)."""
    for p in dict.fromkeys((prefetch, 0)):
        for split in (False, True):
            yield p, split


# ------------------------------------------------------------------------ plan


def plan_memory(
    dit: DiTSpec,
    *,
    total_vram_bytes: int | None = None,
    budget_gb: float | None = None,
    t5: ComponentSpec | None = None,
    clip: ComponentSpec | None = None,
    vae: VaeSpec | None = None,
    blocks_on_gpu: int | None = None,
    prefetch: int = 1,
    host_ram_bytes: int | None = None,
    offload_mode: str | None = None,
) -> MemoryPlan:
    """Plan every phase within the budget (``budget_gb``, else the default for ``total_vram_bytes``).

    ``blocks_on_gpu`` overrides the number of resident DiT layers (a warning,
    not an error, if the estimate then exceeds the budget).
    ``offload_mode`` overrides 'pinned'/'stream'; by default pinned unless
    the swapped weights would take more than half of ``host_ram_bytes``.
    Raises UserError when the DiT, or the VAE in its smallest tiles, cannot
    fit, naming the minimum.
    """
    if budget_gb is not None:
        if budget_gb <= 0:
            raise UserError(f"the VRAM budget must be positive, got {budget_gb} GiB")
        budget = int(budget_gb * GiB)
    elif total_vram_bytes is not None:
        budget = default_budget_bytes(total_vram_bytes)
    else:
        raise ValueError("plan_memory needs total_vram_bytes or budget_gb")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    if offload_mode not in (None, "pinned", "stream"):
        raise ValueError(f"offload_mode must be 'pinned' or 'stream', got {offload_mode!r}")
    layers = dit.num_layers
    if blocks_on_gpu is not None and not (isinstance(blocks_on_gpu, int) and 0 <= blocks_on_gpu <= layers):
        raise UserError(f"--blocks-on-gpu must be a whole number from 0 to {layers}, got {blocks_on_gpu}")

    from scail_win.model import vae_tiling

    peaks: dict[Phase, int] = {}
    # Text encoder.
    t5_place = "gpu"
    if t5 is not None:
        whole = t5.weight_bytes + t5.activation_bytes
        swap = t5.resident_bytes + (1 + max(prefetch, 1)) * t5.group_bytes + t5.activation_bytes
        if whole <= budget:
            peaks[Phase.TEXT] = whole
        elif t5.group_bytes and swap <= budget:
            t5_place, peaks[Phase.TEXT] = "swap", swap
        else:
            t5_place = "cpu"
    # Image encoder.
    clip_place = "gpu"
    if clip is not None:
        if clip.weight_bytes + clip.activation_bytes <= budget:
            peaks[Phase.CLIP] = clip.weight_bytes + clip.activation_bytes
        else:
            clip_place = "cpu"
    # VAE (raises UserError when even its smallest tiles do not fit).
    tiles = {}
    if vae is not None:
        for op in ("encode", "decode"):
            tiles[op] = vae_tiling.pick_tile_px(vae.frames, vae.height, vae.width, budget, op,
                                                factor=vae.spatial_stride)
            peaks[Phase.for_vae_op(op)] = vae_tiling.estimate_peak_bytes(
                op, vae.frames, vae.height, vae.width, tiles[op]
            )

    # DiT.
    # Lean layers always: where upstream's layer fits they run unchunked, as
    # fast (faster with the fused layer ops) and with fewer temporaries.
    if budget_gb is not None:
        what = f"--vram-budget {budget_gb:g} GiB"
    else:
        what = f"the {budget / GiB:.1f} GiB budget of this {total_vram_bytes / GiB:.1f} GiB GPU"
    blocks, pf, split, chunk = _plan_dit(dit, budget, prefetch, blocks_on_gpu, what)
    batch = 1 if split else dit.cfg_batch
    act = dit_activation_bytes(dit, batch, chunk)
    peaks[Phase.DENOISE] = dit_fixed_bytes(dit, blocks, pf, batch) + act
    if peaks[Phase.DENOISE] > budget:
        log.warning(
            "--blocks-on-gpu %d: the DiT is estimated at %.1f GiB, over the %.1f GiB budget",
            blocks, peaks[Phase.DENOISE] / GiB, budget / GiB,
        )
    # The DiT may stay on the GPU through the other phases when its weights
    # fit beside the largest of them.
    others = max((peak for phase, peak in peaks.items() if phase != Phase.DENOISE), default=0)
    dit_weights = dit.resident_bytes + layers * dit.group_bytes
    resident = (Phase.DENOISE,) if blocks == layers and dit_weights + others <= budget else ()

    if blocks == layers:
        mode = "none"
    elif offload_mode is not None:
        mode = offload_mode
    else:
        host_bytes = (layers - blocks) * (dit.group_host_bytes or dit.group_bytes)
        mode = "stream" if host_ram_bytes is not None and host_bytes > host_ram_bytes / 2 else "pinned"

    return MemoryPlan(
        budget_bytes=budget, total_vram_bytes=total_vram_bytes, num_layers=layers,
        blocks_on_gpu=blocks, prefetch=pf if blocks < layers else 0, offload_mode=mode,
        cfg_split=split and dit.cfg_batch > 1, layer_chunk_tokens=chunk,
        t5_placement=t5_place, clip_placement=clip_place,
        vae_encode_tile_px=tiles.get("encode"), vae_decode_tile_px=tiles.get("decode"),
        peaks=peaks, resident_phases=resident, label=dit.label,
        vae_spatial_stride=vae.spatial_stride if vae is not None else WAN_SPATIAL_FACTOR,
    )


def _plan_dit(dit: DiTSpec, budget: int, prefetch: int, forced_blocks: int | None, what: str):
    """(blocks_on_gpu, prefetch, cfg_split, lean chunk) for the DiT phase, lean layers on."""
    layers = dit.num_layers
    first = forced_blocks if forced_blocks is not None else 0
    for pf, split in _dit_configs(prefetch):
        if split and dit.cfg_batch == 1:
            continue
        batch = 1 if split else dit.cfg_batch
        chunk = _fit_activations(dit, budget - dit_fixed_bytes(dit, first, pf, batch), batch)
        if chunk is False:
            continue
        if forced_blocks is not None:
            return forced_blocks, pf, split, chunk
        act = dit_activation_bytes(dit, batch, chunk)
        if dit_fixed_bytes(dit, layers, pf, batch) + act <= budget:
            return layers, pf, split, chunk
        room = budget - act - dit_fixed_bytes(dit, 0, pf, batch)
        blocks = min(layers - 1, room // dit.group_bytes)
        return int(blocks), pf, split, chunk
    if forced_blocks is not None:
        return forced_blocks, 0, dit.cfg_batch > 1, _CHUNKS[-1]
    need = dit_fixed_bytes(dit, 0, 0, 1) + dit_activation_bytes(dit, 1, _CHUNKS[-1])
    size = f" for {dit.label}" if dit.label else ""
    raise UserError(
        f"{what} is too small{size}: the DiT needs at least {math.ceil(need / GiB * 10) / 10:.1f} GiB "
        f"({dit.tokens_per_sample} tokens per sample); use fewer frames or a lower resolution"
    )


__all__ = [
    "ComponentSpec", "DiTSpec", "GiB", "MemoryPlan", "VaeSpec",
    "default_budget_bytes", "dit_activation_bytes", "dit_fixed_bytes",
    "plan_memory", "scail_specs",
]
