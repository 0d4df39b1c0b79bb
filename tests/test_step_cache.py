"""The step cache on a small sat-shaped model (CPU), under the real BlockSwap, and on SCAIL's tiny DiT.

The toy model is built like a sat ``BaseModel``: its transformer calls
``hooks['layer_forward']`` once per layer with ``layer_id``, and the model
copies its hooks into the transformer on every forward.  Its layers update
the residual stream in place (as scail-win's lean layers do) or return a
new tensor (as upstream's do).
"""
import argparse
import dataclasses

import pytest
import torch
from torch import nn

from test_lean_layer import make_dit, make_inputs, scail  # noqa: F401 -- scail is a fixture

from scail_win.errors import UserError
from scail_win.placement.offload import BlockSwap, scail_layer_groups
from scail_win.model.step_cache import StepCache, install_step_cache, step_cache_threshold

D = 16


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)


class Transformer(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(n)])
        self.hooks = {}

    def forward(self, h, emb):
        for i in range(len(self.layers)):
            h = self.hooks["layer_forward"](h, None, layer_id=torch.tensor(i), emb=emb)
        return h


class Mixin(nn.Module):
    """Per-layer modulation lists indexed by layer id, like SCAIL's AdaLN mixin."""

    def __init__(self, n, transformer, inplace, first_ignores_input):
        super().__init__()
        self.adaLN_modulations = nn.ParameterList([nn.Parameter(torch.randn(1, 1, D) * 0.1) for _ in range(n)])
        self.inplace = inplace
        self.first_ignores_input = first_ignores_input
        object.__setattr__(self, "transformer", transformer)

    def layer_forward(self, h, mask, *, layer_id, emb):
        layer = self.transformer.layers[layer_id]
        source = torch.ones_like(h) if layer_id == 0 and self.first_ignores_input else h
        x = layer.norm(source) * (1 + emb.unsqueeze(1)) + self.adaLN_modulations[layer_id]
        update = 0.5 * layer.fc2(torch.tanh(layer.fc1(x)))
        if self.inplace:
            h += update
            return h
        return h + update


class Toy(nn.Module):
    def __init__(self, n=5, inplace=False, first_ignores_input=False):
        super().__init__()
        self.transformer = Transformer(n)
        self.mixins = nn.ModuleDict({"ada": Mixin(n, self.transformer, inplace, first_ignores_input)})
        self.embed = nn.Linear(8, D)
        self.head = nn.Linear(D, 8)
        self.hooks = {"layer_forward": self.mixins["ada"].layer_forward}

    def forward(self, x, emb):
        self.transformer.hooks.clear()
        self.transformer.hooks.update(self.hooks)
        return self.head(self.transformer(self.embed(x), emb))


