"""Build the engine, read its weights, and put every tensor where the plan says.

Order of work, and why:

1. the memory plan is made first (card size, ``--vram-budget``, host RAM,
   the sampling size), so that loading already knows which DiT layers stay
   on the GPU and which are swapped;
2. the DiT is built on ``meta`` and its checkpoint (SAT ``.pt`` or converted
   safetensors) is memory-mapped into it: no random initialisation and no
   second copy in RAM; fp8 layers that will be swapped stay fp8 in the file
   and are upcast on the GPU per layer;
3. lean layers, the block swap and split CFG are installed as the plan asks,
   each a named hook in its module's :class:`~scail_win.placement.registry.HookRegistry`
   (the step cache and fp8 linears too), which keeps their order and undoes any one;
4. T5, CLIP and the VAE are built later, on first use, through
   :func:`component_weights`, which reads their files safely and
   memory-mapped whatever layout the weights folder has.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator

import torch
from torch import nn

from .. import run_config
from ..errors import UserError
from ..placement.registry import FORWARD, HookRegistry
from ..phases import Phase

log = logging.getLogger(__name__)

GiB = 1024 ** 3
DIT_PREFIX = "model.diffusion_model."


# What a SCAIL checkout provides: sampling imports these by name.
SCAIL_MODULES = ("sat", "sgm", "dit_video_crossattn_sc_xc")


def require_scail_code() -> None:
    """UserError unless SCAIL's code (its sat, sgm and DiT module) can be imported."""
    import importlib.util

    missing = [name for name in SCAIL_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"SCAIL's code is not importable ({', '.join(missing)} not found): run inside a "
                        f"SCAIL checkout, or put the checkout on PYTHONPATH")


@contextlib.contextmanager
def component_weights(files: Dict[str, Path]) -> Iterator[None]:
    """While building T5/CLIP/VAE: their ``torch.load(path)`` reads ``files[path]``.

    Upstream's component classes call ``torch.load`` on the paths in the
    config and ``load_state_dict`` into weights built on the CPU. Inside this
    block those reads go through :func:`scail_win.weights.checkpoint.open_state_dict`
    (no arbitrary unpickling, memory-mapped, safetensors or ``.pt``), and
    ``load_state_dict`` assigns the mapped tensors (cast to the parameter's
    dtype where it differs) instead of copying into a second full copy.
    Parameters are created in bf16 so a 5.7 B-parameter T5 is never laid out
    in fp32 first.
    """
    from ..upstream.patches import ASSIGNING_LOAD_STATE_DICT, MAPPED_TORCH_LOAD

    original_dtype = torch.get_default_dtype()
    with MAPPED_TORCH_LOAD.applied(files), ASSIGNING_LOAD_STATE_DICT.applied():
        torch.set_default_dtype(torch.bfloat16)
        try:
            yield
        finally:
            torch.set_default_dtype(original_dtype)


def _component_files(model_config, layout) -> Dict[str, Path]:
    """Config path of each component -> the file that holds it in ``layout``."""
    files: Dict[str, Path] = {}
    conditioner = model_config.get("conditioner_config", None) or {}
    for emb in conditioner.get("params", {}).get("emb_models", []):
        path = emb.get("params", {}).get("checkpoint_path")
        if path and "T5EncoderModel" in emb.get("target", ""):
            files[path] = layout.t5
    clip = model_config.get("i2v_clip_config", None) or {}
    if clip.get("params", {}).get("checkpoint_path"):
        files[clip["params"]["checkpoint_path"]] = layout.clip
    vae = model_config.get("first_stage_config", None) or {}
    if vae.get("params", {}).get("vae_pth"):
        files[vae["params"]["vae_pth"]] = layout.vae
    return files


# -- the memory plan ----------------------------------------------------------------


