"""Block swap on small real models (CPU; one GPU test skips without CUDA).

On the CPU a swapped-out tensor still holds the right values, so a plain
comparison could not notice a tensor used while offloaded.  The tests that
check outputs therefore use a source whose masters hold twice the weights and
a materialize that halves them (exact in fp32): any computation that reads a
master instead of a loaded copy gives a different result.
"""

import pytest
import torch
from torch import nn

from scail_win.placement.offload import (
    BlockSwap,
    LayerGroup,
    groups_from_modulelists,
    per_layer_lists,
    resident_indices,
    scail_layer_groups,
)

D = 16


class Doubled:
    def master_for(self, name, tensor):
        return tensor.data.to("cpu") * 2


def halve(src, device, name):
    return (src / 2).to(device)


# --- a model shaped like SCAIL's DiT under sat --------------------------------


class Layer(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.act = act  # one activation module shared by all layers, as sat does
        self.fc2 = nn.Linear(2 * D, D)
        self.register_buffer("gain", torch.full((D,), 1.5))
        self.inner = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)])  # a list inside a layer


class Transformer(nn.Module):
    def __init__(self, n):
        super().__init__()
        act = nn.GELU()
        self.layers = nn.ModuleList([Layer(act) for _ in range(n)])
        self.hooks = {}
        self.order = list(range(n))

    def forward(self, h, emb):
        for i in self.order:
            h = self.hooks["layer_forward"](h, None, layer_id=torch.tensor(i), emb=emb)
        return h


class AdaMixin(nn.Module):
    """Per-layer lists indexed by layer_id, like SCAIL's AdaLN mixin with share_adaln."""

    def __init__(self, n, transformer):
        super().__init__()
        self.adaLN_modulations = nn.ParameterList([nn.Parameter(torch.randn(1, 2, D) * 0.1) for _ in range(n)])
        self.query_norm_list = nn.ModuleList([nn.LayerNorm(D) for _ in range(n)])
        self.unrelated = nn.ModuleList([nn.Linear(D, D) for _ in range(n + 1)])
        object.__setattr__(self, "transformer", transformer)

    def layer_forward(self, h, mask, *, layer_id, emb):
        layer = self.transformer.layers[layer_id]
        # The raw parameter is used before any module of the layer is called.
        shift, scale = (emb.unflatten(1, (2, D)) + self.adaLN_modulations[layer_id]).chunk(2, dim=1)
        x = self.query_norm_list[layer_id](layer.norm(h)) * (1 + scale) + shift
        x = layer.fc2(layer.act(layer.fc1(x))) * layer.gain
        x = layer.inner[1](layer.inner[0](x))
        return h + 0.5 * x


class ToySat(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        self.transformer = Transformer(n)
        self.mixins = nn.ModuleDict({"ada": AdaMixin(n, self.transformer)})
        self.embed = nn.Linear(8, D)
        self.head = nn.Linear(D, 8)
        self.hooks = {"layer_forward": self.mixins["ada"].layer_forward}

    def forward(self, x, emb):
        # sat copies the model's hooks into the transformer on every forward.
        self.transformer.hooks.clear()
        self.transformer.hooks.update(self.hooks)
        return self.head(self.transformer(self.embed(x), emb))


# --- a plain model whose layers are called as modules --------------------------


class Plain(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)) for _ in range(n)])
        self.order = list(range(n))

    def forward(self, x):
        for i in self.order:
            x = x + self.blocks[i](x)
        return x


def make_sat(n=6, seed=0):
    torch.manual_seed(seed)
    return ToySat(n).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 8, generator=g), torch.randn(2, 2 * D, generator=g)


def snapshot(model):
    return {
        name: (t.detach().clone(), t.device, t.dtype, t.data_ptr())
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    }


# --- grouping -------------------------------------------------------------------


