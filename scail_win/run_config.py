"""The options of one scail-win run, typed and checked once: :class:`RunConfig`.

Both ways into a run end here: the sample CLI's options
(:meth:`RunConfig.from_cli`) and upstream-style ``args`` from
:func:`scail_win.arguments.get_args`, whose values come from flags or from
the config's ``args:`` section (:meth:`RunConfig.from_args`). Each field's
default and value parser live in its declaration below; the parsers are also
the ``type=`` of the matching flags, so a flag, a config value and a field
are checked by the same code. The upstream ``args`` carry the result as
``args.run_config``; :func:`of` reads it.

Options upstream owns (``model_config``, ``sampling_image_size``,
``fp16``/``bf16``, ``load``, ...) stay on the upstream ``args`` only.

This module imports neither torch nor omegaconf: the CLI's ``--help`` stays cheap.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Mapping, Optional, Tuple

from .errors import UserError

DEFAULT_SEED = 1234  # sat's --seed default, which upstream's parser inherits
# How often the denoising state is saved (steps): a state is ~10 MB at
# 512x896x81, and 5 of 50 steps is a few minutes of work on an 8 GB card.
DEFAULT_SAVE_EVERY = 5
SAMPLER_CHOICES = ("euler", "unipc", "dpmpp_2m")
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "sage")
#: The attribute of upstream-style ``args`` that holds their RunConfig.
ATTRIBUTE = "run_config"

# Where an option travels in upstream-style args (the field's ``kind``):
OURS = "ours"           # a scail-win flag of upstream's parser (add_scail_win_args)
UPSTREAM = "upstream"   # a flag upstream's parser has of its own
RUN = "run"             # an attribute the sample CLI adds to the args, not a flag
CONFIG = "config"       # goes into the model config / sampling_image_size, not onto the args

#: Options that change the sampled latents beyond upstream's settings and
#: join a job's resume fingerprint when not at their defaults. (rope_mode is
#: left out, as it always was: a resumed run keeps its fingerprint.)
FINGERPRINT_OPTIONS = ("sampler", "shift", "step_cache", "attention", "fp8_matmul")


# ---------------------------------------------------------------- value parsers
#
# Each takes a flag's text or a config's (YAML) value and returns the typed
# value, or raises argparse.ArgumentTypeError (argparse shows it as a usage
# error; RunConfig turns it into a UserError naming the flag).


def boolean(text) -> bool:
    # Upstream used type=bool, for which "False" is true; accept the obvious words.
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "null", "none", ""))


def positive_or_auto(value, what: str) -> Optional[float]:
    if is_auto(value):
        return None
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive {what} or 'auto', got {value!r}")
    return number


def gigabytes(value) -> Optional[float]:
    return positive_or_auto(value, "number of GB")


def block_count(value) -> Optional[int]:
    if is_auto(value):
        return None
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a whole number of blocks or 'auto', got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number of blocks or 'auto', got {value!r}") from None
    if number < 0 or isinstance(value, float) and value != number:
        raise argparse.ArgumentTypeError(f"expected a whole number of blocks (0 or more) or 'auto', got {value!r}")
    return number


def choice(*allowed: str):
    def convert(value) -> str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off as a boolean
            value = "on" if value else "off"
        text = str(value).strip().lower()
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(allowed)}; got {value!r}")
        return text
    convert.__name__ = "one of " + "|".join(allowed)
    return convert


def optional_dir(value) -> Optional[str]:
    return None if is_auto(value) else str(value)


def positive_shift(value) -> Optional[float]:
    return positive_or_auto(value, "number")


def threshold(value) -> float:
    """A step-cache threshold: 0 (or off/none) turns the cache off."""
    if is_auto(value) or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return 0.0
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a threshold such as 0.1, or 0/off, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite threshold of 0 or more, got {value!r}")
    return number


def lora_list(value) -> list:
    """``lora`` values: one ``FILE[:STRENGTH]`` string or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise argparse.ArgumentTypeError(f"expected FILE[:STRENGTH] or a list of them, got {value!r}")