def make(n=5, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Toy(n, **kwargs).eval()


def trajectory(steps, drift, batch=2, seed=1):
    """Inputs of ``steps`` sampling steps: a start plus a small random walk of size ``drift``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, 8, generator=g)
    emb = torch.randn(batch, D, generator=g) * 0.1
    xs = []
    for _ in range(steps):
        xs.append(x.clone())
        x = x + drift * torch.randn(x.shape, generator=g)
    return xs, emb


def sample(model, cache, xs, emb, branches=1, num_steps=None):
    """Call the model as a sampler does: begin_step, then one forward per branch (CFG halves).

    ``num_steps`` (default ``len(xs)``) larger than ``len(xs)`` stops before the last step.
    """
    outs = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            if cache is not None:
                cache.begin_step(i, num_steps or len(xs))
            halves = x.chunk(branches) if branches > 1 else (x,)
            embs = emb.chunk(branches) if branches > 1 else (emb,)
            outs.append(torch.cat([model(h, e) for h, e in zip(halves, embs)]))
    return outs


@pytest.mark.parametrize("inplace", [False, True])
def test_threshold_zero_gives_the_uncached_output(inplace):
    model = make(inplace=inplace)
    xs, emb = trajectory(8, 0.01)
    expected = sample(model, None, xs, emb)
    cache = install_step_cache(model, 0.0, warmup=0)
    got = sample(model, cache, xs, emb)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert cache.skipped == 0 and cache.computed == 8
    changes = [d.change for d in cache.decisions]
    assert changes[0] is None and changes[-1] is None  # nothing to compare with; the last step is not compared
    assert all(c > 0 for c in changes[1:-1])


def test_in_place_layers_see_the_same_changes_as_out_of_place_ones():
    # The first layer's input must be saved before an in-place layer overwrites it.
    xs, emb = trajectory(6, 0.05)
    changes = []
    for inplace in (False, True):
        model = make(inplace=inplace)
        cache = install_step_cache(model, 0.0)
        sample(model, cache, xs, emb)
        changes.append([d.change for d in cache.decisions[1:-1]])
    assert min(changes[0]) > 1e-4
    assert changes[0] == pytest.approx(changes[1], rel=1e-5)


def test_a_huge_change_is_never_skipped():
    model = make()
    xs, emb = trajectory(6, 10.0)
    expected = sample(model, None, xs, emb)
    cache = install_step_cache(model, 0.05, warmup=0)
    got = sample(model, cache, xs, emb)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert cache.skipped == 0
    assert {d.reason for d in cache.decisions[1:-1]} == {"change over threshold"}


@pytest.mark.parametrize("inplace", [False, True])
def test_an_unchanged_first_residual_skips_and_reuses_the_cached_residual(inplace):
    # Layer 0 adds the same residual whatever its input: its change is 0.
    model = make(inplace=inplace, first_ignores_input=True)
    xs, emb = trajectory(4, 0.3)
    cache = install_step_cache(model, 0.1, warmup=1)
    got = sample(model, cache, xs, emb)
    assert [d.skipped for d in cache.decisions] == [False, True, True, False]
    assert cache.decisions[1].change < 1e-6  # (h + c) - h is c up to rounding

    # By hand: layer 0 at step 1, plus what layers 1..4 added at step 0.
    def layer0(h):
        return model.mixins["ada"].layer_forward(h.clone(), None, layer_id=0, emb=emb)

    cache.remove()
    with torch.no_grad():
        h0 = model.embed(xs[0])
        rest = model.transformer(h0.clone(), emb) - layer0(h0)
        for step in (1, 2):
            expected = model.head(layer0(model.embed(xs[step])) + rest)
            torch.testing.assert_close(got[step], expected, rtol=1e-6, atol=1e-6)
        # The last step was computed in full.
        assert torch.equal(got[3], model(xs[3], emb))


def test_warmup_max_skips_and_the_last_step():
    model = make(first_ignores_input=True)
    xs, emb = trajectory(9, 0.01)
    cache = install_step_cache(model, 0.5, warmup=2, max_skips=2)
    sample(model, cache, xs, emb)
    assert [(d.skipped, d.reason) for d in cache.decisions] == [
        (False, "warmup"), (False, "warmup"),
        (True, "change under threshold"), (True, "change under threshold"), (False, "max skips in a row"),
        (True, "change under threshold"), (True, "change under threshold"), (False, "max skips in a row"),
        (False, "last step")]
    assert cache.computed == 5 and cache.skipped == 4
    assert cache.stats()[0].skipped == 4
    assert "skipped 4 of 9 DiT forwards" in cache.summary()


def test_changes_accumulate_since_the_last_full_forward():
    model = make()
    xs, emb = trajectory(30, 0.02)
    threshold = 0.05
    cache = install_step_cache(model, threshold, warmup=1, max_skips=100)
    sample(model, cache, xs, emb)
    decisions = cache.decisions
    assert 0 < cache.skipped < len(decisions) - 2, [d.change for d in decisions]
    total = 0.0
    for d in decisions[1:-1]:
        if d.skipped:
            total += d.change
            assert total < threshold
        else:
            assert d.reason == "change over threshold" and total + d.change >= threshold
            total = 0.0


def test_cfg_halves_keep_separate_caches():
    model = make(first_ignores_input=False)
    xs, emb = trajectory(6, 0.0)
    g = torch.Generator().manual_seed(5)
    # Branch 0 (first half) never moves; branch 1 moves a lot every step.
    for i, x in enumerate(xs):
        x[1:] += 5.0 * i * torch.randn(x[1:].shape, generator=g)
    expected = sample(model, None, xs, emb, branches=2)
    cache = install_step_cache(model, 0.1, warmup=1, max_skips=10)
    got = sample(model, cache, xs, emb, branches=2)
    stats = cache.stats()
    assert (stats[0].computed, stats[0].skipped) == (2, 4)
    assert (stats[1].computed, stats[1].skipped) == (6, 0)
    for a, b in zip(got, expected):
        # The moving half is always computed; the still one reuses its own residual.
        assert torch.equal(a[1:], b[1:])
        torch.testing.assert_close(a[:1], b[:1], rtol=1e-5, atol=1e-5)
    assert "branch 0: 4 of 6; branch 1: 0 of 6" in cache.summary()


def test_remove_restores_the_hooks():
    model = make()
    original = model.hooks["layer_forward"]
    xs, emb = trajectory(1, 0.0)
    cache = install_step_cache(model, 0.1)
    cache.begin_step(0, 3)
    with torch.no_grad():
        model(xs[0], emb)
    assert model.transformer.hooks["layer_forward"] is cache
    cache.remove()
    assert model.hooks["layer_forward"] == original and model.transformer.hooks["layer_forward"] == original
    assert not cache._branches
    cache.remove()  # a second call does nothing
    with torch.no_grad():
        model(xs[0], emb)  # no begin_step needed any more


def test_remove_refuses_while_wrapped_outside_the_registry():
    model = make()
    cache = install_step_cache(model, 0.1)
    model.hooks["layer_forward"] = lambda *a, **k: cache(*a, **k)
    with pytest.raises(RuntimeError, match="replaced outside its hook registry"):
        cache.remove()


def test_a_forward_outside_a_step_is_an_error():
    model = make()
    install_step_cache(model, 0.1)
    xs, emb = trajectory(1, 0.0)
    with pytest.raises(RuntimeError, match="begin_step"), torch.no_grad():
        model(xs[0], emb)


def test_a_new_video_starts_afresh():
    model = make(first_ignores_input=True)
    xs, emb = trajectory(4, 0.0)
    cache = install_step_cache(model, 0.5, warmup=1)
    sample(model, cache, xs, emb)
    assert cache.skipped == 2
    assert not cache._branches  # nothing kept after the last step
    # A resumed job starting at step 2: nothing to reuse, so it computes.
    sample(model, cache, xs[:2], emb)
    cache.begin_step(2, 4)
    with torch.no_grad():
        model(xs[2], emb)
    assert [d.reason for d in cache.decisions] == ["nothing cached"]


def test_a_new_shape_is_not_served_from_the_cache():
    model = make(first_ignores_input=True)
    cache = install_step_cache(model, 0.5, warmup=0)
    emb = torch.zeros(1, D)
    with torch.no_grad():
        cache.begin_step(0, 5)
        model(torch.randn(1, 6, 8), emb)
        cache.begin_step(1, 5)
        model(torch.randn(1, 7, 8), emb)
    assert [d.reason for d in cache.decisions] == ["nothing cached", "nothing cached"]


class Doubled:
    """Masters hold twice the weights and loaded copies are halved: a layer
    computed from an offloaded master gives a different result."""

    def master_for(self, name, tensor):
        return tensor.data.to("cpu") * 2


def halve(src, device, name):
    return (src / 2).to(device)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("resident", [0, 2])
def test_under_block_swap_the_output_equals_the_unswapped_cached_run(inplace, resident):
    xs, emb = trajectory(12, 0.01)
    reference_model = make(6, inplace=inplace)
    reference = install_step_cache(reference_model, 0.2, warmup=2)
    expected = sample(reference_model, reference, xs, emb, branches=2)
    assert reference.skipped > 0

    model = make(6, inplace=inplace)
    swap = BlockSwap(model, scail_layer_groups(model), "cpu", resident_groups=resident, prefetch=1,
                     source=Doubled(), materialize=halve)
    with swap, torch.no_grad():
        cache = install_step_cache(model, 0.2, warmup=2)  # last: it wraps the swap's trigger
        got, loads = [], []
        for i, x in enumerate(xs):
            cache.begin_step(i, len(xs))
            halves = []
            for h, e in zip(x.chunk(2), emb.chunk(2)):
                before = swap.stats.prefetches + swap.stats.misses
                halves.append(model(h, e))
                loads.append(swap.stats.prefetches + swap.stats.misses - before)
            got.append(torch.cat(halves))
        cache.remove()
        stats = dataclasses.replace(swap.stats)  # before detach releases the last prefetch
    assert [d.skipped for d in cache.decisions] == [d.skipped for d in reference.decisions]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # The swap's learned order and prefetch window survive the skips: one
    # miss ever (the very first group), nothing loaded in vain, and a skipped
    # forward loads at most layer 1 (layer 0's prefetch), which the next
    # forward uses.
    assert stats.misses == 1 and stats.wasted == 0, stats
    swapped = len(swap.swapped)
    assert loads[0] == swapped + 1  # every group, then layer 0 again for the next forward
    for d, n in zip(cache.decisions[1:], loads[1:]):
        assert n <= (1 if d.skipped else swapped), (d, n)


def test_cpu_storage_gives_the_device_storage_result():
    xs, emb = trajectory(12, 0.01)
    results = {}
    for storage in ("device", "cpu"):
        model = make(inplace=True)
        cache = install_step_cache(model, 0.2, warmup=2, storage=storage)
        results[storage] = (sample(model, cache, xs, emb, branches=2), [d.skipped for d in cache.decisions])
    assert any(results["cpu"][1])
    assert results["cpu"][1] == results["device"][1]
    assert all(torch.equal(a, b) for a, b in zip(results["cpu"][0], results["device"][0]))


@pytest.mark.parametrize("storage", ["device", "cpu"])
def test_chunked_arithmetic_gives_the_one_chunk_result(storage, monkeypatch):
    from scail_win.model import step_cache

    xs, emb = trajectory(12, 0.01)
    results = []
    for rows in (None, 5):  # 12 rows (2 samples x 6 tokens): one chunk, or 5 + 5 + 2
        if rows is not None:
            monkeypatch.setattr(step_cache, "CHUNK_ROWS", rows)
        model = make(inplace=True)
        cache = install_step_cache(model, 0.2, warmup=2, storage=storage)
        outs = sample(model, cache, xs, emb)
        results.append((outs, cache.decisions))
    (one, one_d), (chunked, chunked_d) = results
    assert any(d.skipped for d in one_d)
    assert [d.skipped for d in one_d] == [d.skipped for d in chunked_d]
    for a, b in zip(one_d[1:-1], chunked_d[1:-1]):
        assert a.change == pytest.approx(b.change, rel=1e-5)
    for a, b in zip(one, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_pinned_storage_matches_device_storage(inplace):
    xs, emb = trajectory(12, 0.01)
    results = {}
    for storage in ("device", "cpu"):
        model = make(inplace=inplace).cuda()
        cache = install_step_cache(model, 0.2, warmup=2, storage=storage)
        outs = sample(model, cache, [x.cuda() for x in xs[:-1]], emb.cuda(), branches=2, num_steps=len(xs))
        kept = [t for b in cache._branches.values() for t in (b.first, b.rest, b.staging) if t is not None]
        assert len(kept) == (6 if storage == "cpu" else 4)
        assert all(t.is_pinned() if storage == "cpu" else t.is_cuda for t in kept)
        cache.begin_step(len(xs) - 1, len(xs))
        with torch.no_grad():
            outs.append(torch.cat([model(h, e) for h, e in zip(xs[-1].cuda().chunk(2), emb.cuda().chunk(2))]))
        results[storage] = ([o.cpu() for o in outs], [d.skipped for d in cache.decisions])
    assert any(results["cpu"][1]) and results["cpu"][1] == results["device"][1]
    assert all(torch.equal(a, b) for a, b in zip(results["cpu"][0], results["device"][0]))


@pytest.mark.parametrize("value, expected", [(None, None), (0, None), (0.0, None), ("0", None),
                                             (0.1, 0.1), ("0.25", 0.25), (1, 1.0)])
def test_threshold_from_args(value, expected):
    assert step_cache_threshold(argparse.Namespace(step_cache=value)) == expected


def test_threshold_missing_from_args_is_off():
    assert step_cache_threshold(argparse.Namespace()) is None


@pytest.mark.parametrize("value", [-0.1, "abc", float("nan"), float("inf"), True, [0.1]])
def test_bad_threshold_in_args_is_a_user_error(value):
    with pytest.raises(UserError, match="--step-cache"):
        step_cache_threshold(argparse.Namespace(step_cache=value))


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=-1), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=0.1, warmup=-1), "warmup"), (dict(threshold=0.1, max_skips=0), "max_skips"),
    (dict(threshold=0.1, storage="disk"), "storage")])
def test_argument_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepCache(make(), **kwargs)


def test_models_it_cannot_wrap():
    with pytest.raises(ValueError, match="not a sat model"):
        install_step_cache(nn.Linear(2, 2), 0.1)
    with pytest.raises(ValueError, match="at least two layers"):
        install_step_cache(make(1), 0.1)
    cache = install_step_cache(make(), 0.1)
    for step, steps in ((3, 3), (-1, 3), (1.0, 3)):
        with pytest.raises(ValueError):
            cache.begin_step(step, steps)


def _sequence_parallel_worker(rank, world, init_file, out_dir):
    """One process of a sequence-parallel run: its share of the tokens (the toy's layers are per token)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make(inplace=True)
        xs, emb = trajectory(12, 0.01)
        share = 6 // world
        cache = install_step_cache(model, 0.2, warmup=2)
        outs = sample(model, cache, [x[:, rank * share:(rank + 1) * share] for x in xs], emb)
        torch.save({"outs": outs, "decisions": [dataclasses.asdict(d) for d in cache.decisions]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sequence_parallel_processes_decide_together(tmp_path):
    import torch.multiprocessing as mp

    xs, emb = trajectory(12, 0.01)
    model = make(inplace=True)
    cache = install_step_cache(model, 0.2, warmup=2)
    expected = sample(model, cache, xs, emb)
    assert any(d.skipped for d in cache.decisions)
    mp.spawn(_sequence_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        # The sums over both halves of the tokens: the single process's decisions.
        assert [d["skipped"] for d in result["decisions"]] == [d.skipped for d in cache.decisions]
        for d, ref in zip(result["decisions"][1:-1], cache.decisions[1:-1]):
            assert d["change"] == pytest.approx(ref.change, rel=1e-5)
    for step, full in enumerate(expected):
        torch.testing.assert_close(torch.cat([r["outs"][step] for r in ranks], dim=1), full, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ SCAIL's own DiT


@pytest.mark.scail
def test_scail_dit_with_lean_layers_and_block_swap(scail):
    from scail_win.placement.lean_layer import install_lean_layers

    dit = make_dit(scail, num_layers=3)
    base = make_inputs("fp32", 1)
    g = torch.Generator().manual_seed(3)
    steps = 8
    calls = []
    for i in range(steps):
        # Only the latents move (a timestep change moves the sinusoidal time
        # embedding's fast features a lot, and random weights make that matter).
        calls.append(dict(base, x=base["x"] + 0.002 * i * torch.randn(base["x"].shape, generator=g)))

    def run(threshold, swap):
        lean = install_lean_layers(dit, 100)
        block_swap = None
        if swap:
            block_swap = BlockSwap(dit, scail_layer_groups(dit), "cpu", resident_groups=0, prefetch=1,
                                   source=Doubled(), materialize=halve).attach()
        cache = install_step_cache(dit, threshold, warmup=1) if threshold is not None else None
        outs = []
        try:
            with torch.no_grad():
                for i, inputs in enumerate(calls):
                    if cache is not None:
                        cache.begin_step(i, steps)
                    outs.append(dit(**inputs))
        finally:
            if cache is not None:
                cache.remove()
            if block_swap is not None:
                block_swap.detach()
            lean.remove()
        return outs, cache

    plain, _ = run(None, swap=False)
    zero, cache = run(0.0, swap=True)
    assert cache.skipped == 0 and all(torch.equal(a, b) for a, b in zip(zero, plain))
    lean_only, cache = run(0.5, swap=False)
    skips = [d.skipped for d in cache.decisions]
    assert any(skips) and not skips[0] and not skips[-1]
    swapped, cache = run(0.5, swap=True)
    assert [d.skipped for d in cache.decisions] == skips
    assert all(torch.equal(a, b) for a, b in zip(swapped, lean_only))
    # A skipped step stays near the computed one (the inputs barely move).
    for a, b, skipped in zip(lean_only, plain, skips):
        if skipped:
            assert (a - b).abs().mean() < 0.1 * b.abs().mean()
