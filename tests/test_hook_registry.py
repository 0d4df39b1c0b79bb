"""The hook registry: rank order whatever the add order, removal in any order, exact restoration."""
from __future__ import annotations

import itertools
import types

import pytest
import torch
from torch import nn

from scail_win.model.kernels.fp8_linear import install_fp8_linears
from scail_win.placement.registry import RANKS, HookRegistry
from scail_win.model.loader import _SplitCFG, place_dit
from scail_win.placement.offload import BlockSwap, scail_layer_groups
from scail_win.model.step_cache import install_step_cache
from test_lean_layer import fp32_dit, install_lean_layers, make_inputs, run, scail
from test_memory import Wrapper
from test_offload import Doubled, halve, inputs, make_sat, snapshot

__all__ = ["fp32_dit", "scail"]  # test_lean_layer's fixtures, used here
STEPS = 3
DIT_HOOKS = ("block_swap", "step_cache", "fp8_linears")


def add(model, name, threshold=0.0):
    """Install one real hook by its registry name (the swap's masters doubled: a stale read shows)."""
    if name == "block_swap":
        return BlockSwap(model, scail_layer_groups(model), "cpu", resident_groups=2, mode="stream",
                         source=Doubled(), materialize=halve).attach()
    if name == "step_cache":
        return install_step_cache(model, threshold, warmup=1)
    if name == "fp8_linears":
        # fp32 weights: the hook runs each linear's own forward.
        return install_fp8_linears(model, {"embed.weight", "head.weight"})
    raise KeyError(name)


def steps(model):
    """Outputs of a few sampling steps (begin_step first when a step cache is on)."""
    x, emb = inputs()
    cache = HookRegistry.of(model).get("step_cache")
    outs = []
    with torch.no_grad():
        for i in range(STEPS):
            if cache is not None:
                cache.begin_step(i, STEPS)
            outs.append(model(x + 0.01 * i, emb))
    return outs


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def assert_tensors_restored(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (tensor, device, dtype, _) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1:3] == (device, dtype)


def tables(model):
    return dict(model.hooks), dict(model.transformer.hooks)


@pytest.mark.parametrize("order", list(itertools.permutations(DIT_HOOKS)))
def test_the_add_order_does_not_change_the_chain_or_the_output(order):
    reference = steps(make_sat())
    model = make_sat()
    for name in order:
        add(model, name)
    registry = HookRegistry.of(model)
    assert registry.names() == ["fp8_linears", "block_swap", "step_cache"]
    assert_same(steps(model), reference)
    cache = registry.get("step_cache")
    # The cache is outermost in both of sat's tables; the swap's trigger is under it.
    assert model.hooks["layer_forward"] is cache and model.transformer.hooks["layer_forward"] is cache
    assert cache._inner is not model.mixins["ada"].layer_forward
    swap = registry.get("block_swap")
    assert swap.stats.hits + swap.stats.misses > 0


@pytest.mark.parametrize("order", list(itertools.permutations(DIT_HOOKS)))
def test_removal_in_any_order_restores_the_exact_original(order):
    model = make_sat()
    reference = steps(model)
    original = model.hooks["layer_forward"]
    before_tables, before_tensors = tables(model), snapshot(model)
    for name in DIT_HOOKS:
        add(model, name)
    steps(model)
    registry = HookRegistry.of(model)
    for i, name in enumerate(order):
        registry.remove(name)
        assert registry.names() == [n for n in ["fp8_linears", "block_swap", "step_cache"] if n not in order[:i + 1]]
        assert_same(steps(model), reference)
    assert tables(model) == before_tables and model.hooks["layer_forward"] is original
    assert model.transformer.hooks["layer_forward"] is original
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_tensors_restored(model, before_tensors)


def test_a_skipping_cache_stays_outside_the_swap_whatever_the_order():
    """Skipped layers never enter the swap: the cache wraps it even when added first."""
    results = []
    for order in (("block_swap", "step_cache"), ("step_cache", "block_swap")):
        model = make_sat()
        hooks = {name: add(model, name, threshold=1e9) for name in order}
        results.append((steps(model), hooks["block_swap"].stats.hits + hooks["block_swap"].stats.misses,
                        hooks["step_cache"].skipped))
    (out_a, entered_a, skipped_a), (out_b, entered_b, skipped_b) = results
    assert_same(out_a, out_b)
    assert skipped_a == skipped_b == 1 and entered_a == entered_b
    alone = make_sat()
    swap = add(alone, "block_swap")
    steps(alone)
    assert entered_a < swap.stats.hits + swap.stats.misses  # the skipped layers were not swapped in


def test_remove_all_and_removing_through_each_hook():
    model = make_sat()
    original = model.hooks["layer_forward"]
    hooks = [add(model, name) for name in DIT_HOOKS]
    registry = HookRegistry.of(model)
    hooks[0].detach()  # the swap, from under the step cache
    assert registry.names() == ["fp8_linears", "step_cache"]
    assert model.hooks["layer_forward"] is hooks[1] and hooks[1]._inner is original
    hooks[1].remove()
    hooks[1].remove()  # a second remove does nothing
    registry.remove_all()
    assert registry.names() == [] and model.hooks["layer_forward"] is original
    assert not hooks[0].attached
    hooks[0].detach()  # already off: nothing to do