def _whole(value, least: int, what: str) -> int:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if number < least or isinstance(value, float) and value != number:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def optional_positive_int(value) -> Optional[int]:
    return None if value is None else _whole(value, 1, "a whole number of at least 1")


def non_negative_int(value) -> int:
    return _whole(value, 0, "a whole number of 0 or more")


def positive_seed(value) -> Optional[int]:
    return None if value is None else _whole(value, 1, "a positive whole number")


def optional_scale(value) -> Optional[float]:
    if value is None:
        return None
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {value!r}")
    return number


def height_width(value) -> Optional[Tuple[int, int]]:
    """(height, width) in pixels, or None (the config's)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise argparse.ArgumentTypeError(f"expected (height, width), got {value!r}")
    return (_whole(value[0], 1, "a positive height"), _whole(value[1], 1, "a positive width"))


def text(value) -> str:
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        raise argparse.ArgumentTypeError(f"expected a folder name, got {value!r}")
    return str(value)


def paths(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


# ---------------------------------------------------------------- the config


def _option(default, parse, kind: str = OURS):
    return field(default=default, metadata={"parse": parse, "kind": kind})


def flag_name(name: str) -> str:
    """``vram_budget`` -> ``--vram-budget``."""
    return "--" + name.replace("_", "-")


class _Group:
    """A frozen group of options; every value is parsed (and so checked) as the group is made.

    Lists (as the parsers return them for args) are held as tuples.
    """

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                parsed = f.metadata["parse"](value)
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"{flag_name(f.name)} {value}: {exc}") from None
            object.__setattr__(self, f.name, tuple(parsed) if isinstance(parsed, list) else parsed)


@dataclass(frozen=True)
class Memory(_Group):
    """Where weights and activations live (:mod:`scail_win.model.loader`'s memory plan)."""
    vram_budget: Optional[float] = _option(None, gigabytes)     # GB; None: from free GPU memory
    blocks_on_gpu: Optional[int] = _option(None, block_count)   # None: as many as the budget allows
    ram_budget: Optional[float] = _option(None, gigabytes)      # GB; None: from free RAM
    t5_cpu: bool = _option(False, boolean)
    offload: str = _option("auto", choice("auto", "none"))
    vae_tiling: str = _option("auto", choice("on", "off", "auto"))


@dataclass(frozen=True)
class Sampling(_Group):
    """What is sampled and how; None leaves the value to the config."""
    seed: Optional[int] = _option(DEFAULT_SEED, positive_seed, UPSTREAM)
    steps: Optional[int] = _option(None, optional_positive_int, CONFIG)
    cfg_scale: Optional[float] = _option(None, optional_scale, CONFIG)
    resolution: Optional[Tuple[int, int]] = _option(None, height_width, CONFIG)  # (height, width)
    max_frames: Optional[int] = _option(None, optional_positive_int, RUN)
    sampler: str = _option("euler", choice(*SAMPLER_CHOICES))
    shift: Optional[float] = _option(None, positive_shift)
    lora: Tuple[str, ...] = _option((), lora_list)             # FILE[:STRENGTH] each


@dataclass(frozen=True)
class Numerics(_Group):
    """How the DiT's arithmetic is done."""
    rope_mode: str = _option("fp32", choice("exact", "fp32"))
    attention: str = _option("auto", choice(*ATTENTION_CHOICES))
    fp8_matmul: bool = _option(False, boolean)
    step_cache: float = _option(0.0, threshold)                 # 0: off


@dataclass(frozen=True)
class IO(_Group):
    """Files read and written, and what the run reports."""
    base: Tuple[str, ...] = _option((), paths, UPSTREAM)      # config files; empty: the packaged one
    weights: Optional[str] = _option(None, optional_dir)        # None: config's, $SCAIL_WEIGHTS, ./SCAIL-Preview
    output_dir: str = _option("samples", text, UPSTREAM)
    embed_cache: Optional[str] = _option(None, optional_dir)    # None: the per-user cache; "off"
    save_every: int = _option(DEFAULT_SAVE_EVERY, non_negative_int, RUN)  # 0: never
    resume: bool = _option(False, boolean, RUN)
    quiet: bool = _option(False, boolean, RUN)
    smoke: bool = _option(False, boolean, RUN)


_GROUPS = {"memory": Memory, "sampling": Sampling, "numerics": Numerics, "io": IO}
#: option name -> (group attribute, dataclass field)
_FIELDS = {f.name: (group, f) for group, cls in _GROUPS.items() for f in fields(cls)}


def names(*kinds: str) -> Tuple[str, ...]:
    """The option names of the given kinds (all without any), in declaration order."""
    return tuple(name for name, (_, f) in _FIELDS.items() if not kinds or f.metadata["kind"] in kinds)


def parser_of(name: str):
    """The value parser of option ``name`` (the ``type=`` of its flag)."""
    return _FIELDS[name][1].metadata["parse"]


def default(name: str):
    """The default of option ``name``."""
    return _FIELDS[name][1].default


@dataclass(frozen=True)
class RunConfig:
    """Every scail-win option of one run, typed, checked and frozen."""
    memory: Memory = field(default_factory=Memory)
    sampling: Sampling = field(default_factory=Sampling)
    numerics: Numerics = field(default_factory=Numerics)
    io: IO = field(default_factory=IO)

    @classmethod
    def from_options(cls, values: Mapping) -> "RunConfig":
        """From option names to values; a missing or None value takes the default."""
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown run options: {', '.join(sorted(unknown))}")
        grouped = {group: {} for group in _GROUPS}
        for name, value in values.items():
            if value is not None:
                grouped[_FIELDS[name][0]][name] = value
        return cls(**{group: _GROUPS[group](**kwargs) for group, kwargs in grouped.items()})

    @classmethod
    def from_cli(cls, opts: argparse.Namespace) -> "RunConfig":
        """From ``scail-win sample``'s options, once :func:`scail_win.cli.sample.prepare` resolved them.

        ``--fast`` is already in ``steps`` and ``cfg_scale`` by then.
        """
        return cls.from_options({name: getattr(opts, name, None) for name in _FIELDS})

    @classmethod
    def from_args(cls, args) -> "RunConfig":
        """From upstream-style ``args`` (flags and the config's ``args:`` merged, as get_args makes them).

        What the args lack takes the default. ``steps``, ``cfg_scale`` and
        ``resolution`` stay None: upstream's args keep them in the config.
        """
        return cls.from_options({name: getattr(args, name, None) for name in names(OURS, UPSTREAM, RUN)})

    def options(self) -> dict:
        """Option name -> value, flat."""
        return {name: getattr(getattr(self, group), name) for name, (group, _) in _FIELDS.items()}

    def with_options(self, **values) -> "RunConfig":
        """A copy with the named options changed (checked like any other value); None restores a default."""
        options = self.options()
        options.update(values)
        return RunConfig.from_options(options)

    def updated_from(self, args) -> "RunConfig":
        """This config with the flag values upstream-style ``args`` hold (the configs' ``args:`` merged in)."""
        return self.with_options(**{name: getattr(args, name, None) for name in names(OURS, UPSTREAM)})

    def non_default_numerics(self) -> dict:
        """The :data:`FINGERPRINT_OPTIONS` not at their defaults, for a job's resume fingerprint."""
        values = self.options()
        return {name: values[name] for name in FINGERPRINT_OPTIONS if values[name] != default(name)}


def of(args) -> RunConfig:
    """The RunConfig of upstream-style ``args``: the attached one, else made from them once and attached."""
    config = vars(args).get(ATTRIBUTE)
    if config is None:
        config = RunConfig.from_args(args)
        setattr(args, ATTRIBUTE, config)
    return config