def largest_group_gpu_bytes(dit: nn.Module, groups, fp8_on_gpu=frozenset()) -> int:
    """GPU bytes of the largest layer group: bf16, and one byte a parameter for ``fp8_on_gpu`` weights."""
    fp8_ids = {id(p) for n, p in dit.named_parameters() if n in fp8_on_gpu}
    return max(sum(t.numel() * (1 if id(t) in fp8_ids else 2) for t in g.tensors) for g in groups)


def make_plan(args, dit: nn.Module, device: torch.device, host_bytes_per_param: int = 2,
              fp8_on_gpu: frozenset = frozenset()):
    """The memory plan for ``dit`` on ``device``, or None when nothing needs planning.

    None means: a CPU run, or ``--offload none`` (everything where upstream
    puts it). Otherwise the sampling size in ``args`` (and at most
    ``max_frames``, by default the model's frame limit) is what the plan must
    fit; the model's dimensions come from ``args.model_config``, the config
    ``dit`` was built from. ``fp8_on_gpu``: names of the weights that stay
    fp8 on the GPU (fp8 matmul), one byte a parameter there.
    """
    from ..placement import memory_plan as memory
    from ..placement import offload
    from ..placement.host_memory import available_ram
    from .spec import ModelSpec

    config = run_config.of(args)
    memory_options = config.memory
    if device.type != "cuda" or memory_options.offload == "none":
        return None
    spec = ModelSpec.from_args(args)
    height, width = (int(v) for v in args.sampling_image_size)
    frames = config.sampling.max_frames or spec.max_frames
    groups = offload.scail_layer_groups(dit)
    group_bytes = largest_group_gpu_bytes(dit, groups, fp8_on_gpu)
    total_params = sum(p.numel() for p in dit.parameters())
    resident_params = total_params - sum(g.numel for g in groups)
    dit_spec, t5_spec, clip_spec, vae_spec = memory.scail_specs(
        spec, height, width, frames, group_bytes=group_bytes, resident_bytes=resident_params * 2,
        dit_host_bytes_per_param=host_bytes_per_param)
    budget = memory_options.vram_budget
    total = torch.cuda.get_device_properties(device).total_memory
    if memory_options.t5_cpu:
        t5_spec = None
    ram = memory_options.ram_budget
    host = int(ram * GiB) if ram else available_ram()
    plan = memory.plan_memory(dit_spec, total_vram_bytes=total, budget_gb=budget, t5=t5_spec,
                              clip=clip_spec, vae=vae_spec, blocks_on_gpu=memory_options.blocks_on_gpu,
                              host_ram_bytes=host)
    if memory_options.t5_cpu:
        plan = replace(plan, t5_placement="cpu")
    tiling = memory_options.vae_tiling
    if tiling == "off" and plan.vae_tiling:
        log.warning("--vae-tiling off: the VAE is estimated to need more than the budget")
        plan = replace(plan, vae_encode_tile_px=None, vae_decode_tile_px=None)
    elif tiling == "on" and not plan.vae_tiling:
        plan = replace(plan, vae_encode_tile_px=(256, 256), vae_decode_tile_px=(256, 256))
    return plan


# -- applying the plan to the DiT -------------------------------------------------------


class _SplitCFG:
    """Run the network on each half of a CFG batch in turn (same math, half the activations).

    ``split_cfg`` on the network wrapper's forward, in its :class:`HookRegistry`.
    """

    name = "split_cfg"
    slot = FORWARD

    def __init__(self):
        self.original = None

    def on_add(self, wrapper) -> None:
        pass

    def on_remove(self, wrapper) -> None:
        pass

    def wrap(self, inner):
        self.original = inner
        return self

    def __call__(self, x, t, c, **kwargs):
        batch = x.shape[0]
        if batch < 2 or batch % 2:
            return self.original(x, t, c, **kwargs)
        half = batch // 2

        def take(value, i):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[i * half:(i + 1) * half]
            return value

        outs = [self.original(take(x, i), take(t, i), {k: take(v, i) for k, v in c.items()},
                              **{k: take(v, i) for k, v in kwargs.items()}) for i in range(2)]
        return torch.cat(outs, dim=0)