def test_split_cfg_comes_off_the_forward_exactly():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    c = {"crossattn": torch.randn(2, 5, 3, generator=g), "ref": torch.randn(1, 3, generator=g)}
    extra = torch.randn(2, 3, generator=g)
    net = Wrapper()
    full = net(x, t, dict(c), scale=2.0, extra=extra)
    registry = HookRegistry.of(net)
    registry.add(_SplitCFG())
    assert isinstance(net.__dict__["forward"], _SplitCFG)
    net.seen.clear()
    assert torch.equal(net(x, t, dict(c), scale=2.0, extra=extra), full) and net.seen == [1, 1]
    registry.remove("split_cfg")
    assert "forward" not in net.__dict__
    # An instance forward that was there before comes back as it was.
    own = net.forward

    def traced(*args, **kwargs):
        return own(*args, **kwargs)

    net.forward = traced
    registry.add(_SplitCFG())
    net.seen.clear()
    assert torch.equal(net(x, t, dict(c), scale=2.0, extra=extra), full) and net.seen == [1, 1]
    registry.remove_all()
    assert net.__dict__["forward"] is traced


def test_a_duplicate_name_is_a_clear_error_and_changes_nothing():
    model = make_sat()
    reference = steps(model)
    swap = add(model, "block_swap")
    add(model, "step_cache")
    before = tables(model)
    with pytest.raises(ValueError, match="a hook named 'step_cache' is already on this ToySat; remove it first"):
        add(model, "step_cache")
    with pytest.raises(ValueError, match="'block_swap' is already on"):
        add(model, "block_swap")
    assert tables(model) == before and swap.attached
    assert HookRegistry.of(model).names() == ["block_swap", "step_cache"]
    assert_same(steps(model), reference)


def test_unknown_names_and_foreign_changes_are_refused():
    model = make_sat()
    registry = HookRegistry.of(model)
    with pytest.raises(KeyError, match="no hook named 'lean_layers' on this ToySat"):
        registry.remove("lean_layers")
    with pytest.raises(ValueError, match="unknown hook 'mine'"):
        registry.add(types.SimpleNamespace(name="mine", slot=None))
    add(model, "step_cache")
    model.hooks["layer_forward"] = model.mixins["ada"].layer_forward
    with pytest.raises(RuntimeError, match="replaced outside its hook registry"):
        add(model, "block_swap")
    assert registry.names() == ["step_cache"]


def test_a_failing_install_leaves_nothing_behind():
    model = make_sat()
    original = model.hooks["layer_forward"]
    before = snapshot(model)
    groups = scail_layer_groups(model)
    stranger = type(groups[0])("stranger", [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="not part of the model"):
        BlockSwap(model, groups + [stranger], "cpu").attach()
    assert HookRegistry.of(model).names() == [] and model.hooks["layer_forward"] is original
    assert_tensors_restored(model, before)


def test_the_registry_is_one_per_module_and_not_part_of_its_state():
    model = make_sat()
    assert HookRegistry.find(model) is None
    registry = HookRegistry.of(model)
    assert HookRegistry.of(model) is registry and HookRegistry.find(model) is registry
    keys = set(make_sat().state_dict())
    add(model, "step_cache")
    assert set(model.state_dict()) == keys and registry not in list(model.modules())


def test_every_rank_is_distinct():
    assert len(set(RANKS.values())) == len(RANKS)


def test_placement_undo_leaves_later_hooks_on():
    model = make_sat()
    reference = steps(model)
    plan = types.SimpleNamespace(layer_chunk_tokens=None, offload_mode="stream", blocks_on_gpu=2, num_layers=6,
                                 prefetch=1)
    placement = place_dit(model, plan, torch.device("cpu"))  # no AdaLN DiT: lean layers are skipped
    assert placement.lean is None and placement.swap is not None
    cache = install_step_cache(model, 0.0, warmup=1)
    assert HookRegistry.of(model).names() == ["block_swap", "step_cache"]
    placement.undo()
    assert HookRegistry.of(model).names() == ["step_cache"] and model.hooks["layer_forward"] is cache
    assert_same(steps(model), reference)


@pytest.mark.scail
@pytest.mark.parametrize("order", [("lean_layers", "block_swap", "step_cache"),
                                   ("step_cache", "block_swap", "lean_layers")])
def test_lean_layers_stay_innermost_on_the_dit(fp32_dit, order):
    from scail_win.placement import offload

    inputs_ = make_inputs("fp32", 1)
    reference = run(fp32_dit, inputs_)
    original = fp32_dit.hooks["layer_forward"]
    for name in order:
        if name == "lean_layers":
            install_lean_layers(fp32_dit, 64)
        elif name == "block_swap":
            offload.BlockSwap(fp32_dit, offload.scail_layer_groups(fp32_dit), "cpu", resident_groups=0,
                              mode="stream").attach()
        else:
            install_step_cache(fp32_dit, 0.0, warmup=0)
    registry = HookRegistry.of(fp32_dit)
    assert registry.names() == ["lean_layers", "block_swap", "step_cache"]
    registry.get("step_cache").begin_step(0, 2)
    with torch.no_grad():
        assert torch.equal(fp32_dit(**inputs_), reference)
    for name in reversed(order):
        registry.remove(name)
    assert fp32_dit.hooks["layer_forward"] is original
