"""Drop-in for SCAIL's ``arguments.py``: flags, config merging, process group.

Same public functions, flags and config merging as upstream's module (the
``--base`` YAML files are merged with OmegaConf; their ``args:`` section sets
flags, ``model:`` becomes ``args.model_config``), plus:

* ``--base`` may be left out: the packaged ``wan_pose_14Bsc_xc_cli.yaml`` is
  used. A ``--base`` path that does not exist but names a packaged config
  file uses the packaged one.
* Weight paths written ``${weights:relative/path}`` resolve to absolute paths
  inside the weights folder: ``--weights``, else ``args: weights`` in the
  config, else ``$SCAIL_WEIGHTS``, else ``./SCAIL-Preview``.
* scail-win's memory and speed options (:func:`add_scail_win_args`).
* A flag given on the command line wins over the config's ``args:`` section
  (upstream let the config win silently); unknown ``args:`` keys are named in
  a warning instead of being dropped silently; a missing or malformed config
  is a :class:`~scail_win.errors.UserError`.
* DeepSpeed is optional: its flags exist when it imports, and
  ``args.deepspeed_config`` always exists.
* One process (``WORLD_SIZE`` unset or 1) gets a process group without any
  network rendezvous: an in-process store and gloo bound to the loopback
  address (works on Windows, opens no port on a public interface, cannot
  hang waiting for peers). Under torchrun with ``WORLD_SIZE`` > 1, upstream's
  path is kept: tcp:// rendezvous, ``--distributed-backend`` (NCCL by default)
  and sat's model/sequence-parallel groups.

This module imports neither torch, sat nor omegaconf at import time, so
parsers and config helpers are cheap for ``--help`` paths; sat is imported
by the functions that need it, whichever sat is on the path (SCAIL's vendored
copy or PyPI's SwissArmyTransformer; their differences are feature-detected).
"""
from __future__ import annotations

import argparse
import contextvars
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

from . import run_config
from .errors import UserError
from .run_config import ATTENTION_CHOICES, SAMPLER_CHOICES

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

PACKAGED_CONFIG = "wan_pose_14Bsc_xc_cli.yaml"
WEIGHTS_ENV = "SCAIL_WEIGHTS"
DEFAULT_WEIGHTS_DIR = "SCAIL-Preview"
#: The process-group backend of a single process: gloo on 127.0.0.1.
LOCAL_BACKEND = "scail_gloo_local"
#: OmegaConf resolver name: ``${weights:umt5-xxl}``.
WEIGHTS_RESOLVER = "weights"

PathLike = Union[str, "os.PathLike[str]"]

# The weights folder while a config is being resolved (None: look it up).
_weights_root: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar(
    "scail_win_weights_root", default=None)

# Names upstream's module re-exports from sat; imported on first access.
_SAT_REEXPORTS = {
    "mpu": ("sat.mpu", None),
    "print_rank0": ("sat.helpers", "print_rank0"),
    "print_all": ("sat.helpers", "print_all"),
}