def test_scail_groups_hold_the_layer_and_every_per_layer_list_entry():
    model = make_sat(4)
    assert per_layer_lists(model) == [
        "transformer.layers",
        "mixins.ada.adaLN_modulations",
        "mixins.ada.query_norm_list",
    ]
    groups = scail_layer_groups(model)
    assert [g.index for g in groups] == [0, 1, 2, 3]
    ada = model.mixins["ada"]
    for i, g in enumerate(groups):
        expected = (
            list(model.transformer.layers[i].parameters())
            + list(model.transformer.layers[i].buffers())
            + [ada.adaLN_modulations[i]]
            + list(ada.query_norm_list[i].parameters())
        )
        assert {id(t) for t in g.tensors} == {id(t) for t in expected}
        assert len(g.tensors) == len(expected)
    assert groups[0].nbytes == sum(t.numel() * t.element_size() for t in groups[0].tensors)


def test_grouping_errors():
    with pytest.raises(TypeError, match="transformer.layers"):
        per_layer_lists(Plain())
    model = make_sat(3)
    with pytest.raises(ValueError, match="differ in length"):
        groups_from_modulelists(model, ["transformer.layers", "mixins.ada.unrelated"])
    with pytest.raises(TypeError):
        groups_from_modulelists(model, ["embed"])


def test_resident_indices_are_spread_and_checked():
    assert resident_indices(40, 4) == [5, 15, 25, 35]
    assert resident_indices(6, 6) == [0, 1, 2, 3, 4, 5]
    assert resident_indices(6, 0) == []
    with pytest.raises(ValueError):
        resident_indices(6, 7)


# --- swapping -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pinned", "stream"])
@pytest.mark.parametrize("prefetch,resident", [(0, 0), (1, 0), (2, 2), (1, 5)])
def test_sat_model_output_equals_resident(mode, prefetch, resident):
    model = make_sat()
    x, emb = inputs()
    with torch.no_grad():
        expected = model(x, emb)
    swap = BlockSwap(
        model, scail_layer_groups(model), "cpu", mode=mode, prefetch=prefetch,
        resident_groups=resident, source=Doubled(), materialize=halve,
    )
    with swap, torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x, emb), expected)
    assert swap.stats.hits + swap.stats.misses == 3 * len(swap.swapped)  # each swapped group entered once a pass


def test_a_tensor_used_while_offloaded_is_detected():
    """Guards the detector itself: without the sat trigger the raw ParameterList entry is read offloaded."""
    model = make_sat()
    x, emb = inputs()
    with torch.no_grad():
        expected = model(x, emb)
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", source=Doubled(), materialize=halve).attach()
    trigger = model.hooks["layer_forward"]
    model.hooks["layer_forward"] = model.mixins["ada"].layer_forward
    with torch.no_grad():
        assert not torch.equal(model(x, emb), expected)
    model.hooks["layer_forward"] = trigger  # the registry refuses to detach over a foreign hook
    swap.detach()


def test_plain_model_uses_module_hooks():
    torch.manual_seed(0)
    model = Plain().eval()
    x = torch.randn(3, D)
    with torch.no_grad():
        expected = model(x)
    groups = groups_from_modulelists(model, [model.blocks])
    with BlockSwap(model, groups, "cpu", source=Doubled(), materialize=halve), torch.no_grad():
        assert torch.equal(model(x), expected)
        assert torch.equal(model(x), expected)


