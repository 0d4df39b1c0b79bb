"""Block swap: run a model whose layers do not all fit on the GPU.

A model's parameters are split into :class:`LayerGroup` s (for SCAIL's DiT:
everything with layer index i).  :class:`BlockSwap` keeps the groups that do
not stay on the GPU in CPU memory and brings each one onto the GPU just
before it computes, copying the next one(s) on a side CUDA stream while the
current one runs.  Offloading a group costs nothing: its parameters are
pointed back at their CPU master copies; nothing is copied GPU -> CPU.

The approach follows diffusers' group offloading (pinned CPU masters,
side-stream prefetch, detachable hooks) with three differences that SCAIL
needs:

* sat never calls ``transformer.layers[i]`` as a module when a mixin defines
  ``layer_forward`` (SCAIL's AdaLN mixin does), and with ``share_adaln`` the
  first thing layer i touches is a raw ``ParameterList`` entry.  So a group is
  entered from a wrapper around sat's ``layer_forward`` hook (keyed by
  ``layer_id``) and, for ordinary models, from forward pre-hooks on every
  module that owns group tensors.
* The prefetch order is learned from the calls actually made (a successor
  map), so layers called in another order than they were built still
  prefetch correctly after one pass; a miss falls back to a synchronous load.
* Pinned masters are packed into one buffer per group and page-locked with
  ``cudaHostRegister`` (PyTorch's pinned allocator rounds every block up to a
  power of two, up to 2x the RAM for a 30 GiB model).

Modes: ``"pinned"`` keeps one pinned master of every offloaded group (fastest,
needs RAM for the offloaded weights); ``"stream"`` leaves the masters where
the weight source has them (plain or memory-mapped CPU tensors) and copies
each group through a few pinned staging buffers sized to the largest group.

Stream ordering on CUDA (no host synchronisation in pinned mode):
  * a load first makes the copy stream wait for the compute stream, so memory
    the allocator hands back from a released group is only overwritten after
    the kernels that read it have run;
  * copies run on the copy stream, which records an event per group;
  * entering a group makes the compute stream wait for that event before the
    group's parameters are pointed at the copies.

With ``device="cpu"`` the same machinery runs without streams (the "GPU copy"
is a CPU clone), which is what the CPU tests exercise.  Inference only.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Byte alignment of each tensor packed into a host buffer: any dtype can be
# viewed at such an offset and copies stay vectorised.
_ALIGN = 256


class WeightSource(Protocol):
    """Where the CPU master of a tensor comes from.

    ``master_for`` gets the tensor's qualified name and the tensor as the
    model holds it, and returns a CPU tensor with the weights to use (for
    example a memory-mapped fp8 tensor from a safetensors file).  The model
    still defines shapes; the master may have another dtype if the
    ``materialize`` function given to :class:`BlockSwap` converts it.
    """

    def master_for(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


Materialize = Callable[["torch.Tensor", "torch.device", str], "torch.Tensor"]
"""``materialize(src, device, name) -> tensor on device``.