def __getattr__(name: str):
    if name in _SAT_REEXPORTS:
        module, attr = _SAT_REEXPORTS[name]
        imported = importlib.import_module(module)
        return imported if attr is None else getattr(imported, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# scail-win's options (flag text or config value -> typed value), parsed as a RunConfig parses them.
_SCAIL_WIN_TYPES = {name: run_config.parser_of(name) for name in run_config.names(run_config.OURS)}


# ------------------------------------------------------------------ parsers


def add_model_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Upstream's model flags: --base, parallel sizes, device and model type."""
    group = parser.add_argument_group("model", "model configuration")
    group.add_argument("--base", type=str, nargs="*",
                       help=f"config YAML files, merged in order (default: the packaged {PACKAGED_CONFIG})")
    group.add_argument("--model-parallel-size", type=int, default=1,
                       help="size of the model parallel. only use if you are an expert.")
    group.add_argument("--sequence-parallel-size", type=int, default=1,
                       help="size of the sequence parallel. only use if you are an expert.")
    group.add_argument("--force-pretrain", action="store_true")
    group.add_argument("--device", type=int, default=-1,
                       help="CUDA device index; -1 picks LOCAL_RANK (or the CPU without a GPU)")
    group.add_argument("--debug", action="store_true")
    group.add_argument("--log-image", type=run_config.boolean, default=True)
    group.add_argument("--model-type", type=str, default="dit")
    group.add_argument("--num-multi-query-heads", type=int, default=0,
                       help="use multi-query attention, num of kv groups. 0 means multi-head attention.")
    return parser


def add_sampling_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Upstream's sampling flags."""
    group = parser.add_argument_group("sampling", "Sampling Configurations")
    flags = [
        ("--output-dir", dict(type=str, default="samples")),
        ("--input-dir", dict(type=str, default=None)),
        ("--input-type", dict(type=str, default="cli")),
        ("--input-file", dict(type=str, default="input.txt")),
        ("--sampling-image-size", dict(type=int, default=1024)),
        ("--final-size", dict(type=int, default=2048)),
        ("--sdedit", dict(action="store_true")),
        ("--grid-num-rows", dict(type=int, default=1)),
        ("--force-inference", dict(action="store_true")),
        ("--lcm_steps", dict(type=int, default=None)),
        ("--sampling-num-frames", dict(type=int, default=32)),
        ("--sampling-fps", dict(type=int, default=8)),
        ("--only-save-latents", dict(action="store_true")),
        ("--only-log-video-latents", dict(action="store_true")),
        ("--latent-channels", dict(type=int, default=32)),
        # Upstream's type=list split the text into characters; take T H W.
        ("--vae-compress-size", dict(type=int, nargs=3, default=None, metavar=("T", "H", "W"))),
        ("--image2video", dict(action="store_true")),
        ("--horizontal-only", dict(action="store_true")),
        ("--use_pose", dict(type=run_config.boolean, default=False)),
        ("--representation", dict(type=str, default="dwpose")),
        ("--save_tag", dict(type=str, default="default")),
        ("--multi_cond_cfg", dict(type=run_config.boolean, default=False)),
    ]
    for flag, options in flags:
        group.add_argument(flag, **options)
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """sat's training flags (mode, seed, load, precision, ...), from the sat in use."""
    return _sat_arguments().add_training_args(parser)


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """sat's evaluation flags."""
    return _sat_arguments().add_evaluation_args(parser)


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """sat's data flags."""
    return _sat_arguments().add_data_args(parser)


def add_scail_win_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """scail-win's flags; each can also be set under ``args:`` in a config.

    Types and defaults are the :class:`~scail_win.run_config.RunConfig` fields'.
    Every default keeps upstream's behaviour on a GPU with room for the model.
    """
    group = parser.add_argument_group("scail-win", "memory and speed options of scail-win")

    def add(name: str, **options) -> None:
        if options.get("action") is not argparse.BooleanOptionalAction:
            options.setdefault("type", run_config.parser_of(name))
        options.setdefault("default", run_config.default(name))
        group.add_argument(run_config.flag_name(name), **options)

    add("weights", metavar="DIR",
        help=f"weights folder for ${{{WEIGHTS_RESOLVER}:...}} paths in the config "
             f"(default: ${WEIGHTS_ENV}, else ./{DEFAULT_WEIGHTS_DIR})")
    add("vram_budget", metavar="GB", help="GPU memory scail-win may use, in GB (default: auto, from free memory)")
    add("blocks_on_gpu", metavar="N",
        help="transformer blocks kept on the GPU, the rest streamed per step "
             "(default: auto, as many as --vram-budget allows)")
    add("ram_budget", metavar="GB",
        help="host RAM for weights held in memory, in GB (default: auto, from free RAM)")
    add("t5_cpu", action=argparse.BooleanOptionalAction,
        help="run the umT5 text encoder on the CPU (about 11 GB less GPU memory, slower)")
    add("vae_tiling", metavar="{on,off,auto}",
        help="tiled VAE encode/decode; auto tiles only when the video would not fit (default: auto)")
    add("rope_mode", metavar="{fp32,exact}",
        help="3D RoPE arithmetic: fp32 rounds once (more accurate), exact reproduces "
             "upstream's bf16 rounding bit for bit (default: fp32)")
    add("embed_cache", metavar="DIR",
        help="folder for cached text embeddings, or 'off' (default: scail-win's cache folder)")
    add("offload", metavar="{auto,none}",
        help="auto: place weights on GPU/CPU from the budgets, all resident when they fit; "
             "none: keep components where upstream puts them (default: auto)")
    add("sampler", metavar="{" + ",".join(SAMPLER_CHOICES) + "}",
        help="ODE solver: euler is upstream's (bit for bit); unipc and dpmpp_2m reach "
             "euler-50 quality in about 20-25 steps (default: euler)")
    add("shift", metavar="S", help="sigma schedule shift (default: the config's shift_scale, 5)")
    # Repeated: each --lora appends one FILE[:STRENGTH]; None when none is given.
    add("lora", type=str, action="append", default=None, metavar="FILE[:STRENGTH]",
        help="merge a LoRA (safetensors; diffusers, kohya/ComfyUI or diff naming) into the "
             "DiT at load; repeat for several (default strength 1)")
    add("attention", metavar="{" + ",".join(ATTENTION_CHOICES) + "}",
        help="attention kernel: auto picks SageAttention or flash-attn where installed and "
             "working, else PyTorch SDPA (default: auto)")
    add("fp8_matmul", action=argparse.BooleanOptionalAction,
        help="with fp8 weights on a GPU with fp8 tensor cores (RTX 40xx+, sm 8.9+), multiply "
             "in fp8 instead of upcasting the weights (faster, slightly less exact)")
    add("step_cache", metavar="THRESHOLD",
        help="reuse the DiT's work on steps whose first block changes less than THRESHOLD "
             "(relative); 0 turns it off; about 0.05-0.1 is a usual setting (default: 0)")
    return parser


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The parser :func:`get_args` uses: upstream's flag groups, scail-win's, DeepSpeed's if installed."""
    if parser is None:
        parser = argparse.ArgumentParser(description="sat")
    elif not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"parser must be an argparse.ArgumentParser, not {type(parser).__name__}")
    add_model_config_args(parser)
    add_sampling_config_args(parser)
    add_training_args(parser)
    add_evaluation_args(parser)
    add_data_args(parser)
    add_scail_win_args(parser)
    deepspeed = _deepspeed()
    if deepspeed is not None:
        deepspeed.add_config_arguments(parser)
    else:
        # Upstream code reads (and sample_video deletes) these two.
        parser.set_defaults(deepspeed=False, deepspeed_config=None)
    _escape_stray_percent(parser)
    return parser


