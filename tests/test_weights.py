"""scail_win.weights.checkpoint: safetensors writing and checks, safe .pt reading, fp8, load_into."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from torch import nn

from scail_win.weights import checkpoint as W
from scail_win.errors import UserError
from weights_fixtures import DIT_PREFIX, SAT_PT, TinyDiT, deepspeed_extras, make_scail_folder, randomize_, truncate


def _write(path, tensors: dict, tail: dict | None = None):
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    tail = tail or {}
    writer = W.SafetensorsWriter(path, entries, tail=[(n, t.dtype, tuple(t.shape)) for n, t in tail.items()],
                                 metadata={"k": "v"})
    with writer:
        for name in writer.pending:
            writer.write(name, {**tensors, **tail}[name])
        writer.commit()
    return writer


# --------------------------------------------------------------------------
# writer


def test_writer_roundtrip_every_dtype_aligned(tmp_path):
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "odd_bf16": torch.randn(3, 5).bfloat16(),
        "f32": torch.randn(7, 3),
        "fp8": torch.randn(5, 7).to(torch.float8_e4m3fn),
        "i64": torch.arange(5),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "noncontig": torch.randn(4, 6).t(),
    }
    path = tmp_path / "a b é.safetensors"
    _write(path, tensors)
    header = W.read_safetensors_header(path)
    assert header.data_start % 8 == 0
    for name, e in header.entries.items():
        assert e.begin % W._ST_ITEMSIZE[e.dtype] == 0, name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)) if t.dtype == \
                torch.float8_e4m3fn else torch.equal(got, t)
    assert not path.with_name(path.name + ".partial").exists()


def test_writer_tail_gets_padding_and_source_hides_it(tmp_path):
    q = torch.randn(3, 5).to(torch.float8_e4m3fn)  # 15 bytes: the scale after it needs realigning
    scale = torch.rand(3) + 0.5
    path = tmp_path / "q.safetensors"
    writer = _write(path, {"w.weight": q, "b": torch.randn(2).bfloat16()}, tail={"w.weight_scale": scale})
    assert W.PAD_TENSOR in writer.order
    entries = W.read_safetensors_header(path).entries
    assert entries["w.weight_scale"].begin % 4 == 0
    with W.open_state_dict(path) as src:
        assert sorted(src) == ["b", "w.weight"]
        raw, got_scale = src.raw("w.weight")
        assert raw.dtype == torch.float8_e4m3fn and torch.equal(got_scale, scale)
        assert torch.equal(src["w.weight"], W.dequantize(q, scale))
        assert src.info("w.weight").shape == (3, 5)


def test_writer_refuses_wrong_order_and_leaves_no_partial(tmp_path):
    path = tmp_path / "x.safetensors"
    writer = W.SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="write order"):
        with writer:
            writer.write("b", torch.zeros(2))
    assert not path.exists() and not writer.partial.exists()
    with pytest.raises(ValueError, match="header says"):
        with writer:
            writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not written"):
        with writer:
            writer.write("a", torch.zeros(2))
            writer.commit()
    assert not path.exists() and not writer.partial.exists()


# --------------------------------------------------------------------------
# integrity


def _st_file(tmp_path, name="t.safetensors"):
    path = tmp_path / name
    _write(path, {"a": torch.randn(64, 64), "b": torch.randn(10).bfloat16()})
    return path


def test_check_file_accepts_intact_files(tmp_path):
    assert W.check_file(_st_file(tmp_path), "safetensors") is None
    torch.save({"a": torch.zeros(3)}, tmp_path / "x.pt")
    assert W.check_file(tmp_path / "x.pt", "pt") is None


@pytest.mark.parametrize("case, expect", [
    ("header_too_large", "header length 1099511627776 is too large"),
    ("header_beyond_file", "is larger than the file: truncated"),
    ("bad_json", "header is not valid JSON"),
    ("data_truncated", "beyond the end of the file: truncated"),
    ("trailing_bytes", "bytes after the last tensor"),
    ("too_short", "shorter than the 8-byte header length"),
])
def test_corrupt_safetensors_cases(tmp_path, case, expect):
    path = _st_file(tmp_path)
    data = path.read_bytes()
    if case == "header_too_large":
        data = struct.pack("<Q", 2**40) + data[8:]
    elif case == "header_beyond_file":
        data = struct.pack("<Q", len(data)) + data[8:]
    elif case == "bad_json":
        data = data[:8] + b"x" + data[9:]
    elif case == "data_truncated":
        data = data[:-100]
    elif case == "trailing_bytes":
        data = data + b"\0" * 16
    elif case == "too_short":
        data = data[:5]
    path.write_bytes(data)
    problem = W.check_file(path, "safetensors", display="t.safetensors", fix="convert again")
    assert problem is not None and problem.status == "FAIL"
    assert expect in problem.message
    assert problem.message.startswith(f"t.safetensors ({W.human_bytes(len(data))})")
    assert "expected a safetensors file" in problem.message and problem.fix == "convert again"
    with pytest.raises(UserError, match="t.safetensors"):
        W.open_state_dict(path)


def test_truncated_pt_is_not_a_complete_zip(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"a": torch.randn(1000)}, path)
    truncate(path)
    problem = W.check_file(path, "vae_pth", display="Wan2.1_VAE.pth")
    assert problem.status == "FAIL"
    assert "not a complete zip archive" in problem.message and "the Wan2.1 VAE" in problem.message
    assert W.human_bytes(path.stat().st_size) in problem.message
    assert "re-download Wan2.1_VAE.pth from https://huggingface.co/zai-org/SCAIL-Preview" == problem.fix
    with pytest.raises(UserError, match="not a complete zip archive"):
        W.open_state_dict(path)


def test_lfs_pointer_missing_and_size_range(tmp_path):
    lfs = tmp_path / "Wan2.1_VAE.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 507609880\n")
    problem = W.check_file(lfs, "vae_pth")
    assert problem.status == "FAIL" and "Git LFS pointer" in problem.message and "git lfs pull" in problem.fix
    problem = W.check_file(tmp_path / "nope.pth", "t5_pth", display="umt5-xxl/nope.pth")
    assert problem.status == "FAIL" and problem.message.startswith("umt5-xxl/nope.pth: missing; expected the umT5")
    # An intact zip of an implausible size is suspicious; an unstructured blob that small is broken.
    torch.save({"a": torch.zeros(4)}, tmp_path / "small.pth")
    assert W.check_file(tmp_path / "small.pth", "t5_pth").status == "WARN"
    (tmp_path / "spiece.model").write_bytes(b"\0" * 1000)
    problem = W.check_file(tmp_path / "spiece.model", "spiece")
    assert problem.status == "FAIL" and "smaller than expected" in problem.message
    st = _st_file(tmp_path)
    problem = W.check_file(st, "safetensors", expected_size=st.stat().st_size + 1)
    assert problem.status == "FAIL" and f"where the manifest says {st.stat().st_size + 1}" in problem.message


def test_verify_original_folder_names_each_broken_file(tmp_path):
    root, _ = make_scail_folder(tmp_path / "SCAIL Preview é")
    checks = W.verify_weights_dir(root)
    assert not [c for c in checks if c.status == "FAIL"], [c.line() for c in checks]
    truncate(root / SAT_PT)
    (root / "umt5-xxl" / "tokenizer_config.json").unlink()
    (root / "umt5-xxl" / "tokenizer.json").write_text('{"trunc')
    fails = {c.path.name: c for c in W.verify_weights_dir(root) if c.status == "FAIL"}
    assert set(fails) == {"mp_rank_00_model_states.pt", "tokenizer_config.json", "tokenizer.json"}
    assert "not a complete zip archive" in fails["mp_rank_00_model_states.pt"].message
    assert fails["tokenizer_config.json"].message.startswith("umt5-xxl/tokenizer_config.json: missing")
    assert "not valid JSON" in fails["tokenizer.json"].message
    for c in fails.values():
        assert "huggingface.co/zai-org/SCAIL-Preview" in c.fix
    with pytest.raises(UserError, match=r"and 2 more problems"):
        W.ensure_weights(root)


def test_verify_reports_missing_tracker_and_unknown_folder(tmp_path):
    root, _ = make_scail_folder(tmp_path / "w")
    (root / "model" / "latest").write_text("garbage")
    fails = [c for c in W.verify_weights_dir(root) if c.status == "FAIL"]
    assert len(fails) == 1 and fails[0].message.startswith("model/latest: missing or not an iteration")
    (tmp_path / "empty").mkdir()
    (check,) = W.verify_weights_dir(tmp_path / "empty")
    assert check.status == "FAIL" and "neither a SCAIL-Preview folder" in check.message


# --------------------------------------------------------------------------
# safe .pt reading


def test_sat_checkpoint_loads_with_allowlist(tmp_path):
    root, dit = make_scail_folder(tmp_path / "w")
    with W.open_state_dict(root / SAT_PT) as src:
        assert set(src) == {DIT_PREFIX + k for k in dit.state_dict()}
        assert src.extras["iteration"] == 1 and src.extras["ds_version"] == "0.18.2"
        key = DIT_PREFIX + "transformer.layers.0.attention.dense.weight"
        assert torch.equal(src[key], dit.state_dict()["transformer.layers.0.attention.dense.weight"])


def test_namespace_and_numpy1_names_are_allowed(tmp_path):
    import argparse
    import pickle

    path = tmp_path / "ns.pt"
    torch.save({"module": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=1.0, name="x")}, path)
    with W.open_state_dict(path) as src:
        assert src.extras["args"].lr == 1.0 and list(src) == ["a"]
    # A numpy-1.x pickle names numpy.core.multiarray; numpy 2 moved it to numpy._core.
    raw = pickle.dumps(deepspeed_extras()["np_rng_state"], protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "np1.pt"
    torch.save({"module": {"a": torch.ones(2)}, "np_rng_state": pickle.loads(legacy)}, path)
    with W.open_state_dict(path) as src:
        assert src.extras["np_rng_state"][0] == "MT19937"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module": {"a": torch.ones(2)}, "client_state": _Evil(str(marker))}, path)
    with pytest.raises(UserError) as err:
        W.open_state_dict(path)
    message = str(err.value)
    assert "makedirs" in message and "--trust-pickle" in message and str(path) in message
    assert "arbitrary code" in message
    assert not marker.exists()
    with W.open_state_dict(path, trust_pickle=True) as src:
        assert list(src) == ["a"]
    assert marker.exists()  # trusting really does run the pickle's code


# --------------------------------------------------------------------------
# fp8


def test_fp8_candidates():
    assert W.is_fp8_candidate("model.diffusion_model.transformer.layers.3.mlp.dense_h_to_4h.weight", (13824, 5120))
    assert W.is_fp8_candidate("mixins.adaln_layer.clip_feature_key_value_list.0.weight", (10240, 5120))
    assert not W.is_fp8_candidate("transformer.layers.3.mlp.dense_h_to_4h.bias", (13824,))
    assert not W.is_fp8_candidate("mixins.adaln_layer.query_layernorm_list.0.weight", (128,))
    assert not W.is_fp8_candidate("mixins.adaln_layer.adaLN_modulations.0", (1, 6, 5120))
    assert not W.is_fp8_candidate("time_embed.0.weight", (5120, 256))
    assert not W.is_fp8_candidate("mixins.patch_embed.proj.weight", (5120, 20, 1, 2, 2))
    assert not W.is_fp8_candidate("transformer.layers.0.tiny.weight", (8, 5120))


def test_quantize_dequantize_error_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * torch.logspace(-7, 1, 256).unsqueeze(1)
    w[7] = 0
    q, scale = W.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (256,) and scale[7] == 1
    back = W.dequantize(q, scale, torch.float32)
    assert torch.equal(back[7], torch.zeros(512))
    err = W.relative_error(back, w)
    assert 0.005 < err < 0.04
    # Per-channel scales keep small rows accurate; one scale for all does not.
    small = slice(0, 32)
    qt, st = W.quantize_fp8(w, per_channel=False)
    assert st.dim() == 0
    assert W.relative_error(back[small], w[small]) < 0.04 < W.relative_error(W.dequantize(qt, st)[small], w[small])
    assert W.dequantize(q, scale).dtype == torch.bfloat16
    assert W.relative_error(w, w) == 0.0 and W.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0


# --------------------------------------------------------------------------
# load_into


def _meta_dit():
    with torch.device("meta"):
        return TinyDiT()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_into_meta_module_is_exact(tmp_path, fmt):
    root, dit = make_scail_folder(tmp_path / "w")
    path = root / SAT_PT
    if fmt == "safetensors":
        with W.open_state_dict(path) as src:
            path = tmp_path / "dit.safetensors"
            _write(path, {k: src[k] for k in src})
    model = _meta_dit()
    seen = []
    result = W.load_into(model, path, prefix=DIT_PREFIX, placement=lambda n: seen.append(n) or "cpu")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert result.meta_left == ["freqs"]  # non-persistent: the model must compute it
    assert set(seen) == set(dit.state_dict())
    for name, ref in dit.state_dict().items():
        got = model.state_dict()[name]
        assert got.dtype == ref.dtype and torch.equal(got, ref), name
    assert isinstance(model.transformer.layers[0].attention.dense.weight, nn.Parameter)
    assert model.step.dtype == torch.int64


def test_load_into_cast_keep_fp8_and_tied(tmp_path):
    lin = nn.Linear(32, 64)
    randomize_(lin)
    q, scale = W.quantize_fp8(lin.weight.detach().bfloat16())
    path = tmp_path / "m.safetensors"
    _write(path, {"layers.0.lin.weight": q, "layers.0.lin.bias": lin.bias.detach()},
           tail={"layers.0.lin.weight_scale": scale})

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].lin = nn.Linear(32, 64)

    with torch.device("meta"):
        m = M()
    W.load_into(m, path, dtype=torch.bfloat16)
    assert m.layers[0].lin.bias.dtype == torch.bfloat16
    assert W.relative_error(m.layers[0].lin.weight, lin.weight) < 0.04
    with torch.device("meta"):
        m = M()
    W.load_into(m, path, keep_fp8=True)
    lin0 = m.layers[0].lin
    assert lin0.weight.dtype == torch.float8_e4m3fn and not lin0.weight.requires_grad
    assert torch.equal(lin0.weight_scale, scale) and "weight_scale" not in lin0.state_dict()

    # Tied parameters stay one tensor.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

    path = tmp_path / "tied.safetensors"
    _write(path, {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)})
    with torch.device("meta"):
        t = Tied()
    result = W.load_into(t, path)
    assert t.a.weight is t.b.weight and result.unexpected_keys == ["b.weight"]


def test_load_into_checks_everything_before_moving_data(tmp_path):
    root, _ = make_scail_folder(tmp_path / "w")
    model = _meta_dit()
    with pytest.raises(UserError, match="lacks 1 tensors the model needs"):
        big = _meta_dit()
        big.register_buffer("new_table", torch.zeros(3, device="meta"))
        W.load_into(big, root / SAT_PT, prefix=DIT_PREFIX)
    with pytest.raises(UserError, match=r"other shapes than the model \(first: transformer.layers.0"):
        with torch.device("meta"):
            wide = TinyDiT(hidden=128)
        W.load_into(wide, root / SAT_PT, prefix=DIT_PREFIX)
    assert all(p.is_meta for p in wide.parameters())
    with pytest.raises(UserError, match="right key prefix"):
        W.load_into(model, root / SAT_PT)
    result = W.load_into(model, root / SAT_PT, prefix=DIT_PREFIX, select=lambda n: n.startswith("transformer."))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not model.transformer.layers[0].mlp.dense_4h_to_h.weight.is_meta and model.time_embed[0].weight.is_meta
    result = W.load_into(model, root / SAT_PT, prefix=DIT_PREFIX, strict=False)
    assert result.missing_keys == [] and result.meta_left == ["freqs"]


def test_find_weights_layouts(tmp_path):
    root, _ = make_scail_folder(tmp_path / "w")
    layout = W.find_weights(root)
    assert layout.kind == "original" and layout.dit == root / SAT_PT and layout.iteration == "1"
    with pytest.raises(UserError, match="does not exist"):
        W.find_weights(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / W.MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a scail-win manifest"):
        W.find_weights(tmp_path / "bad")


def test_legacy_torch_format_loads_without_mmap(tmp_path, caplog):
    path = tmp_path / "old.pth"
    torch.save({"a": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert W.check_file(path, "pt") is None
    with W.open_state_dict(path) as src:
        assert torch.equal(src["a"], torch.arange(4.0))
    assert "legacy torch format" in caplog.text


def test_checkpoint_weights_streams_fp8_and_upcasts_on_device(tmp_path):
    w = torch.randn(64, 32)
    q, scale = W.quantize_fp8(w)
    bias = torch.randn(64).bfloat16()
    path = tmp_path / "dit.safetensors"
    _write(path, {"p.layers.0.lin.weight": q, "p.layers.0.lin.bias": bias},
           tail={"p.layers.0.lin.weight_scale": scale})
    lin = nn.Linear(32, 64).bfloat16()
    with W.open_state_dict(path) as src:
        cw = W.CheckpointWeights(src, prefix="p.")
        master = cw.master_for("layers.0.lin.weight", lin.weight)
        assert master.dtype == torch.float8_e4m3fn  # fp8 in RAM, not bf16
        out = cw.materialize(master, torch.device("cpu"), "layers.0.lin.weight")
        assert out.dtype == torch.bfloat16 and W.relative_error(out, w) < 0.04
        b = cw.master_for("layers.0.lin.bias", lin.bias)
        copy = cw.materialize(b, torch.device("cpu"), "layers.0.lin.bias")
        assert torch.equal(copy, bias) and copy.data_ptr() != b.data_ptr()
        with pytest.raises(ValueError, match="checkpoint shape"):
            cw.master_for("layers.0.lin.weight", torch.zeros(3, 3))


def test_block_swap_streams_from_the_file(tmp_path):
    from scail_win.weights.convert import convert_checkpoint
    from scail_win.placement.offload import BlockSwap, groups_from_modulelists

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            x = self.inp(x)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    ref = Net().bfloat16()
    torch.save({"module": ref.state_dict()}, tmp_path / "net.pt")
    convert_checkpoint(tmp_path / "net.pt", tmp_path / "net.safetensors", dtype="fp8_e4m3fn", progress=False)
    with torch.device("meta"):
        resident, swapped = Net(), Net()
    W.load_into(resident, tmp_path / "net.safetensors")
    with W.open_state_dict(tmp_path / "net.safetensors") as src:
        is_swapped = lambda name: name.startswith("layers.")  # noqa: E731
        W.load_into(swapped, src, keep_fp8=is_swapped)
        assert swapped.layers[1].weight.dtype == torch.float8_e4m3fn and swapped.inp.weight.dtype == torch.bfloat16
        cw = W.CheckpointWeights(src)
        swap = BlockSwap(swapped, groups_from_modulelists(swapped, ["layers"]), "cpu", mode="stream",
                         source=cw, materialize=cw.materialize).attach()
        x = torch.randn(4, 16).bfloat16()
        assert torch.equal(swapped(x), resident(x))
        assert 0 < W.relative_error(swapped(x), ref(x)) < 0.1
        swap.detach()