Called on the copy stream; must return a new tensor (never a view of
``src``, which may be a staging buffer reused for the next group)."""


class ModelWeights:
    """The default source: the model's own tensors (copied to CPU if needed)."""

    def master_for(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor.data
        return tensor.data.to("cpu")


def copy_to_device(src: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    """The default materialize: a plain (asynchronous from pinned memory) copy."""
    import torch

    out = torch.empty_like(src, device=device)
    out.copy_(src, non_blocking=True)
    return out


class LayerGroup:
    """A named set of parameters and buffers that moves as one unit.

    ``modules`` contribute all their parameters and buffers (recursively);
    ``tensors`` adds loose ones (e.g. an entry of a ``ParameterList``).
    ``index`` is the layer id sat passes to ``layer_forward`` for this group.
    """

    def __init__(
        self,
        name: str,
        modules: Iterable[nn.Module] = (),
        tensors: Iterable[torch.Tensor] = (),
        index: int | None = None,
    ):
        self.name = name
        self.index = index
        self.modules = tuple(modules)
        seen: set[int] = set()
        collected = []
        for module in self.modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    collected.append(t)
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                collected.append(t)
        self.tensors = tuple(collected)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as currently stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __repr__(self) -> str:
        return f"LayerGroup({self.name!r}, {len(self.tensors)} tensors, {self.nbytes / 2**20:.1f} MiB)"


def _resolve_list(model: nn.Module, item):
    from torch import nn

    if isinstance(item, str):
        item = model.get_submodule(item)
    if not isinstance(item, (nn.ModuleList, nn.ParameterList, nn.Sequential)):
        raise TypeError(
            f"expected a ModuleList, ParameterList, Sequential or a path to one, got {type(item).__name__}"
        )
    return item


def groups_from_modulelists(model: nn.Module, lists: Sequence, prefix: str = "layer") -> list[LayerGroup]:
    """Group i = entry i of every list (ModuleList/ParameterList/Sequential or its path in ``model``)."""
    from torch import nn

    resolved = [_resolve_list(model, item) for item in lists]
    if not resolved:
        raise ValueError("groups_from_modulelists needs at least one list")
    lengths = {len(lst) for lst in resolved}
    if len(lengths) != 1:
        raise ValueError(f"lists differ in length: {sorted(lengths)}; group i needs entry i of each")
    groups = []
    for i in range(lengths.pop()):
        modules, tensors = [], []
        for lst in resolved:
            entry = lst[i]
            (modules if isinstance(entry, nn.Module) else tensors).append(entry)
        groups.append(LayerGroup(f"{prefix}{i}", modules, tensors, index=i))
    return groups


def per_layer_lists(model: nn.Module) -> list[str]:
    """Paths of the per-layer lists of a sat model, ``transformer.layers`` first.

    Rule: every ModuleList or ParameterList in the model whose length equals
    ``len(model.transformer.layers)`` and that is neither inside a layer nor
    inside another such list is indexed by layer.  In SCAIL these are the
    AdaLN mixin's ``adaLN_modulations`` and its query/key, cross and CLIP
    layer-norm and key/value lists.
    """
    from torch import nn

    transformer = getattr(model, "transformer", None)
    layers = getattr(transformer, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no transformer.layers ModuleList; is it a sat model?")
    num_layers = len(layers)
    paths = {id(m): name for name, m in model.named_modules()}
    layers_path = paths[id(layers)]
    found = [layers_path]
    for name, module in model.named_modules():
        if module is layers or not isinstance(module, (nn.ModuleList, nn.ParameterList)):
            continue
        if len(module) != num_layers:
            continue
        if any(name.startswith(p + ".") for p in found):
            continue
        found.append(name)
    return found


def scail_layer_groups(model: nn.Module) -> list[LayerGroup]:
    """SCAIL's DiT (or any sat model) split into one group per layer; see :func:`per_layer_lists`."""
    lists = per_layer_lists(model)
    log.debug("per-layer lists: %s", ", ".join(lists))
    return groups_from_modulelists(model, lists, prefix="layer")


def resident_indices(num_groups: int, count: int) -> list[int]:
    """Which ``count`` of ``num_groups`` stay on the GPU: spread evenly.

    Spreading them gives the prefetch of the next swapped group the compute
    time of the resident group in between (it matters when copies are slower
    than compute).
    """
    if not 0 <= count <= num_groups:
        raise ValueError(f"resident group count {count} is outside 0..{num_groups}")
    return sorted({int((k + 0.5) * num_groups / count) for k in range(count)})


@dataclass
class SwapStats:
    """Counters for tests and benchmarks."""

    hits: int = 0  # entered a swapped group that was already loaded or in flight
    misses: int = 0  # entered a swapped group that had to be loaded synchronously
    prefetches: int = 0  # loads issued ahead of use
    wasted: int = 0  # prefetched groups released without being used
    bytes_loaded: int = 0


@dataclass
class _Entry:
    tensor: torch.Tensor  # the Parameter or buffer object (its .data is repointed)
    name: str
    device: torch.device  # where it was before attach
    dtype: torch.dtype
    master: torch.Tensor | None = None  # CPU master, for swapped groups
    offset: int = 0  # byte offset in the group's packed host layout


@dataclass
class _Slot:
    tensors: list  # device copies, one per entry of the group
    event: object | None  # CUDA event recorded after the copies
    used: bool = False


@dataclass
class _Staging:
    buffer: torch.Tensor
    event: object | None = None  # last copy out of this buffer


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pack(entries: list[_Entry], tensors: Sequence[torch.Tensor]) -> int:
    """Give each entry an aligned byte offset for ``tensors``; returns the total size."""
    offset = 0
    for e, t in zip(entries, tensors):
        e.offset = offset
        offset += -(-_nbytes(t) // _ALIGN) * _ALIGN
    return offset


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return buffer[offset : offset + _nbytes(like)].view(like.dtype).view(like.shape)


def _host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, int | None, bool]:
    """A uint8 CPU buffer, page-locked when ``pin`` and possible.

    Returns (buffer, pointer to pass to cudaHostUnregister or None, pinned).
    """
    import torch

    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buffer, None, False
    try:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        return buffer, buffer.data_ptr(), True
    except (RuntimeError, AttributeError, AssertionError) as exc:
        log.debug("cudaHostRegister of %d bytes failed: %s", nbytes, exc)
    try:
        # PyTorch's pinned allocator rounds the block up to a power of two.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None, True
    except RuntimeError as exc:
        # Still correct; copies from pageable memory are just slower.
        log.debug("pinned allocation of %d bytes failed: %s", nbytes, exc)
        return buffer, None, False


def _unregister(ptrs: list[int]) -> None:
    import torch

    for ptr in ptrs:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    ptrs.clear()


class BlockSwap:
    """Keep ``groups`` of ``model`` off the GPU except while they compute.

    Args:
        model: the module whose forward will run (its sat ``hooks`` dict, if
            any, gets the ``layer_forward`` trigger).
        groups: the swappable units, e.g. :func:`scail_layer_groups`.
        device: the compute device.
        resident_groups: how many groups stay on the device (spread evenly,
            see :func:`resident_indices`) or an explicit collection of group
            indices.  Tensors outside every group are always resident.
        mode: ``"pinned"`` or ``"stream"`` (see the module docstring).
        prefetch: how many swapped groups to load ahead of the current one;
            device memory holds ``1 + prefetch`` swapped groups at most.
        source: where CPU masters come from (default: the model's tensors).
        materialize: makes the device copy of a master (default: a copy);
            e.g. an fp8 -> bf16 upcaster.
        staging_buffers: pinned staging buffers in stream mode
            (default ``prefetch + 1``, at least 2).

    ``attach()`` places the model (call it after all sat mixins are added);
    tensors already on ``device`` stay as they are.  ``detach()`` restores
    every tensor's device and dtype, holding the weights the model computed
    with (what ``materialize`` makes of each master, so ``materialize`` must
    accept the CPU as ``device`` too).  Do not call ``model.to()`` while
    attached.  Tensors shared between groups are
    rejected; a group tensor used by code outside its group while swapped
    out fails with a device mismatch, not silently.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[LayerGroup],
        device,
        *,
        resident_groups: int | Iterable[int] = 0,
        mode: str = "pinned",
        prefetch: int = 1,
        source: WeightSource | None = None,
        materialize: Materialize | None = None,
        staging_buffers: int | None = None,
    ):
        import torch

        if mode not in ("pinned", "stream"):
            raise ValueError(f"mode must be 'pinned' or 'stream', got {mode!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.model = model
        self.groups = list(groups)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mode = mode
        self.prefetch = prefetch
        self.source = source or ModelWeights()
        self.materialize = materialize or copy_to_device
        n = len(self.groups)
        if isinstance(resident_groups, int):
            resident = resident_indices(n, resident_groups)
        else:
            resident = sorted(set(resident_groups))
            if any(not 0 <= i < n for i in resident):
                raise ValueError(f"resident group indices must be in 0..{n - 1}, got {resident}")
        self.resident = frozenset(resident)
        self.swapped = [i for i in range(n) if i not in self.resident]
        self._n_staging = max(2, prefetch + 1) if staging_buffers is None else staging_buffers
        if self._n_staging < 1:
            raise ValueError(f"staging_buffers must be >= 1, got {staging_buffers}")

        owner: dict[int, int] = {}
        for gi, group in enumerate(self.groups):
            for t in group.tensors:
                if id(t) in owner and owner[id(t)] != gi:
                    raise ValueError(
                        f"a tensor is shared by groups {self.groups[owner[id(t)]].name} and {group.name}"
                    )
                owner[id(t)] = gi
        self._owner = owner
        self.stats = SwapStats()
        self.attached = False
        self.slot = None  # sat's layer hook once attached to a model that has one

    # ------------------------------------------------------------------ attach

    name = "block_swap"

    def attach(self) -> BlockSwap:
        """Place the model and install the triggers (``block_swap`` in its :class:`HookRegistry`)."""
        from .registry import HookRegistry

        if self.attached:
            raise RuntimeError("BlockSwap is already attached")
        HookRegistry.of(self.model).add(self)
        return self

    def on_add(self, model) -> None:
        import torch

        names = {}
        for name, t in list(self.model.named_parameters(remove_duplicate=False)) + list(
            self.model.named_buffers(remove_duplicate=False)
        ):
            if t.is_meta:
                # .data cannot be repointed from meta to real storage.
                raise ValueError(f"{name} is on the meta device; materialize the model (e.g. to_empty) first")
            names.setdefault(id(t), name)
        for group in self.groups:
            for t in group.tensors:
                if id(t) not in names:
                    raise ValueError(f"group {group.name} holds a tensor that is not part of the model")

        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._finalizer.atexit = False
        self._entries: list[list[_Entry]] = []
        self._moved: list[_Entry] = []
        self._slots: dict[int, _Slot] = {}
        self._succ: dict[int, int] = {}
        self._prev: int | None = None
        self._current: int | None = None
        self._staging: list[_Staging] = []
        self._next_staging = 0
        self._handles = []
        self._unpinned = 0
        try:
            self._place(names)
            self._install_triggers()
        except BaseException:
            self._restore()
            raise
        if self._unpinned:
            log.warning(
                "block swap: %d host buffers could not be page-locked; copies from them will be slower",
                self._unpinned,
            )
        self.attached = True
        log.info(
            "block swap: %d of %d groups on %s, %d swapped (%s, prefetch %d)",
            len(self.resident), len(self.groups), self.device, len(self.swapped), self.mode, self.prefetch,
        )

    def _place(self, names: dict[int, str]) -> None:
        import torch

        pin = self._cuda
        with torch.no_grad():
            for gi, group in enumerate(self.groups):
                entries = [_Entry(t, names[id(t)], t.device, t.dtype) for t in group.tensors]
                self._entries.append(entries)
                if gi in self.resident:
                    for e in entries:
                        self._move_resident(e)
                elif self.mode == "pinned" and pin:
                    self._pack_pinned(entries)
                else:
                    for e in entries:
                        master = self.source.master_for(e.name, e.tensor)
                        e.tensor.data = master
                        e.master = master  # set last: restore() trusts it
            for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
                if id(t) not in self._owner:
                    self._move_resident(_Entry(t, name, t.device, t.dtype))
            if self.mode == "stream" and self.swapped:
                size = max(
                    _pack(self._entries[gi], [e.master for e in self._entries[gi]]) for gi in self.swapped
                )
                for _ in range(self._n_staging):
                    self._staging.append(_Staging(self._new_host_buffer(size, pin)))

    def _new_host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        buffer, ptr, pinned = _host_buffer(nbytes, pin)
        if ptr is not None:
            self._registered.append(ptr)
        if pin and nbytes and not pinned:
            self._unpinned += 1
        return buffer

    def _move_resident(self, e: _Entry) -> None:
        if e.tensor.device == self.device:
            return
        e.tensor.data = self.materialize(self.source.master_for(e.name, e.tensor), self.device, e.name)
        self._moved.append(e)

    def _pack_pinned(self, entries: list[_Entry]) -> None:
        masters = [self.source.master_for(e.name, e.tensor) for e in entries]
        buffer = self._new_host_buffer(_pack(entries, masters), pin=True)
        for e, m in zip(entries, masters):
            master = _view(buffer, e.offset, m)
            master.copy_(m)
            e.tensor.data = master
            e.master = master

    def _install_triggers(self) -> None:
        hooked: dict[int, set[int]] = {}
        for gi, group in enumerate(self.groups):
            for module in group.modules:
                for m in module.modules():
                    owns = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
                    if owns:
                        hooked.setdefault(id(m), set()).add(gi)
        for gi, group in enumerate(self.groups):
            done = set()
            for module in group.modules:
                # The group's root modules too: their forward may read a
                # child's weight (its device, say) before calling the child.
                if hooked.get(id(module)) in (None, {gi}):
                    hooked[id(module)] = {gi}
                for m in module.modules():
                    # A module reached from two groups (e.g. one activation
                    # shared by all layers) must not trigger either.
                    if id(m) in done or hooked.get(id(m)) != {gi}:
                        continue
                    done.add(id(m))
                    self._handles.append(m.register_forward_pre_hook(functools.partial(self._pre_hook, gi)))

        from .registry import LAYER_FORWARD

        hooks = getattr(self.model, "hooks", None)
        self._by_layer = {g.index: gi for gi, g in enumerate(self.groups) if g.index is not None}
        if isinstance(hooks, dict) and callable(hooks.get("layer_forward")) and self._by_layer:
            self.slot = LAYER_FORWARD

    def wrap(self, inner):
        """sat's layer hook: enter the layer's group, then run ``inner``."""
        by_layer = self._by_layer

        def layer_forward(*args, **kwargs):
            if "layer_id" in kwargs:
                gi = by_layer.get(int(kwargs["layer_id"]))
                if gi is not None:
                    self._enter(gi)
            return inner(*args, **kwargs)

        return layer_forward

    def _pre_hook(self, gi: int, module, args) -> None:
        self._enter(gi)

    # ------------------------------------------------------------- the swap

    def _enter(self, gi: int) -> None:
        import torch

        if gi == self._current:
            return
        if self._prev is not None:
            self._succ[self._prev] = gi
        self._prev = gi
        self._current = gi
        window = self._window(gi)
        keep = set(window)
        if gi not in self.resident:
            keep.add(gi)
        for other in [g for g in self._slots if g not in keep]:
            self._release(other)
        if gi not in self.resident:
            slot = self._slots.get(gi)
            if slot is None:
                self.stats.misses += 1
                slot = self._slots[gi] = self._load(gi)
            else:
                self.stats.hits += 1
            if slot.event is not None:
                torch.cuda.current_stream(self.device).wait_event(slot.event)
            slot.used = True
            for e, t in zip(self._entries[gi], slot.tensors):
                e.tensor.data = t
        for g in window:
            if g not in self._slots:
                self.stats.prefetches += 1
                self._slots[g] = self._load(g)

    def _window(self, gi: int) -> list[int]:
        """The next ``prefetch`` swapped groups after ``gi`` in the learned order.

        Before a group's successor has been seen, the build order is the guess.
        """
        n = len(self.groups)
        out: list[int] = []
        cur = gi
        for _ in range(n):
            if len(out) >= self.prefetch:
                break
            cur = self._succ.get(cur, (cur + 1) % n)
            if cur == gi:
                break
            if cur not in self.resident and cur not in out:
                out.append(cur)
        return out

    def _load(self, gi: int) -> _Slot:
        import torch

        entries = self._entries[gi]
        self.stats.bytes_loaded += sum(_nbytes(e.master) for e in entries)
        if self.mode == "stream":
            staging = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            if staging.event is not None:
                staging.event.synchronize()  # its previous copy has left the buffer
            sources = []
            for e in entries:
                view = _view(staging.buffer, e.offset, e.master)
                view.copy_(e.master)
                sources.append(view)
        else:
            staging = None
            sources = [e.master for e in entries]
        with torch.no_grad():
            if not self._cuda:
                tensors = [self.materialize(s, self.device, e.name) for s, e in zip(sources, entries)]
                return _Slot(tensors, None)
            # Memory freed by released groups is reused only after the
            # kernels queued so far (which may still read it) have run.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                tensors = [self.materialize(s, self.device, e.name) for s, e in zip(sources, entries)]
                event = torch.cuda.Event()
                event.record(self._stream)
        if staging is not None:
            staging.event = event
        return _Slot(tensors, event)

    def _release(self, gi: int) -> None:
        slot = self._slots.pop(gi)
        if not slot.used:
            self.stats.wasted += 1
        for e in self._entries[gi]:
            e.tensor.data = e.master

    def swapped_masters(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """Name -> (CPU master, owned) for every tensor of the swapped groups.

        Owned masters are copies in host buffers this swap allocated (pinned
        mode on CUDA): they may be changed in place, and later loads copy the
        change.  Other masters are the weight source's tensors (often
        read-only memory-mapped files); change what a load makes of them
        through ``materialize`` instead.
        """
        packed = self.mode == "pinned" and self._cuda
        return {e.name: (e.master, packed) for gi in self.swapped for e in self._entries[gi] if e.master is not None}

    def is_loaded(self, gi: int) -> bool:
        """Whether group ``gi`` is on the device or on its way there."""
        return gi in self.resident or gi in self._slots

    def release_all(self) -> None:
        """Offload every swapped group (e.g. at the end of the DiT phase).

        Freed device memory stays in PyTorch's cache; call
        ``torch.cuda.empty_cache()`` before a phase that needs it.
        """
        for gi in list(self._slots):
            self._release(gi)
        self._current = None

    # ------------------------------------------------------------------ detach

    def detach(self) -> None:
        """Remove the hooks and put every tensor back on its original device and dtype."""
        from .registry import HookRegistry

        if self.attached:
            HookRegistry.of(self.model).remove(self.name)

    def on_remove(self, model) -> None:
        self._restore()
        self.attached = False

    def _restore(self) -> None:
        """Undo whatever :meth:`on_add` has done so far (the registry takes the layer hook off)."""
        import torch

        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self.release_all()
        plain = self.materialize is copy_to_device
        with torch.no_grad():
            for e in self._moved:
                e.tensor.data = e.tensor.data.to(e.device, e.dtype)
            for entries in self._entries:
                for e in entries:
                    if e.master is None:
                        continue
                    # The master is the original (or an equal pinned copy)
                    # unless a source or materialize transforms weights; then
                    # restore what the model computed with, not the master.
                    if not (plain and e.master.device == e.device and e.master.dtype == e.dtype):
                        e.tensor.data = self.materialize(e.master, e.device, e.name).to(e.dtype)
                    e.master = None
        if self._cuda:
            self._stream.synchronize()
        self._finalizer()
        self._staging.clear()
        self._moved.clear()
        self._entries.clear()

    def __enter__(self) -> BlockSwap:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