def _escape_stray_percent(parser: argparse.ArgumentParser) -> None:
    # sat's --warmup help says "1% of all": argparse formats help with %, so --help crashed upstream.
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = re.sub(r"%(?![(%])", "%%", action.help)


def _flags_given(parser: argparse.ArgumentParser, args_list: Optional[Sequence[str]]) -> frozenset:
    """Destinations set on the command line (argparse fills in only the missing ones)."""
    # A marker per destination: the flag replaces it when given. Appending
    # flags (--lora) copy what they find and append to the copy, so theirs is a list.
    unset = {action.dest: [] if isinstance(action, (argparse._AppendAction, argparse._AppendConstAction,
                                                    argparse._ExtendAction)) else object()
             for action in parser._actions if action.dest != argparse.SUPPRESS}
    probe = argparse.Namespace(**unset)
    parser.parse_args(args_list, namespace=probe)
    return frozenset(dest for dest, marker in unset.items() if getattr(probe, dest) is not marker)


# ------------------------------------------------------------------ configs


def _packaged_config_dir() -> Path:
    try:
        from importlib.resources import files
        root = files("scail_win.configs")
    except ModuleNotFoundError:
        # A source tree: the package maps scail_win.configs to <repo>/configs only once installed.
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(os.fspath(root))


def packaged_config_names() -> list:
    """File names of the configs shipped with scail-win."""
    folder = _packaged_config_dir()
    return sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []


