"""Named, ordered, removable patches on a model: one :class:`HookRegistry` per module.

Lean layers, the block swap, the step cache, fp8 linears and split CFG each
patch a model. Each is a hook object with a ``name`` (one of :data:`RANKS`),
a ``slot`` (what it wraps: :data:`LAYER_FORWARD`, sat's layer hook, or
:data:`FORWARD`, the module's own forward; None for a hook that only changes
other things, such as the weights' placement) and three methods:

* ``on_add(module)``: set up (move weights, patch submodules); may set ``slot``;
* ``wrap(inner)``: the callable to put in the slot around ``inner``; called
  again whenever a hook inside it comes or goes, so it must only rebind;
* ``on_remove(module)``: undo ``on_add``.

The registry composes every slot from its original callable, innermost rank
first, on every change, so hooks may be added and removed in any order and
removing the last one restores the exact original (sat's two hook tables,
``module.hooks`` and ``module.transformer.hooks``, alike). Ideas from
diffusers' ``HookRegistry`` and ComfyUI's model patcher: every patch is
recorded and reversible.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

LAYER_FORWARD = "layer_forward"
FORWARD = "forward"

# Innermost first on a slot. Lean layers replace upstream's layer body; the
# block swap brings a layer's weights in before that body runs; the step
# cache decides before the swap, so a skipped layer streams nothing in;
# split CFG wraps the network's forward; fp8 linears patch the linears.
RANKS = {
    "fp8_linears": 0,
    "lean_layers": 10,
    "block_swap": 20,
    "step_cache": 30,
    "split_cfg": 40,
}

_ATTR = "_scail_hook_registry"


class HookRegistry:
    """The hooks on one module, in rank order; see the module docstring."""

    def __init__(self, module):
        self.module = module
        self._hooks: Dict[str, object] = {}
        self._base: Dict[str, Optional[Callable]] = {}  # slot -> what it held before any hook
        self._top: Dict[str, Callable] = {}  # slot -> what the registry put there

    @classmethod
    def of(cls, module) -> "HookRegistry":
        """The module's registry, created on first use."""
        registry = cls.find(module)
        if registry is None:
            registry = cls(module)
            # Not an attribute nn.Module tracks: no state dict entry, no submodule.
            module.__dict__[_ATTR] = registry
        return registry

    @staticmethod
    def find(module) -> Optional["HookRegistry"]:
        """The module's registry, or None when nothing was ever added."""
        return module.__dict__.get(_ATTR)

    # -- what is installed ------------------------------------------------------

    def names(self) -> List[str]:
        """Installed hook names, innermost first."""
        return [h.name for h in self._ordered()]

    def get(self, name: str):
        return self._hooks.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._hooks

    def original(self, slot: str) -> Optional[Callable]:
        """What ``slot`` holds without any hook (sat's layer hook, or None for the class forward)."""
        if slot in self._base:
            return self._base[slot]
        return self._read(slot)

    # -- changes ---------------------------------------------------------------------

    def add(self, hook):
        """Install ``hook`` at its rank; ValueError for a duplicate or unknown name."""
        name = hook.name
        if name not in RANKS:
            raise ValueError(f"unknown hook {name!r}; known: {', '.join(RANKS)}")
        if name in self._hooks:
            raise ValueError(f"a hook named {name!r} is already on this {type(self.module).__name__}; "
                             f"remove it first")
        self._check_untouched()
        hook.on_add(self.module)
        self._hooks[name] = hook
        try:
            self._compose()
        except BaseException:
            del self._hooks[name]
            self._compose()
            hook.on_remove(self.module)
            raise
        return hook

    def remove(self, name: str) -> None:
        """Take ``name`` off (any order); KeyError when it is not installed."""
        if name not in self._hooks:
            raise KeyError(f"no hook named {name!r} on this {type(self.module).__name__} "
                           f"(installed: {', '.join(self.names()) or 'none'})")
        self._check_untouched()
        hook = self._hooks.pop(name)
        self._compose()
        hook.on_remove(self.module)

    def remove_all(self) -> None:
        """Take every hook off, outermost first."""
        for name in reversed(self.names()):
            self.remove(name)

    # -- slots ------------------------------------------------------------------------

    def _ordered(self) -> list:
        return sorted(self._hooks.values(), key=lambda h: (RANKS[h.name], h.name))

    def _tables(self) -> list:
        """sat's hook tables: the model's and its transformer's copy (refreshed each forward)."""
        tables = []
        for owner in (self.module, getattr(self.module, "transformer", None)):
            hooks = getattr(owner, "hooks", None)
            if isinstance(hooks, dict) and not any(hooks is t for t in tables):
                tables.append(hooks)
        return tables

    def _read(self, slot: str) -> Optional[Callable]:
        if slot == LAYER_FORWARD:
            hooks = getattr(self.module, "hooks", None)
            return hooks.get(LAYER_FORWARD) if isinstance(hooks, dict) else None
        if slot == FORWARD:
            return self.module.__dict__.get("forward")
        raise ValueError(f"unknown hook slot {slot!r}")

    def _write(self, slot: str, previous: Optional[Callable], new: Optional[Callable]) -> None:
        if slot == LAYER_FORWARD:
            for table in self._tables():
                # A table still holding an older callable than ``previous``
                # is refreshed by sat itself at the next forward.
                if table.get(LAYER_FORWARD) is previous:
                    table[LAYER_FORWARD] = new
        elif new is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = new

    def _inner(self, slot: str) -> Callable:
        base = self._base[slot]
        if slot == FORWARD and base is None:
            return type(self.module).forward.__get__(self.module)
        if slot == LAYER_FORWARD and not callable(base):
            raise ValueError(f"{type(self.module).__name__} has no sat layer_forward hook to wrap")
        return base

    def _check_untouched(self) -> None:
        for slot, top in self._top.items():
            if self._read(slot) is not top:
                raise RuntimeError(f"the {slot} of this {type(self.module).__name__} was replaced outside its "
                                   f"hook registry (which holds {', '.join(self.names())}); undo that first")

    def _compose(self) -> None:
        ordered = self._ordered()
        for slot in (LAYER_FORWARD, FORWARD):
            on_slot = [h for h in ordered if h.slot == slot]
            previous = self._top.get(slot, self._read(slot))
            if not on_slot:
                if slot in self._base:
                    self._write(slot, previous, self._base.pop(slot))
                    del self._top[slot]
                continue
            if slot not in self._base:
                self._base[slot] = self._read(slot)
            chain = self._inner(slot)
            for hook in on_slot:
                chain = hook.wrap(chain)
            self._write(slot, previous, chain)
            self._top[slot] = chain