class ReadsChildFirst(nn.Module):
    """Like umT5's relative position embedding: reads a child's weight before calling it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(D, D)

    def forward(self, x):
        return self.inner(x)


def test_a_group_is_loaded_before_its_root_module_runs():
    blocks = nn.ModuleList([ReadsChildFirst() for _ in range(3)])
    model = nn.Sequential(*blocks)
    groups = groups_from_modulelists(model, [blocks])
    x = torch.randn(2, D)
    with BlockSwap(model, groups, "cpu", source=Doubled(), materialize=halve) as swap, torch.no_grad():
        entered = []
        for gi, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, gi=gi: entered.append(swap.is_loaded(gi)))
        model(x)
    assert entered == [True, True, True]


def test_sequential_stack_with_the_gpu_test_layout():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(4)])
    x = torch.randn(5, D)
    with torch.no_grad():
        expected = model(x)
    groups = groups_from_modulelists(model, [model])
    assert len(groups) == 4 and groups[0].modules == (model[0],)
    with BlockSwap(model, groups, "cpu", mode="stream", source=Doubled(), materialize=halve) as swap:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(x), expected)
    assert swap.stats.misses == 1


def run_recording(model, swap, x, emb, order):
    """One forward; for each layer, (next layer in ``order`` loaded?, swapped groups loaded)."""
    seen = []
    handles = []
    for pos, i in enumerate(order):
        nxt = order[(pos + 1) % len(order)]

        def record(module, args, nxt=nxt):
            loaded = sum(swap.is_loaded(g) for g in swap.swapped)
            seen.append((swap.is_loaded(nxt), loaded))

        # Registered after attach, so it runs after the swap's own trigger.
        handles.append(model.transformer.layers[i].fc1.register_forward_pre_hook(record))
    with torch.no_grad():
        model(x, emb)
    for h in handles:
        h.remove()
    return seen


def test_prefetch_follows_the_call_order_not_the_build_order():
    model = make_sat(6)
    order = [3, 0, 5, 1, 4, 2]
    model.transformer.order = order
    x, emb = inputs()
    with torch.no_grad():
        expected = model(x, emb)
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", prefetch=1, source=Doubled(), materialize=halve)
    with swap:
        first = run_recording(model, swap, x, emb, order)
        assert swap.stats.misses > 1  # the build-order guess was wrong
        swap.stats.misses = swap.stats.wasted = 0
        second = run_recording(model, swap, x, emb, order)
        assert swap.stats.misses == 0
        assert swap.stats.wasted == 0
        assert all(next_loaded for next_loaded, _ in second)
        # Never more than the current group plus the prefetch window.
        assert max(loaded for _, loaded in first + second) <= 2
        with torch.no_grad():
            assert torch.equal(model(x, emb), expected)


def test_build_order_prefetches_from_the_first_pass():
    model = make_sat(5)
    x, emb = inputs()
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", prefetch=2)
    with swap, torch.no_grad():
        model(x, emb)
        assert swap.stats.misses == 1  # only the very first group
        model(x, emb)
        assert swap.stats.misses == 1  # the last group prefetched the first
        assert swap.stats.wasted == 0
        assert swap.stats.hits == 9


def test_offloaded_groups_point_at_their_masters():
    model = make_sat(4)
    x, emb = inputs()
    groups = scail_layer_groups(model)
    swap = BlockSwap(model, groups, "cpu", prefetch=1, resident_groups=[1]).attach()
    masters = {id(t): t.data_ptr() for g in groups for t in g.tensors}
    with torch.no_grad():
        model(x, emb)
    swap.release_all()
    for gi, g in enumerate(groups):
        assert swap.is_loaded(gi) == (gi == 1)
        if gi != 1:
            assert all(t.data_ptr() == masters[id(t)] for t in g.tensors)
    with torch.no_grad():
        model(x, emb)  # loads again after release_all
    swap.detach()


@pytest.mark.parametrize("mode", ["pinned", "stream"])
def test_detach_restores_tensors_and_hooks(mode):
    model = make_sat()
    x, emb = inputs()
    with torch.no_grad():
        expected = model(x, emb)
    before = snapshot(model)
    original_hook = model.hooks["layer_forward"]
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", mode=mode, resident_groups=2).attach()
    with torch.no_grad():
        model(x, emb)
    swap.detach()
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, device, dtype, ptr) in before.items():
        new_value, new_device, new_dtype, new_ptr = after[name]
        assert torch.equal(new_value, value), name
        assert (new_device, new_dtype, new_ptr) == (device, dtype, ptr), name
    assert model.hooks["layer_forward"] == original_hook
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, emb), expected)


def test_failed_attach_leaves_the_model_untouched():
    model = make_sat()
    before = snapshot(model)
    original_hook = model.hooks["layer_forward"]

    class Failing(Doubled):
        def master_for(self, name, tensor):
            if name.startswith("transformer.layers.3."):
                raise OSError("weights file vanished")
            return super().master_for(name, tensor)

    swap = BlockSwap(model, scail_layer_groups(model), "cpu", resident_groups=2, source=Failing(), materialize=halve)
    with pytest.raises(OSError, match="vanished"):
        swap.attach()
    assert not swap.attached
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(t, before[name][0]), name
    assert model.hooks["layer_forward"] == original_hook
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_detach_with_a_transforming_source_restores_the_weights():
    model = make_sat()
    before = snapshot(model)
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", mode="stream", source=Doubled(), materialize=halve)
    swap.attach()
    swap.detach()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(t, before[name][0]), name
        assert t.dtype == before[name][2]


def test_upcast_on_materialize():
    """fp8-style storage: masters in a narrower dtype, computed in the model's dtype."""
    model = make_sat(4).to(torch.float64)
    x, emb = inputs()
    x, emb = x.double(), emb.double()
    with torch.no_grad():
        expected = model(x, emb)

    class Narrow:
        def master_for(self, name, tensor):
            return tensor.data.to(torch.float32)

    def widen(src, device, name):
        return src.to(device, torch.float64)

    swap = BlockSwap(model, scail_layer_groups(model), "cpu", mode="stream", source=Narrow(), materialize=widen)
    with swap, torch.no_grad():
        group_tensor = swap.groups[0].tensors[0]
        assert group_tensor.dtype == torch.float32  # offloaded: the narrow master
        out = model(x, emb)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_argument_checks():
    model = make_sat(3)
    groups = scail_layer_groups(model)
    with pytest.raises(ValueError, match="mode"):
        BlockSwap(model, groups, "cpu", mode="lazy")
    with pytest.raises(ValueError, match="prefetch"):
        BlockSwap(model, groups, "cpu", prefetch=-1)
    with pytest.raises(ValueError, match="resident"):
        BlockSwap(model, groups, "cpu", resident_groups=[5])
    shared = LayerGroup("again", [model.transformer.layers[0]])
    with pytest.raises(ValueError, match="shared"):
        BlockSwap(model, groups + [shared], "cpu")
    stranger = LayerGroup("stranger", [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="not part of the model"):
        BlockSwap(model, [stranger], "cpu").attach()
    with torch.device("meta"):
        ghost = make_sat(2)
    with pytest.raises(ValueError, match="meta device"):
        BlockSwap(ghost, scail_layer_groups(ghost), "cpu").attach()
    swap = BlockSwap(model, groups, "cpu").attach()
    with pytest.raises(RuntimeError, match="already attached"):
        swap.attach()
    swap.detach()


# --- CUDA -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["pinned", "stream"])
def test_cuda_swap_matches_resident_under_load(mode):
    """Large matmuls keep the compute stream busy, so a missing wait would read half-copied weights."""
    torch.manual_seed(0)
    width = 2048
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                            for _ in range(12)]).eval()
    x = torch.randn(4096, width, device="cuda")
    resident = model.to("cuda")
    with torch.no_grad():
        expected = resident(x)
    model = model.to("cpu")
    groups = groups_from_modulelists(model, [model])
    group_bytes = max(g.nbytes for g in groups)
    swap = BlockSwap(model, groups, "cuda", mode=mode, prefetch=1)
    with swap, torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            assert torch.equal(model(x), expected)
        torch.cuda.synchronize()
        weights_peak = torch.cuda.max_memory_allocated() - base
    assert swap.stats.misses == 1
    activations = 4096 * 4 * width * 4 * 3
    assert weights_peak <= 3 * group_bytes + activations
    assert all(p.device.type == "cpu" for p in model.parameters())