def packaged_config_path(name: str = PACKAGED_CONFIG) -> Path:
    """Path of a config shipped with scail-win (installed package or source tree)."""
    if not name or Path(name).name != name:
        raise ValueError(f"a packaged config is named by its file name, not a path: {name!r}")
    path = _packaged_config_dir() / name
    if not path.is_file():
        available = ", ".join(packaged_config_names()) or "none"
        raise UserError(f"no packaged config named {name} (packaged: {available}); reinstall scail-win")
    return path


def resolve_weights_dir(weights: Optional[PathLike] = None) -> Path:
    """The weights folder as an absolute path: ``weights``, else $SCAIL_WEIGHTS, else ./SCAIL-Preview."""
    chosen = os.fspath(weights) if weights not in (None, "") else ""
    if not chosen:
        chosen = os.environ.get(WEIGHTS_ENV, "") or DEFAULT_WEIGHTS_DIR
    # abspath, not resolve(): keep the user's drive letters and links as given.
    return Path(os.path.abspath(os.path.expanduser(chosen)))


def _weights_resolver(relative: str = "") -> str:
    root = _weights_root.get()
    if root is None:
        root = resolve_weights_dir()
    return str(root / relative) if relative else str(root)


@functools.lru_cache(maxsize=None)
def _omegaconf():
    """omegaconf's OmegaConf, with the ``weights`` resolver registered (once; the name is ours)."""
    from omegaconf import OmegaConf
    # omegaconf 2.4 renamed register_new_resolver to register_resolver, whose
    # 2.3 meaning (the old string-only API) had no `replace`.
    register = OmegaConf.register_resolver
    if "replace" not in inspect.signature(register).parameters:
        register = OmegaConf.register_new_resolver
    register(WEIGHTS_RESOLVER, _weights_resolver, replace=True)
    return OmegaConf


def _config_paths(base: Optional[Iterable[PathLike]]) -> list:
    entries = [os.fspath(entry) for entry in (base or [])]
    if not entries:
        path = packaged_config_path()
        log.info("no --base given: using the packaged config %s", path)
        return [path]
    packaged = {name.casefold(): name for name in packaged_config_names()}
    paths = []
    for entry in entries:
        path = Path(os.path.expanduser(entry))
        if path.is_file():
            paths.append(path)
        elif path.exists():
            raise UserError(f"--base {entry}: not a file; give the path of a YAML config")
        elif path.name.casefold() in packaged:
            replacement = packaged_config_path(packaged[path.name.casefold()])
            log.info("--base %s not found: using the packaged config %s", entry, replacement)
            paths.append(replacement)
        else:
            raise UserError(f"--base {entry}: config file not found (relative paths start in {Path.cwd()})")
    return paths


