"""Drop-in for SCAIL's ``diffusion_video``: ``SATVideoDiffusionEngine``.

Same constructor (``args``) and the attributes and methods that sampling
uses, so upstream's own ``sampling_main`` runs against it too. What differs:

* nothing touches the GPU while building: T5, CLIP and the VAE get their
  ``device`` from here (upstream's defaults call
  ``torch.cuda.current_device()`` at import time; :func:`cpu_safe_defaults`
  lets those modules import on a machine without CUDA), and
  ``empty_weights=True`` builds the DiT on ``meta`` for the weights loader;
* with one process, attention skips the Ulysses all-to-all collectives
  and runs on the kernel ``args.attention`` names (:mod:`scail_win.model.kernels.attention`),
  and no barrier or broadcast is issued;
* where each component lives, and when it moves, is decided in one place:
  :meth:`SATVideoDiffusionEngine.phase`, which asks the memory plan.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import logging
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from . import run_config
from .model.lazy_init import empty_weights as _empty_weights, skip_init
from .upstream.patches import CUDA_DEVICE_DEFAULT, SINGLE_PROCESS_ATTENTION
from .upstream.versions import warn_if_untested
from .phases import Phase

log = logging.getLogger(__name__)

DEFAULT_WRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"
FUSED_ROPE_TARGET = "scail_win.model.kernels.rope3d.Rotary3DPositionEmbeddingMixin"


def _instantiate(config):
    from sgm.util import instantiate_from_config
    return instantiate_from_config(config)


def _sequence_parallel_size() -> int:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    from sat import mpu
    try:
        return mpu.get_sequence_parallel_world_size()
    except (AssertionError, AttributeError, TypeError):
        return 1


def _model_parallel_size() -> int:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    from sat import mpu
    try:
        return mpu.get_model_parallel_world_size()
    except (AssertionError, AttributeError, TypeError):
        return 1


@contextlib.contextmanager
def cpu_safe_defaults() -> Iterator[None]:
    """Import upstream modules whose default arguments need a GPU, on a machine without one.

    ``sgm.modules.encoders.umt5`` and ``clip`` declare ``device=torch.cuda.
    current_device()`` as a default argument, which Python evaluates when the
    module is imported: without CUDA that import raises. Inside this block,
    on such a machine, the call gives ``"cpu"``. Only that default changes,
    and scail-win always passes ``device`` explicitly, so nothing runs
    differently; with CUDA the block does nothing.
    """
    if torch.cuda.is_available():
        yield
        return
    with CUDA_DEVICE_DEFAULT.applied():
        yield


def _global_rng_untouched():
    """Building draws nothing from the global CPU RNG that sampling would see.

    Random initialisation is skipped, but some constructors still call
    ``torch.randn`` (sat's AdaLN tables, CLIP's embeddings). Built lazily,
    such a component would shift the initial noise by whether it was built
    in this job: a cached text embedding would change the video. With this,
    the first job's noise is the first draw after seeding.
    """
    return torch.random.fork_rng(devices=[])


def _dtype_from_args(args) -> Tuple[torch.dtype, str]:
    if getattr(args, "fp16", False):
        return torch.float16, "fp16"
    if getattr(args, "bf16", False):
        return torch.bfloat16, "bf16"
    return torch.float32, "fp32"


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def build_dit(network_config, *, dtype_str: str = "bf16", use_i2v_clip: bool = True,
              rope_mode: str = "fp32", empty_weights: bool = False) -> nn.Module:
    """SCAIL's DiT from its ``network_config``, built the scail-win way.

    No random initialisation (``empty_weights``: parameters on ``meta`` for
    the loader; otherwise uninitialised CPU storage, which upstream's
    ``load_checkpoint`` then fills); the fused 3D RoPE mixin
    (:mod:`scail_win.model.kernels.rope3d`, ``rope_mode`` ``fp32`` or ``exact``) in place of
    upstream's; and, with one process, attention without the Ulysses
    collectives (:mod:`scail_win.model.kernels.attention`).
    """
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_str]
    network_config = copy.deepcopy(network_config)
    params = network_config["params"]
    params["dtype"] = dtype_str
    params["use_i2v_clip"] = use_i2v_clip
    transformer_args = params.get("transformer_args", None)
    if transformer_args is not None:
        transformer_args["skip_init"] = True
        transformer_args["checkpoint_activations"] = False
    pos_embed = params.get("modules", {}).get("pos_embed_config", None)
    if pos_embed is not None and rope_mode in ("fp32", "exact") and _fused_rope_available():
        pos_embed["target"] = FUSED_ROPE_TARGET
        pos_embed.setdefault("params", {})["rope_mode"] = rope_mode

    dit_module = importlib.import_module(network_config["target"].rsplit(".", 1)[0])
    warn_if_untested(dit_module)
    build = _empty_weights() if empty_weights else skip_init()
    swap = contextlib.nullcontext()
    if _sequence_parallel_size() == 1 and dit_module.__name__ == SINGLE_PROCESS_ATTENTION.module:
        swap = SINGLE_PROCESS_ATTENTION.applied()
    with build, swap:
        network = _instantiate(network_config)
    if not empty_weights:
        network = network.to(dtype)
    return network


class SATVideoDiffusionEngine(nn.Module):
    """SCAIL's video diffusion engine for inference (drop-in).

    ``empty_weights=True`` (used by scail-win's own loader) builds the DiT
    without storage; the default builds it on the CPU without random
    initialisation, which is what upstream's ``get_model`` +
    ``load_checkpoint`` expect.
    """

    def __init__(self, args, empty_weights: bool = False, **kwargs):
        super().__init__()
        model_config = args.model_config
        self.args = args
        self.log_keys = model_config.get("log_keys", None)
        self.input_key = model_config.get("input_key", "mp4")
        self.use_pd = model_config.get("use_pd", False)
        self.use_i2v_clip = model_config.get("use_i2v_clip", False)
        self.i2v_encode_video = model_config.get("i2v_encode_video", False)
        self.untrainable_prefixs = model_config.get("untrainable_prefixs", ["first_stage_model", "conditioner"])
        self.en_and_decode_n_samples_a_time = model_config.get("en_and_decode_n_samples_a_time", None)
        self.lora_train = model_config.get("lora_train", False)
        self.noised_image_input = model_config.get("noised_image_input", False)
        self.noised_image_all_concat = model_config.get("noised_image_all_concat", False)
        self.image_cond_dropout = model_config.get("image_cond_dropout", 0.0)
        self.pose_dropout = model_config.get("pose_dropout", 0.0)
        self.use_pose = model_config.get("use_pose", False)
        self.latent_input = model_config.get("latent_input", False)
        self.scale_factor = model_config.get("scale_factor", 1.0)
        self.disable_first_stage_autocast = model_config.get("disable_first_stage_autocast", False)
        self.no_cond_log = self.disable_first_stage_autocast
        self.dtype, self.dtype_str = _dtype_from_args(args)
        # Before anything loads: a forced --attention kernel that is not
        # installed fails now; the kernel itself is probed on the first call.
        from .model.kernels import attention
        self.attention = attention.configure(run_config.of(args).numerics.attention)
        self.device = torch.device(getattr(args, "device", "cpu") if not isinstance(getattr(args, "device", "cpu"), int)
                                   else f"cuda:{args.device}")
        self.compute_device = self.device
        self.memory_plan = None
        self._block_swap = None
        self.current_phase: Optional[Phase] = None

        with _global_rng_untouched():
            network = build_dit(model_config["network_config"], dtype_str=self.dtype_str,
                                use_i2v_clip=self.use_i2v_clip, rope_mode=run_config.of(args).numerics.rope_mode,
                                empty_weights=empty_weights)
        wrapper_target = model_config.get("network_wrapper", None) or DEFAULT_WRAPPER
        from sgm.util import get_obj_from_str
        self.model = get_obj_from_str(wrapper_target)(
            network, compile_model=model_config.get("compile_model", False), dtype=self.dtype)
        self.denoiser = _instantiate(model_config["denoiser_config"])
        sampler_config = model_config.get("sampler_config", None)
        self.sampler = _instantiate(sampler_config) if sampler_config is not None else None
        if self.sampler is not None:
            self.sampler.device = self.device
        loss_fn_config = model_config.get("loss_fn_config", None)
        self.loss_fn = _instantiate(loss_fn_config) if loss_fn_config is not None else None

        # T5 (11 GB), CLIP and the VAE are built on first use, on the CPU:
        # a run whose text embeddings are cached never loads T5 at all.
        self._conditioner_config = model_config.get("conditioner_config", None)
        self._i2v_clip_config = model_config.get("i2v_clip_config", None) if self.use_i2v_clip else None
        self._first_stage_config = model_config.get("first_stage_config", None)
        self._lazy: Dict[str, object] = {}
        # Set by the model loader: how component files are read while building.
        self.component_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    # -- construction -------------------------------------------------------

    def _build_lazy(self, name: str):
        if name in self._lazy:
            return self._lazy[name]
        if name == "conditioner":
            from sgm.modules import UNCONDITIONAL_CONFIG
            config = copy.deepcopy(self._conditioner_config or UNCONDITIONAL_CONFIG)
            for emb in config.get("params", {}).get("emb_models", []):
                if "T5EncoderModel" in emb.get("target", ""):
                    emb.setdefault("params", {})["device"] = "cpu"
            log.info("loading the text encoder")
            with self.component_context(), skip_init(), cpu_safe_defaults(), _global_rng_untouched():
                obj = _instantiate(config)
        elif name == "i2v_clip":
            if self._i2v_clip_config is None:
                return None
            config = copy.deepcopy(self._i2v_clip_config)
            config.setdefault("params", {})["device"] = "cpu"
            log.info("loading the CLIP image encoder")
            with self.component_context(), skip_init(), cpu_safe_defaults(), _global_rng_untouched():
                obj = _instantiate(config)
        elif name == "first_stage_model":
            config = copy.deepcopy(self._first_stage_config)
            config.setdefault("params", {})["device"] = "cpu"
            log.info("loading the VAE")
            with self.component_context(), skip_init(), _global_rng_untouched():
                obj = _instantiate(config)
            inner = obj.model if hasattr(obj, "model") and isinstance(obj.model, nn.Module) else obj
            for p in inner.parameters():
                p.requires_grad_(False)
        else:
            raise KeyError(name)
        if isinstance(obj, nn.Module):
            if self.dtype != torch.float32:
                # Upstream's get_model casts the whole engine, T5 and CLIP
                # (fp16 weights) included, to the run's precision.
                obj.to(self.dtype)
            # A submodule, as in upstream's engine; add_module refuses the
            # name because the class has a property of that name.
            self._modules[name] = obj
        self._lazy[name] = obj
        return obj

    @property
    def conditioner(self):
        return self._build_lazy("conditioner")

    @property
    def i2v_clip(self):
        return self._build_lazy("i2v_clip")

    @property
    def first_stage_model(self):
        return self._build_lazy("first_stage_model")

    def reinit(self, parent_model=None):
        """Upstream hook; inference has nothing to re-initialise."""

    def disable_untrainable_params(self):
        """Upstream hook for training; inference keeps every parameter frozen."""
        for p in self.parameters():
            p.requires_grad_(False)

    # -- placement ------------------------------------------------------------

    def set_memory_plan(self, plan, compute_device: Optional[torch.device] = None) -> None:
        """Adopt ``plan`` (a :class:`scail_win.placement.memory_plan.MemoryPlan`); see :meth:`phase`."""
        self.memory_plan = plan
        if compute_device is not None:
            self.compute_device = torch.device(compute_device)

    def installed_hooks(self) -> Dict[str, list]:
        """Installed hook names (innermost first) of each part that has any: network, DiT, text encoder."""
        from .placement.registry import HookRegistry

        parts = {"network": self.model, "dit": getattr(self.model, "diffusion_model", None)}
        conditioner = self._lazy.get("conditioner")
        embedders = getattr(conditioner, "embedders", None) or []
        if len(embedders):
            parts["text encoder"] = getattr(embedders[0], "model", None)
        out = {}
        for part, module in parts.items():
            registry = HookRegistry.find(module) if module is not None else None
            if registry is not None and registry.names():
                out[part] = registry.names()
        return out

    def _text_encoder(self):
        embedders = getattr(self.conditioner, "embedders", [])
        return embedders[0] if len(embedders) else None

    def _move_component(self, phase: Phase, device: torch.device) -> None:
        if phase is Phase.TEXT:
            emb = self._text_encoder()
            if emb is None:
                return
            placement = getattr(self.memory_plan, "t5_placement", "gpu")
            target = torch.device("cpu") if placement == "cpu" else device
            if placement == "swap":
                self._swap_text_encoder(emb, device)
            else:
                emb.to(target)
            if hasattr(emb, "device"):
                emb.device = target
        elif phase is Phase.CLIP:
            clip = self.i2v_clip
            if clip is None:
                return
            clip.model.to(device)
            clip.device = device
        elif phase in (Phase.VAE_ENCODE, Phase.VAE_DECODE):
            vae = self.first_stage_model
            if isinstance(vae, nn.Module):
                vae.to(device)
                return
            vae.model.to(device)
            vae.mean, vae.std = vae.mean.to(device), vae.std.to(device)
            vae.scale = [vae.mean, 1.0 / vae.std]
            vae.device = device
        else:
            if self._block_swap is not None:
                if device.type == "cpu":
                    self._block_swap.release_all()
                return
            self.model.to(device)

    def _swap_text_encoder(self, emb, device: torch.device) -> None:
        """Attach (GPU) or detach (CPU) a block swap over T5's blocks, ``block_swap`` in T5's hook registry."""
        from .placement import offload
        from .placement.registry import HookRegistry

        t5 = emb.model
        hooks = HookRegistry.of(t5)
        if device.type == "cuda" and "block_swap" not in hooks:
            offload.BlockSwap(t5, offload.groups_from_modulelists(t5, ["blocks"]), device,
                              resident_groups=0, mode="stream").attach()
        elif device.type == "cpu" and "block_swap" in hooks:
            hooks.remove("block_swap")

    @contextlib.contextmanager
    def phase(self, name: Phase) -> Iterator[torch.device]:
        """Run one :class:`~scail_win.phases.Phase` on the compute device (ValueError for another name).

        The component comes to the compute device for the phase and goes
        back to the CPU after it, unless the plan keeps it resident (the DiT
        on a card that holds it); GPU memory is collected at every boundary.
        """
        phase = Phase(name)
        device = self.compute_device
        if device.type == "cpu":
            keep = True
        elif self.memory_plan is None:
            # No plan (--offload none): upstream's placement, DiT and VAE stay.
            keep = phase in (Phase.DENOISE, Phase.VAE_ENCODE, Phase.VAE_DECODE)
        else:
            keep = phase in self.memory_plan.resident_phases
        self.current_phase = phase  # named in an out-of-memory message
        self._move_component(phase, device)
        try:
            yield device
            self.current_phase = None
        finally:
            if not keep:
                self._move_component(phase, torch.device("cpu"))
            if device.type == "cuda":
                # sat's modules hold reference cycles: only the collector
                # frees their GPU memory. (On the CPU a collection frees
                # nothing for the next phase and costs ~0.4 s.)
                gc.collect()
                torch.cuda.empty_cache()

    # -- first stage ------------------------------------------------------------

    def _vae_call(self, phase: Phase, x: torch.Tensor) -> torch.Tensor:
        from .model import vae_tiling
        vae = self.first_stage_model
        if x.device.type == "cpu" and isinstance(getattr(vae, "dtype", None), torch.dtype):
            # WanVAE autocasts on CUDA only; on the CPU the input must already be in its dtype.
            x = x.to(vae.dtype)
        op = phase.vae_op
        plan = self.memory_plan
        kwargs = plan.vae_tile_kwargs_for(op) if plan is not None else {}
        if kwargs:
            return getattr(vae_tiling, f"tiled_{op}")(vae, x, **kwargs)
        return getattr(vae, op)(x)

    @torch.no_grad()
    def decode_first_stage(self, z):
        z = 1.0 / self.scale_factor * z
        n_samples = self.en_and_decode_n_samples_a_time or z.shape[0]
        outs = [self._vae_call(Phase.VAE_DECODE, z[i:i + n_samples]) for i in range(0, z.shape[0], n_samples)]
        return torch.cat(outs, dim=0)

    @torch.no_grad()
    def encode_first_stage(self, x, batch, force_encode=False):
        if not force_encode and self.latent_input:
            return x * self.scale_factor
        n_samples = self.en_and_decode_n_samples_a_time or x.shape[0]
        outs = [self._vae_call(Phase.VAE_ENCODE, x[i:i + n_samples]) for i in range(0, x.shape[0], n_samples)]
        z = self.scale_factor * torch.cat(outs, dim=0)
        if _model_parallel_size() > 1 or _sequence_parallel_size() > 1:
            from sat import mpu
            torch.distributed.broadcast(z, src=mpu.get_data_broadcast_src_rank(),
                                        group=mpu.get_data_broadcast_group())
        return z

    @torch.no_grad()
    def clip_features(self, videos: torch.Tensor) -> torch.Tensor:
        """CLIP visual features of ``videos`` (B C T H W in [-1, 1]), as upstream computes them.

        Upstream's ``CLIPModel.visual`` relies on CUDA autocast to run its
        fp16 weights on the bf16 frames. CPU autocast cannot stand in (fp16
        mode rejects bf16 inputs, and CPU layer norms refuse fp16 weights on
        fp32 inputs), so on the CPU CLIP runs in fp32 and its features are
        returned in the dtype the GPU path gives.
        """
        clip = self.i2v_clip
        if videos.device.type != "cpu":
            return clip.visual(videos)
        clip.model.float()
        return clip.visual(videos.float()).to(clip.dtype)

    # -- sampling -----------------------------------------------------------------

    def initial_noise(self, batch_size: int, shape) -> torch.Tensor:
        """The starting latents, drawn exactly as upstream draws them (CPU RNG)."""
        return torch.randn(batch_size, *shape).to(torch.float32).to(self.compute_device)

    def sigmas(self, x: torch.Tensor, cond, uc):
        """Upstream sampler's schedule and prepared inputs: (x, s_in, sigmas, cond, uc)."""
        x, s_in, sigmas, num_sigmas, cond, uc, *_ = self.sampler.prepare_sampling_loop(x, cond, uc)
        return x, s_in, sigmas, cond, uc

    def sampling_settings(self) -> Tuple[str, Optional[float]]:
        """The solver name and schedule shift this run asked for (``--sampler``, ``--shift``)."""
        sampling = run_config.of(self.args).sampling
        return sampling.sampler, sampling.shift

    def _schedule(self, sigmas: torch.Tensor, shift: Optional[float]) -> torch.Tensor:
        """Upstream's sigmas, or the same shifted schedule with another ``shift``."""
        if shift is None:
            return sigmas
        from .samplers import flow_sigmas
        return flow_sigmas(len(sigmas) - 1, shift).to(sigmas.device)

    @torch.no_grad()
    def sample(self, cond: Dict, uc: Union[Dict, None] = None, batch_size: int = 16,
               shape: Union[None, Tuple, List] = None, prefix=None, concat_images=None,
               ofs=None, fps=None, tile_indices=None, *, start_step: int = 0,
               start_latents: Optional[torch.Tensor] = None, solver_state: Optional[Dict] = None,
               step_callback: Optional[Callable] = None, **kwargs):
        """Denoise from noise (or from ``start_latents`` at ``start_step``).

        With ``args.sampler`` euler (the default) and guidance above 1, each
        step is upstream's own ``sampler_step``. Otherwise the velocity comes
        from upstream's ``denoise`` (CFG through its guider) -- or, at
        guidance 1, from the conditional pass alone (the guided result is
        then the conditional one: half the work) -- and the chosen
        :mod:`scail_win.samplers` solver takes the step. ``solver_state``
        restores a multistep solver's history on resume.
        ``step_callback(i, n, x, solver)`` runs after step ``i`` of ``n``.
        """
        from . import samplers

        if tile_indices is not None:
            raise NotImplementedError("tiled long-video sampling (RFSamplerLong) is not supported")
        randn = self.initial_noise(batch_size, shape)
        if prefix is not None:
            randn = torch.cat([prefix, randn[:, prefix.shape[1]:]], dim=1)
        sp_size = _sequence_parallel_size()
        chunk_dim = None
        if _model_parallel_size() > 1 or sp_size > 1:
            randn, chunk_dim = self._scatter_for_sequence_parallel(randn, shape, cond, uc, sp_size)

        def denoiser(input, sigma, c, **extra):
            return self.denoiser(self.model, input, sigma, c, concat_images=concat_images,
                                 chunk_dim=chunk_dim, **extra)

        x, s_in, sigmas, cond, uc = self.sigmas(randn, cond, uc)
        name, shift = self.sampling_settings()
        sigmas = self._schedule(sigmas, shift)
        if start_latents is not None:
            x = start_latents.to(device=x.device, dtype=x.dtype)
        n = len(sigmas) - 1
        scale = float(self.sampler.guider.scale)
        cond_only = scale == 1.0 and not getattr(self.sampler, "distill", False)
        upstream_steps = name == "euler" and not cond_only
        solver = samplers.make_solver(name, sigmas)
        if solver_state:
            solver.load_state_dict(solver_state)
        cache = getattr(self, "step_cache", None)
        with self.phase(Phase.DENOISE):
            for i in range(start_step, n):
                if cache is not None:
                    cache.begin_step(i, n)
                sigma, next_sigma = s_in * sigmas[i], s_in * sigmas[i + 1]
                if upstream_steps:
                    x = self.sampler.sampler_step(sigma, next_sigma, denoiser, x, cond, uc)
                else:
                    x = solver.step(i, x, self._velocity(x, sigma, denoiser, cond, uc, scale, cond_only))
                if step_callback is not None:
                    step_callback(i, n, x, solver)
        if cache is not None:
            log.info("%s", cache.summary())
        samples = x.to(self.dtype)
        if sp_size > 1:
            samples = self._gather_from_sequence_parallel(samples, chunk_dim, sp_size)
        return samples

    def _velocity(self, x, sigma, denoiser, cond, uc, scale: float, cond_only: bool) -> torch.Tensor:
        """The guided velocity at ``sigma`` in float32, as upstream's sampler computes it."""
        if cond_only:
            # Upstream's own distill path: the conditional batch alone.
            return denoiser(x, sigma, cond, cfg_scale=scale).to(torch.float32)
        return self.sampler.denoise(x, denoiser, sigma, cond, uc).to(torch.float32)

    def _scatter_for_sequence_parallel(self, randn, shape, cond, uc, sp_size):
        """Multi-process path: upstream's broadcast of the noise and split of the inputs."""
        from sat import mpu
        torch.distributed.broadcast(randn, src=mpu.get_data_broadcast_src_rank(),
                                    group=mpu.get_data_broadcast_group())
        if sp_size == 1:
            return randn, None
        rank = mpu.get_sequence_parallel_rank()
        h, w = shape[-2:]
        chunk_dim = 3 if h < w else 4
        randn = torch.chunk(randn, sp_size, dim=chunk_dim)[rank]
        for key in ("concat", "concat_images", "ref_concat", "concat_pose",
                    "concat_smpl_render", "concat_cheek_hands", "smpl_tiled"):
            if key in cond:
                dim = chunk_dim + 1 if key == "smpl_tiled" else chunk_dim
                uc[key] = torch.chunk(uc[key], sp_size, dim=dim)[rank]
                cond[key] = torch.chunk(cond[key], sp_size, dim=dim)[rank]
        return randn, chunk_dim

    def _gather_from_sequence_parallel(self, samples, chunk_dim, sp_size):
        from sat import mpu
        rank = mpu.get_sequence_parallel_rank()
        gather_list = [torch.zeros_like(samples) for _ in range(sp_size)] if rank == 0 else None
        torch.distributed.gather(samples, dst=mpu.get_sequence_parallel_src_rank(),
                                 gather_list=gather_list, group=mpu.get_sequence_parallel_group())
        return torch.cat(gather_list, dim=chunk_dim) if rank == 0 else samples


def _fused_rope_available() -> bool:
    try:
        importlib.import_module("scail_win.model.kernels.rope3d")
    except ImportError:
        return False
    return True