class DiTPlacement:
    """What :func:`place_dit` put in a DiT's hook registry; :meth:`undo` takes it off again."""

    NAMES = ("lean_layers", "block_swap")

    def __init__(self, dit: nn.Module):
        self.hooks = HookRegistry.of(dit)

    @property
    def lean(self):
        return self.hooks.get("lean_layers")

    @property
    def swap(self):
        return self.hooks.get("block_swap")

    def undo(self) -> None:
        for name in self.NAMES:
            if name in self.hooks:
                self.hooks.remove(name)


def place_dit(dit: nn.Module, plan, device: torch.device, weight_source=None) -> DiTPlacement:
    """Lean layers and the block swap on ``dit`` as ``plan`` asks (nothing when it fits as is)."""
    from ..placement import offload

    placement = DiTPlacement(dit)
    if plan is None:
        return placement
    from ..placement.lean_layer import install_lean_layers
    try:
        install_lean_layers(dit, plan.layer_chunk_tokens)
    except ValueError as exc:
        log.warning("lean layers unavailable for this model (%s); memory use will exceed the plan", exc)
    if plan.offload_mode != "none" and plan.blocks_on_gpu < plan.num_layers:
        kwargs = {}
        if weight_source is not None:
            kwargs = dict(source=weight_source, materialize=weight_source.materialize)
        offload.BlockSwap(dit, offload.scail_layer_groups(dit), device, resident_groups=plan.blocks_on_gpu,
                          mode=plan.offload_mode, prefetch=plan.prefetch, **kwargs).attach()
    return placement


def apply_memory_plan(engine, plan, device: torch.device, weight_source=None) -> DiTPlacement:
    """Place the engine's DiT per ``plan``: resident or block-swapped, lean layers, split CFG.

    ``weight_source`` (a :class:`scail_win.weights.checkpoint.CheckpointWeights`) feeds
    the block swap straight from the checkpoint file (fp8 stays fp8 until the
    GPU). Without a plan the whole DiT moves to ``device``.
    """
    engine.set_memory_plan(plan, device)
    placement = place_dit(engine.model.diffusion_model, plan, device, weight_source)
    engine._block_swap = placement.swap
    # A DiT that must leave the GPU for the other phases comes in with its
    # own phase; one that stays moves now.
    if placement.swap is None and (plan is None or Phase.DENOISE in plan.resident_phases):
        engine.model.to(device)
    if plan is not None and plan.cfg_split:
        HookRegistry.of(engine.model).add(_SplitCFG())
    if plan is not None:
        for line in plan.describe().splitlines():
            log.info("%s", line)
    return placement


# -- the whole build ------------------------------------------------------------------------