def _load_one(path: Path):
    import yaml
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf = _omegaconf()
    try:
        config = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UserError(f"config {path} is not valid YAML ({where}{exc.problem or exc.context}); fix the file") from None
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise UserError(f"config {path} cannot be read: {_first_line(exc)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"config {path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(config, DictConfig):
        raise UserError(f"config {path} must be a mapping of sections (args:, model:), not a list or value")
    for section in ("args", "model"):
        node = config.get(section)
        if node is not None and not isinstance(node, DictConfig):
            raise UserError(f"config {path}: section {section}: must be a mapping of keys to values")
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_merged(base: Optional[Iterable[PathLike]], weights: Optional[PathLike]):
    """Merged, resolved config; the config files used; the weights folder."""
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf = _omegaconf()
    paths = _config_paths(base)
    names = ", ".join(str(p) for p in paths)
    configs = [_load_one(path) for path in paths]
    try:
        config = OmegaConf.merge(*configs)
    except OmegaConfBaseException as exc:
        raise UserError(f"configs {names} cannot be merged: {_first_line(exc)}") from None
    if weights in (None, ""):
        # The config may name the folder; --weights (passed in) wins over it.
        args_node = config.get("args")
        configured = args_node.get("weights") if args_node is not None else None
        weights = configured if isinstance(configured, str) and configured else None
    root = resolve_weights_dir(weights)
    token = _weights_root.set(root)
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as exc:
        raise UserError(f"config {names}: {_first_line(exc)}") from None
    finally:
        _weights_root.reset(token)
    if "args" not in config or config.args is None:
        config.args = {}
    config.args.weights = str(root)
    return config, paths, root


def load_config(base: Optional[Iterable[PathLike]] = None, weights: Optional[PathLike] = None) -> "DictConfig":
    """Merge config files as ``--base`` does (None: the packaged config) with weight paths resolved.

    ``args.weights`` of the result is the absolute weights folder.
    """
    return _load_merged(base, weights)[0]


def process_config_to_args(args: argparse.Namespace, given: Iterable[str] = ()) -> argparse.Namespace:
    """Merge ``args.base`` into ``args``: ``args:`` sets attributes, ``model:`` becomes ``args.model_config``.

    ``given`` names the destinations set on the command line; the config does
    not override those. ``deepspeed:`` becomes ``args.deepspeed_config`` (a
    dict) and ``data:`` ``args.data_config``, as upstream.
    """
    from omegaconf import DictConfig, ListConfig

    OmegaConf = _omegaconf()
    given = frozenset(given)
    config, paths, root = _load_merged(getattr(args, "base", None), getattr(args, "weights", None))
    names = ", ".join(str(p) for p in paths)
    args.base = [str(p) for p in paths]

    section = config.pop("args")
    unknown = []
    for key in section:
        value = section[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_object(value)
        if not hasattr(args, key):
            unknown.append(key)
        elif key in given:
            log.debug("%s: the command line's value wins over the config's %r", key, value)
        elif key in _SCAIL_WIN_TYPES:
            try:
                setattr(args, key, _SCAIL_WIN_TYPES[key](value))
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"config {names}: args: {key}: {exc}") from None
        else:
            setattr(args, key, value)
    if unknown:
        log.warning("config %s: no flag knows args: %s; ignored", names, ", ".join(sorted(unknown)))
    args.weights = str(root)

    if "model" in config:
        args.model_config = config.pop("model")
    if "deepspeed" in config:
        args.deepspeed_config = OmegaConf.to_object(config.pop("deepspeed"))
    if "data" in config:
        args.data_config = config.pop("data")
    return args


# --------------------------------------------------------------- get_args


def get_args(args_list: Optional[Sequence[str]] = None,
             parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Parse flags and configs, start the process group, seed; upstream's entry point.

    ``args.run_config`` is the run's :class:`~scail_win.run_config.RunConfig`.
    """
    parser = build_parser(parser)
    args = parser.parse_args(args_list)
    args = _complete_args(args, given=_flags_given(parser, args_list))
    args.run_config = run_config.RunConfig.from_args(args)
    return args


def _complete_args(args: argparse.Namespace, given: Iterable[str]) -> argparse.Namespace:
    """Parsed flags (``given``: those set explicitly) -> upstream's args: configs merged, process group, seed."""
    args = process_config_to_args(args, given=given)
    _check_training_flags(args)
    _assign_rank_and_device(args)
    _configure_precision_and_deepspeed(args)

    initialize_distributed(args)
    if args.device != "cpu":
        # The index is now the current CUDA device of this process.
        args.device = "cuda"
    if args.seed is not None:
        args.seed = args.seed + _sat_mpu().get_data_parallel_rank()
    set_random_seed(args.seed)
    return args


def _check_training_flags(args: argparse.Namespace) -> None:
    training = args.mode != "inference"
    if training and not args.train_data:
        log.warning("no training data specified (--train-data)")
    if args.train_iters is not None and args.epochs is not None:
        raise UserError("--train-iters and --epochs exclude each other; set only one")
    if args.train_iters is None and args.epochs is None:
        args.train_iters = 10000
        if training:
            log.warning("neither --train-iters nor --epochs given: training for 10000 iterations")
    if args.train_data_weights is not None and len(args.train_data_weights) != len(args.train_data or ()):
        raise UserError("--train-data-weights needs one weight per --train-data entry")
    if args.seed is not None and (not isinstance(args.seed, int) or args.seed <= 0):
        raise UserError(f"--seed must be a positive whole number, not {args.seed!r}")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} must be a whole number") from None


def _assign_rank_and_device(args: argparse.Namespace) -> None:
    """Rank, world size and device as upstream: one CUDA device per local rank, else the CPU."""
    import torch

    args.cuda = torch.cuda.is_available()
    args.rank = _env_int("RANK", 0)
    args.world_size = _env_int("WORLD_SIZE", 1)
    if args.world_size < 1 or not 0 <= args.rank < args.world_size:
        raise UserError(f"RANK={args.rank} and WORLD_SIZE={args.world_size} are inconsistent")
    if args.local_rank is None:
        args.local_rank = _env_int("LOCAL_RANK", 0)

    gpus = torch.cuda.device_count()
    if args.device in (-1, None):
        args.device = args.local_rank if gpus else "cpu"
    index = _cuda_index(args)
    if index is not None:
        if not gpus:
            raise UserError(f"--device {args.device}: this machine has no CUDA GPU")
        if not 0 <= index < gpus:
            raise UserError(f"CUDA device {index} (--device or LOCAL_RANK) does not exist: {gpus} GPU(s) visible")
        if index != args.local_rank and args.mode != "inference":
            raise UserError("LOCAL_RANK and --device differ; only inference allows that "
                            "(select one GPU with CUDA_VISIBLE_DEVICES instead)")
        args.device = index
    if args.rank == 0:
        log.info("using world size: %d", args.world_size)


def _configure_precision_and_deepspeed(args: argparse.Namespace) -> None:
    """Upstream's precision rules and, when training, its DeepSpeed config."""
    if args.fp16 and args.bf16:
        raise UserError("fp16 and bf16 exclude each other (check --fp16/--bf16 and the config's args:)")
    if args.mode != "inference" or args.deepspeed:
        if _deepspeed() is None:
            raise UserError(f"mode {args.mode} with DeepSpeed: DeepSpeed is not installed; "
                            "sampling needs 'mode: inference' in the config's args:")
        args.deepspeed = True
    if args.zero_stage > 0 and not args.fp16 and not args.bf16:
        log.info("ZeRO needs half precision: using fp16")
        args.fp16 = True
    if not args.deepspeed:
        return

    args.deepspeed_activation_checkpointing = bool(args.checkpoint_activations)
    if args.deepspeed_config is None:
        path = Path(_sat_arguments().__file__).parent / "training" / f"deepspeed_zero{args.zero_stage}.json"
        config = _read_json(path, f"--zero-stage {args.zero_stage}")
        # sat's template takes its precision, batch and optimizer settings from the flags.
        config["fp16"]["enabled"] = bool(args.fp16)
        if args.bf16:
            config.setdefault("bf16", {})["enabled"] = True
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        config["optimizer"]["params"].update(lr=args.lr, weight_decay=args.weight_decay)
    else:
        config = args.deepspeed_config
        if not isinstance(config, dict):
            config = _read_json(Path(os.fspath(config)), "--deepspeed_config")
        if args.rank == 0:
            log.info("the DeepSpeed config overrides fp16, bf16, batch size and optimizer flags")
        args.fp16 = bool(config.get("fp16", {}).get("enabled", False))
        args.bf16 = bool(config.get("bf16", {}).get("enabled", False))
        args.batch_size = config.get("train_micro_batch_size_per_gpu", args.batch_size)
        args.gradient_accumulation_steps = config.get("gradient_accumulation_steps")
        params = config.get("optimizer", {}).get("params", {})
        args.lr = params.get("lr", args.lr)
        args.weight_decay = params.get("weight_decay", args.weight_decay)
    args.deepspeed_config = config


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise UserError(f"{what}: cannot read DeepSpeed config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"{what}: DeepSpeed config {path} is not valid JSON: {exc}") from None


# ------------------------------------------------------- process groups


def initialize_distributed(args: argparse.Namespace) -> bool:
    """Start torch.distributed and sat's parallel groups; False if they already existed.

    One process: an in-process store and gloo on 127.0.0.1, world size 1.
    Several (``args.world_size`` > 1, from torchrun): upstream's tcp://
    rendezvous at MASTER_ADDR:MASTER_PORT with ``args.distributed_backend``.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; install an official PyTorch wheel")
    mpu = _sat_mpu()
    index = _cuda_index(args)
    if index is not None:
        torch.cuda.set_device(index)
    if dist.is_initialized():
        if mpu.model_parallel_is_initialized():
            if args.model_parallel_size != mpu.get_model_parallel_world_size():
                raise ValueError("model_parallel_size differs from the model-parallel groups already set up; "
                                 "it cannot change within a process")
            return False
        if args.model_parallel_size > 1:
            log.warning("model_parallel_size > 1 on a process group started outside scail-win: "
                        "make sure its ranks match the model-parallel layout")
        _initialize_parallel_groups(args)
        return True

    world_size = int(getattr(args, "world_size", 1))
    init_method = None
    if world_size == 1:
        _register_local_backend()
        dist.init_process_group(backend=LOCAL_BACKEND, store=dist.HashStore(), rank=0, world_size=1)
        args.distributed_backend = LOCAL_BACKEND
    else:
        backend = args.distributed_backend
        if backend == "nccl" and not dist.is_nccl_available():
            raise UserError("NCCL is not available here (it needs Linux and CUDA); "
                            "run several processes with --distributed-backend gloo, or run one process")
        args.master_ip = os.environ.get("MASTER_ADDR", "localhost")
        args.master_port = os.environ.get("MASTER_PORT", "6000")
        init_method = f"tcp://{args.master_ip}:{args.master_port}"
        options = {}
        if index is not None and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = torch.device("cuda", index)
        dist.init_process_group(backend=backend, world_size=world_size, rank=args.rank,
                                init_method=init_method, **options)
    _initialize_parallel_groups(args)
    _initialize_deepspeed(args, init_method, index)
    return True


def _cuda_index(args: argparse.Namespace) -> Optional[int]:
    device = getattr(args, "device", "cpu")
    if device == "cpu":
        return None
    if isinstance(device, int):
        return device
    text = str(device)
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    if text == "cuda":
        return int(getattr(args, "local_rank", 0) or 0)
    raise ValueError(f"args.device must be 'cpu', 'cuda', 'cuda:N' or a CUDA index, not {device!r}")


def _register_local_backend() -> None:
    """Register gloo bound to 127.0.0.1 as a backend of its own name.

    Plain gloo binds to whatever this machine's host name resolves to: on
    Windows that is a LAN (or VPN) address -- a firewall prompt, or a
    "Socket Timeout" when the address is unusable. One process needs neither.
    """
    import torch.distributed as dist

    if hasattr(dist.Backend, LOCAL_BACKEND.upper()):
        return
    if not dist.is_gloo_available():
        raise UserError("this PyTorch build has no gloo backend; install an official PyTorch wheel")

    def create(store, rank, size, timeout):
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        options._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, size, options)

    extra = {}
    if "devices" in inspect.signature(dist.Backend.register_backend).parameters:
        extra["devices"] = ["cpu", "cuda"]
    dist.Backend.register_backend(LOCAL_BACKEND, create, **extra)


def _initialize_parallel_groups(args: argparse.Namespace) -> None:
    """sat's model/sequence/data-parallel groups and sgm's VAE context-parallel group."""
    mpu = _sat_mpu()
    sizes = (args.model_parallel_size, getattr(args, "sequence_parallel_size", 1),
             getattr(args, "num_multi_query_heads", 0))
    # SCAIL's vendored sat takes (model, sequence, kv groups); PyPI's only the first.
    accepted = len(inspect.signature(mpu.initialize_model_parallel).parameters)
    if accepted < 2 and sizes[1] > 1:
        raise UserError(f"--sequence-parallel-size {sizes[1]} needs SCAIL's vendored sat; "
                        f"the sat in use ({_sat_arguments().__file__}) has no sequence parallelism")
    mpu.initialize_model_parallel(*sizes[:accepted])
    _initialize_context_parallel()


def _initialize_context_parallel() -> None:
    # sgm ships in SCAIL's tree; without it (PyPI sat alone) no VAE needs the group.
    if importlib.util.find_spec("sgm") is None:
        return
    try:
        from sgm import util as sgm_util
    except ImportError as exc:
        log.warning("sgm was found but does not import (%s); its VAE context-parallel group is not set", exc)
        return
    is_ready = getattr(sgm_util, "is_context_parallel_initialized", None)
    if is_ready is None or not is_ready():
        sgm_util.initialize_context_parallel(1)


def _initialize_deepspeed(args: argparse.Namespace, init_method: Optional[str], index: Optional[int]) -> None:
    deepspeed = _deepspeed()
    if deepspeed is None:
        return
    if getattr(args, "deepspeed", False):
        deepspeed.init_distributed(dist_backend=args.distributed_backend, world_size=args.world_size,
                                   rank=args.rank, init_method=init_method)
        return
    if index is None:
        return
    # sat saves the model-parallel RNG state with dropout; DeepSpeed's tracker holds it.
    try:
        from deepspeed.runtime.activation_checkpointing.checkpointing import (
            _CUDA_RNG_STATE_TRACKER, _MODEL_PARALLEL_RNG_TRACKER_NAME)
        _CUDA_RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, 1)
    except Exception as exc:  # upstream treats the tracker as optional (e.g. already registered)
        log.debug("DeepSpeed RNG tracker not set: %s", exc)


def set_random_seed(seed: Optional[int]) -> None:
    """sat's set_random_seed: seeds Python, NumPy and torch; deterministic cuDNN, no TF32.

    Also records the seed for sat's reset_random_seed.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed <= 0):
        raise ValueError(f"seed must be a positive int, not {seed!r}")
    _sat_arguments().set_random_seed(seed)


# ------------------------------------------------------------------ helpers


def _sat_arguments():
    return importlib.import_module("sat.arguments")


def _sat_mpu():
    return importlib.import_module("sat.mpu")


@functools.lru_cache(maxsize=None)
def _deepspeed():
    """The deepspeed module, or None when it is not installed or does not import."""
    if importlib.util.find_spec("deepspeed") is None:
        return None
    try:
        return importlib.import_module("deepspeed")
    except Exception as exc:  # DeepSpeed probes CUDA and compilers on import; sampling must not depend on it
        log.warning("DeepSpeed is installed but does not import (%s); continuing without it", _first_line(exc))
        return None


# --------------------------------------------------------------- scail-win's CLI


def args_from_cli(opts: argparse.Namespace) -> argparse.Namespace:
    """Upstream-style ``args`` for the (prepared) options of ``scail-win sample``."""
    return args_for(run_config.RunConfig.from_cli(opts))


def args_for(config: "run_config.RunConfig") -> argparse.Namespace:
    """Upstream-style ``args`` for ``config``, as get_args makes them, without a command line.

    The options ``config`` sets (not None, not False, not empty) count as
    flags given on the command line, so they win over the configs' ``args:``
    (``base`` empty: the packaged config). ``steps`` and ``cfg_scale`` set the
    sampler's ``num_steps`` and the guider's ``scale``, ``resolution`` the
    ``sampling_image_size``; the run options (``max_frames``, ``save_every``,
    ...) become attributes. ``args.run_config`` is ``config`` with the
    configs' values where it left them open.
    """
    args = build_parser().parse_args([])
    values = config.options()
    given = {name for name in run_config.names(run_config.OURS, run_config.UPSTREAM) if _sets(values[name])}
    for name in given:
        value = values[name]
        setattr(args, name, list(value) if isinstance(value, tuple) else value)
    if not values["base"]:
        args.base = [str(packaged_config_path())]
        given.add("base")
    args = _complete_args(args, given=given)
    sampler = args.model_config.sampler_config.params
    if values["steps"] is not None:
        sampler.num_steps = values["steps"]
    if values["cfg_scale"] is not None:
        sampler.guider_config.params.scale = values["cfg_scale"]
    if values["resolution"] is not None:
        args.sampling_image_size = list(values["resolution"])
    for name in run_config.names(run_config.RUN):
        setattr(args, name, values[name])
    args.run_config = config.updated_from(args)
    return args


def _sets(value) -> bool:
    # Identity, not truth: 0 blocks on the GPU and a 0.0 step-cache threshold are set values.
    return value is not None and value is not False and value != ()
