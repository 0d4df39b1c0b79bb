"""Every attribute scail-win replaces in upstream code or torch, in one registry.

A :class:`Patch` names its target as ``"module.path:Attribute"`` (or
``"module.path:Class.attribute"``), says in one line why it exists, and
builds its replacement from the original. It is applied only for a block
(:meth:`Patch.applied`) or as an :meth:`Patch.install` / :meth:`Installed.revert`
pair, and always puts back exactly what was there: the same object, or no
entry at all when a class attribute was inherited. A target that is
missing is refused with one line naming it and the SCAIL / sat versions in
use (:class:`PatchTargetMissing`), never skipped in silence.

:data:`REGISTRY` lists them all; ``python -m scail_win doctor`` checks each
target against a SCAIL checkout (:func:`check_targets`) without importing
SCAIL's code. This module imports neither torch nor SCAIL: targets are
resolved when a patch is applied.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

from ..errors import UserError

_MISSING = object()
#: The top-level names a SCAIL checkout provides.
UPSTREAM_PACKAGES = ("dit_video_crossattn_sc_xc", "sat", "sgm")


class PatchTargetMissing(UserError):
    """A patch's target does not exist in the upstream code or torch that is running."""


@dataclass(frozen=True)
class Patch:
    """One replaced attribute.

    ``make_replacement(installed, *args)`` gives what is put in its place;
    ``installed`` (an :class:`Installed`) holds the ``original`` and can
    ``suspended()`` the patch for the replacement's own calls.
    """

    name: str
    target: str
    make_replacement: Callable[..., object]
    why: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def in_scail_tree(self) -> bool:
        """Whether the target is SCAIL's code (its DiT module, vendored sat or sgm), not torch's."""
        return self.module.partition(".")[0] in UPSTREAM_PACKAGES

    @property
    def attribute_path(self) -> Tuple[str, ...]:
        return tuple(self.target.partition(":")[2].split("."))

    def _owner(self):
        """The object holding the attribute, imported now; PatchTargetMissing when there is none."""
        try:
            owner = importlib.import_module(self.module)
        except ImportError as e:
            raise self._missing(f"module {self.module} not importable ({e})") from e
        for part in self.attribute_path[:-1]:
            owner = getattr(owner, part, _MISSING)
            if owner is _MISSING:
                raise self._missing(f"{self.module} has no {part}")
        if not hasattr(owner, self.attribute_path[-1]):
            raise self._missing(f"{self.target} does not exist")
        return owner

    def _missing(self, reason: str) -> PatchTargetMissing:
        from .versions import running_versions, supported_summary

        return PatchTargetMissing(f"scail-win patch {self.name!r} cannot be applied: {reason} "
                                  f"(running {running_versions()}; scail-win supports {supported_summary()})")

    def install(self, *args) -> "Installed":
        """Replace the target now; the returned handle's ``revert()`` puts the original back."""
        owner = self._owner()
        return Installed(self, owner, self.attribute_path[-1], args)

    @contextlib.contextmanager
    def applied(self, *args) -> Iterator["Installed"]:
        """The replacement is in place inside the block, the original after it (also on an exception)."""
        installed = self.install(*args)
        try:
            yield installed
        finally:
            installed.revert()