def build(args, model_cls=None):
    """The engine for ``args`` with its weights loaded, its memory plan applied and ``args.lora`` merged."""
    from ..weights import lora
    from ..weights import checkpoint as weights
    from ..diffusion_video import SATVideoDiffusionEngine

    if model_cls is not None and model_cls is not SATVideoDiffusionEngine:
        log.info("using scail-win's SATVideoDiffusionEngine in place of %s", getattr(model_cls, "__name__", model_cls))
    device = torch.device(getattr(args, "device", "cpu") or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    load = getattr(args, "load", None)
    layout = weights.ensure_weights(run_config.of(args).io.weights or Path(load).parent) if load else None
    if layout is not None:
        from ..weights.prefetch import load_order, prefetch_files

        prefetch_files(load_order(layout))  # a no-op for files the CLI queued already

    engine = SATVideoDiffusionEngine(args, empty_weights=layout is not None)
    engine.eval()
    dit = engine.model.diffusion_model
    # Every LoRA is read and checked against the DiT's shapes before its weights are.
    specs = lora.specs_from_args(args)
    loras = lora.read_loras(dit, specs) if specs else None
    fp8 = layout is not None and (layout.dit_dtype or "").startswith("fp8")
    from .kernels import fp8_linear

    fp8_matmul = fp8_linear.plan_fp8_matmul(dit, device, run_config.of(args).numerics.fp8_matmul, fp8)
    plan = make_plan(args, dit, device, host_bytes_per_param=1 if fp8 else 2, fp8_on_gpu=frozenset(fp8_matmul))

    source = None
    if layout is not None:
        if layout.dit is None:
            raise UserError(f"{layout.root}: model/latest does not name a checkpoint; re-download model/latest")
        engine.component_context = lambda: component_weights(_component_files(args.model_config, layout))
        source = weights.open_state_dict(layout.dit)
        swapped = _swapped_names(dit, plan) if fp8 else set()
        log.info("reading the DiT weights from %s", layout.dit)
        result = weights.load_into(dit, source, prefix=DIT_PREFIX, placement=dit_load_device(plan, device),
                                   dtype=engine.dtype, keep_fp8=lambda name: name in swapped or name in fp8_matmul,
                                   strict=False)
        if result.meta_left:
            raise UserError(f"{layout.dit} lacks {len(result.meta_left)} DiT tensors "
                            f"(first: {DIT_PREFIX}{result.meta_left[0]}); is it a SCAIL-Preview checkpoint?")
        if result.unexpected_keys:
            log.warning("%d checkpoint tensors are not used by this config (first: %s)",
                        len(result.unexpected_keys), result.unexpected_keys[0])
    weight_source = None
    if fp8:
        weight_source = weights.CheckpointWeights(source, prefix=DIT_PREFIX, dtype=engine.dtype,
                                                  keep_fp8=fp8_matmul.__contains__)
    if fp8_matmul:
        engine.fp8_linears = fp8_linear.install_fp8_linears(dit, fp8_matmul, device)
    placement = apply_memory_plan(engine, plan, device, weight_source)
    if loras is not None:
        loras.apply(dit, device=device, swap=placement.swap)
    install_step_cache(engine, args, plan, placement, device)
    log.info("hooks: %s", "; ".join(f"{part}: {', '.join(names)}" for part, names in engine.installed_hooks().items())
             or "none")
    return engine


def install_step_cache(engine, args, plan, placement: DiTPlacement, device: torch.device) -> None:
    """``--step-cache``: the first-block cache, outermost on the DiT's layer hook (its registry rank).

    Its two activation-sized tensors per CFG half go to pinned RAM when the
    plan already had to offload (an 8 GB card has no room for them).
    """
    from .step_cache import install_step_cache as install, step_cache_threshold

    threshold = step_cache_threshold(args)
    if not threshold:
        return
    offloaded = plan is not None and (placement.swap is not None or plan.cfg_split)
    storage = "cpu" if offloaded and device.type == "cuda" else "device"
    engine.step_cache = install(engine.model.diffusion_model, threshold, storage=storage)


def dit_load_device(plan, device: torch.device):
    """Where the loader puts the DiT's tensors: where they will live.

    The GPU when the DiT stays there from the start (everything else in
    :func:`apply_memory_plan` would move it there at once): fp8 weights are
    then upcast on the GPU, and no copy is made in RAM. Otherwise the CPU,
    where bf16 tensors stay file-backed until a phase or the block swap
    takes them.
    """
    if device.type == "cuda" and (plan is None or Phase.DENOISE in plan.resident_phases):
        return device
    return "cpu"


def _swapped_names(dit: nn.Module, plan) -> set:
    """Names of the DiT tensors the plan swaps (they stay fp8 in the file)."""
    from ..placement import offload

    if plan is None or plan.blocks_on_gpu >= plan.num_layers:
        return set()
    groups = offload.scail_layer_groups(dit)
    resident = set(offload.resident_indices(len(groups), plan.blocks_on_gpu))
    names = {id(t): n for n, t in dit.named_parameters()}
    return {names[id(t)] for gi, g in enumerate(groups) if gi not in resident
            for t in g.tensors if id(t) in names}