class Installed:
    """One application of a :class:`Patch`: what was there, and what is there now."""

    def __init__(self, patch: Patch, owner, attribute: str, args: tuple) -> None:
        self.patch = patch
        self._owner = owner
        self._attribute = attribute
        # A class's own entry (kept as stored: staticmethod stays staticmethod);
        # _MISSING when the class inherits it, so reverting deletes ours.
        if isinstance(owner, type):
            self._saved = vars(owner).get(attribute, _MISSING)
        else:
            self._saved = getattr(owner, attribute)
        self.original = getattr(owner, attribute)
        self.replacement = patch.make_replacement(self, *args)
        self._active = True
        setattr(owner, attribute, self.replacement)

    def _put_back(self) -> None:
        if self._saved is _MISSING:
            delattr(self._owner, self._attribute)
        else:
            setattr(self._owner, self._attribute, self._saved)

    def revert(self) -> None:
        """Put the original back (a second call does nothing)."""
        if self._active:
            self._active = False
            self._put_back()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The original is in place inside the block, the replacement again after it."""
        self._put_back()
        try:
            yield
        finally:
            setattr(self._owner, self._attribute, self.replacement)


# -- the replacements ---------------------------------------------------------------


def _cpu_device(installed):
    return lambda: "cpu"


def _single_process_mixin(installed):
    from ..model.kernels.attention import make_single_process_mixin_class
    return make_single_process_mixin_class()


def _norm(path) -> str:
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def _mapped_torch_load(installed, files: Dict[str, Path]):
    from ..weights import checkpoint as weights

    original = installed.original
    mapping = {_norm(k): Path(v) for k, v in files.items()}

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and _norm(f) in mapping:
            # The reader opens .pt files with torch.load itself: give it the real one.
            with installed.suspended():
                with weights.open_state_dict(mapping[_norm(f)]) as source:
                    return {name: source[name] for name in source}
        return original(f, *args, **kwargs)

    return load


def _assigning_load_state_dict(installed):
    original = installed.original

    def load_state_dict(module, state_dict, strict=True, assign=False):
        current = module.state_dict(keep_vars=True)
        cast = {}
        for name, tensor in state_dict.items():
            own = current.get(name)
            if own is not None and tensor.is_floating_point() and tensor.dtype != own.dtype:
                tensor = tensor.to(own.dtype)
            cast[name] = tensor
        return original(module, cast, strict=strict, assign=True)

    return load_state_dict


def _return_tensor(tensor, *args, **kwargs):
    return tensor


def _no_init(installed):
    return _return_tensor


def _noop(self) -> None:
    return None


def _no_reset(installed):
    return _noop


def _meta_register_parameter(installed):
    original = installed.original

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    return register_parameter


# -- the registry -------------------------------------------------------------------

CUDA_DEVICE_DEFAULT = Patch(
    "cuda-device-default", "torch.cuda:current_device", _cpu_device,
    "sgm's umt5 and clip evaluate device=torch.cuda.current_device() as a default at import; "
    "without CUDA that raises (only while importing them on a machine without CUDA)")
SINGLE_PROCESS_ATTENTION = Patch(
    "single-process-attention", "dit_video_crossattn_sc_xc:UlyessAttentionMixin", _single_process_mixin,
    "with one process, attention skips the Ulysses all-to-all collectives and runs on the --attention kernel")
MAPPED_TORCH_LOAD = Patch(
    "mapped-torch-load", "torch:load", _mapped_torch_load,
    "T5/CLIP/VAE torch.load their config paths: read the weights folder's files safely and memory-mapped")
ASSIGNING_LOAD_STATE_DICT = Patch(
    "assigning-load-state-dict", "torch.nn:Module.load_state_dict", _assigning_load_state_dict,
    "while building T5/CLIP/VAE: assign the mapped tensors (cast to each parameter's dtype), no second copy")

# Initialisers that sat, sgm and torch.nn layers call while building.
INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
    "kaiming_normal_", "orthogonal_", "sparse_",
)
SKIP_INIT = tuple(
    Patch(f"skip-init:{name}", f"torch.nn.init:{name}", _no_init,
          "the checkpoint overwrites every weight: random initialisation is wasted time")
    for name in INIT_FUNCTIONS
) + tuple(
    Patch(f"skip-reset:{cls}", f"torch.nn:{cls}.reset_parameters", _no_reset,
          "the checkpoint overwrites every weight: the layer's own initialisation is wasted time")
    for cls in ("Linear", "Conv3d", "Conv2d")
)
META_PARAMETERS = Patch(
    "meta-parameters", "torch.nn:Module.register_parameter", _meta_register_parameter,
    "build the DiT on meta (no storage) for the weights loader; buffers stay real")

REGISTRY: Dict[str, Patch] = {p.name: p for p in (
    CUDA_DEVICE_DEFAULT, SINGLE_PROCESS_ATTENTION, MAPPED_TORCH_LOAD, ASSIGNING_LOAD_STATE_DICT,
    *SKIP_INIT, META_PARAMETERS)}


@contextlib.contextmanager
def all_applied(patches, *args) -> Iterator[None]:
    """Every patch of ``patches`` applied (same ``args``), reverted in reverse order."""
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch.applied(*args))
        yield


# -- checking targets in a SCAIL checkout, without importing it ---------------------


def _module_file(root: Path, module: str) -> Optional[Path]:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(body, path: Tuple[str, ...]) -> bool:
    """Whether ``path`` (a name, then class attributes) is defined in a module or class body."""
    name, rest = path[0], path[1:]
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return not rest or _defines(node.body, rest)
        if rest:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
                and node.target.id == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) \
                and any((a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
    return False


def check_target(patch: Patch, scail_root: Optional[Path]) -> Optional[str]:
    """None when ``patch``'s target exists, else why not.

    SCAIL's code is read from ``scail_root``, not imported (it needs its own
    dependencies); torch is imported.
    """
    if not patch.in_scail_tree:
        try:
            patch._owner()
        except PatchTargetMissing:
            return f"{patch.target} does not exist"
        return None
    if scail_root is None:
        return "no SCAIL checkout to look in"
    source = _module_file(scail_root, patch.module)
    if source is None:
        return f"{patch.module} not found in {scail_root}"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        return f"{source}: cannot read ({e})"
    return None if _defines(tree.body, patch.attribute_path) else f"{patch.target} not defined in {source}"


def check_targets(scail_root: Optional[Path]) -> Dict[str, Optional[str]]:
    """Each registered patch's name -> None when its target exists, else why not."""
    return {name: check_target(patch, scail_root) for name, patch in REGISTRY.items()}
