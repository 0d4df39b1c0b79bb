"""scail_win.weights.convert: streaming conversion, fp8, resume, refusals, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scail_win.weights import convert
from scail_win.weights import checkpoint as W
from weights_fixtures import (
    CLIP_PTH, DIT_PREFIX, SAT_PT, T5_PTH, VAE_PTH, TinyDiT, make_scail_folder, truncate,
)

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "scail_win", "convert", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, encoding="utf-8", env=_env(), timeout=timeout)


def _load_dit(path):
    with torch.device("meta"):
        model = TinyDiT()
    result = W.load_into(model, path, prefix=DIT_PREFIX)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return model


def test_bf16_roundtrip_is_exact(tmp_path):
    src, dit = make_scail_folder(tmp_path / "SCAIL Preview é")
    dst = tmp_path / "converted ü"
    assert convert.main([str(src), str(dst), "--no-progress"]) == 0
    manifest = json.loads((dst / W.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["dit_dtype"] == "bf16" and manifest["source_iteration"] == "1"
    assert all(c.status != "FAIL" for c in W.verify_weights_dir(dst))
    layout = W.find_weights(dst)
    assert layout.kind == "converted" and layout.dit == dst / "dit.safetensors"
    # The same model loads identically from the original folder and the converted one.
    ref = dit.state_dict()
    for path in (src / SAT_PT, layout.dit):
        got = _load_dit(path).state_dict()
        for name, tensor in ref.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (path, name)
    for rel, out in ((T5_PTH, "t5"), (CLIP_PTH, "clip"), (VAE_PTH, "vae")):
        original = torch.load(src / rel, weights_only=True)
        with W.open_state_dict(getattr(layout, out)) as conv:
            assert sorted(conv) == sorted(original)
            for k, v in original.items():
                assert conv[k].dtype == v.dtype and torch.equal(conv[k], v)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        assert (dst / "umt5-xxl" / name).read_bytes() == (src / "umt5-xxl" / name).read_bytes()
    assert not list(dst.rglob("*.partial"))


def test_fp8_conversion_error_and_size(tmp_path):
    src, dit = make_scail_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    assert convert.main([str(src), str(dst), "--dtype", "fp8_e4m3fn", "--no-progress"]) == 0
    entry = json.loads((dst / W.MANIFEST_NAME).read_text(encoding="utf-8"))["files"]["dit.safetensors"]
    assert entry["fp8_tensors"] == 16 and entry["options"] == {"dtype": "fp8_e4m3fn"}
    with W.open_state_dict(dst / "dit.safetensors") as st:
        q, scale = st.raw(DIT_PREFIX + "transformer.layers.1.mlp.dense_4h_to_h.weight")
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
        assert st.raw(DIT_PREFIX + "time_embed.0.weight")[1] is None
    got = _load_dit(dst / "dit.safetensors").state_dict()
    for name, ref in dit.state_dict().items():
        if W.is_fp8_candidate(name, tuple(ref.shape)):
            assert 0 < W.relative_error(got[name], ref) < 0.04, name
        else:
            assert torch.equal(got[name], ref), name
    bf16 = sum(t.numel() * 2 for n, t in dit.state_dict().items() if W.is_fp8_candidate(n, tuple(t.shape)))
    assert entry["size"] < (src / SAT_PT).stat().st_size - bf16 * 0.4


def test_resume_redoes_only_bad_files_and_dtype_changes(tmp_path):
    src, _ = make_scail_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    assert convert.main([str(src), str(dst), "--no-progress"]) == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")}
    (dst / "vae.safetensors").unlink()
    truncate(dst / "t5.safetensors")
    (dst / "clip.safetensors.partial").write_bytes(b"left over by an interrupted run")
    assert convert.main([str(src), str(dst), "--no-progress"]) == 0
    now = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")}
    assert now["dit.safetensors"] == stamp["dit.safetensors"]
    assert now["clip.safetensors"] == stamp["clip.safetensors"]
    assert now["t5.safetensors"] != stamp["t5.safetensors"]
    assert all(c.status != "FAIL" for c in W.verify_weights_dir(dst))
    assert convert.main([str(src), str(dst), "--dtype", "fp8_e4m3fn", "--no-progress"]) == 0
    manifest = json.loads((dst / W.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["dit_dtype"] == "fp8_e4m3fn"
    assert manifest["files"]["dit.safetensors"]["fp8_tensors"] > 0
    assert (dst / "clip.safetensors").stat().st_mtime_ns == stamp["clip.safetensors"]


def test_refuses_foreign_destination_and_bad_options(tmp_path, capsys):
    src, _ = make_scail_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"precious")
    assert convert.main([str(src), str(dst), "--no-progress", "--quiet"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and "already holds other files (holiday.jpg)" in last
    assert sorted(p.name for p in dst.iterdir()) == ["holiday.jpg"]
    assert convert.main([str(src), str(src), "--no-progress", "--quiet"]) == 2
    assert convert.main([str(src), str(tmp_path / "d2"), "--window-mb", "0", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --window-mb 0")


def test_a_bug_is_one_line_unless_debug(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(convert, "convert_folder", broken)
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert err == "error: ZeroDivisionError: division by zero (rerun with --debug for the traceback)\n"
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_reports_every_broken_source_file_without_traceback(tmp_path):
    src, _ = make_scail_folder(tmp_path / "SCAIL Preview é")
    truncate(src / SAT_PT)
    truncate(src / T5_PTH, keep=0.9)
    lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 507609880\n"
    (src / VAE_PTH).write_text(lfs, encoding="ascii")
    (src / "umt5-xxl" / "tokenizer_config.json").unlink()
    result = _cli(src, tmp_path / "dst")
    err = result.stderr
    assert result.returncode == 2, err
    assert "Traceback" not in err
    sat_size = W.human_bytes((src / SAT_PT).stat().st_size)
    assert f"model/1/mp_rank_00_model_states.pt ({sat_size}): not a complete zip archive" in err
    assert "expected the SCAIL DiT checkpoint, about 32.8 GB" in err
    assert "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth (" in err and "expected the umT5-XXL" in err
    assert "Wan2.1_VAE.pth (" in err and "a Git LFS pointer" in err and "git lfs pull" in err
    assert "umt5-xxl/tokenizer_config.json: missing; expected the umT5 tokenizer config" in err
    assert "re-download umt5-xxl/tokenizer_config.json from https://huggingface.co/zai-org/SCAIL-Preview" in err
    assert "4 source file(s)" in err
    assert not (tmp_path / "dst").exists()


def test_cli_refuses_unsafe_pickle_unless_trusted(tmp_path):
    # The pickle calls os.makedirs when loaded: refused, so the folder never appears.
    marker = tmp_path / "pwned"
    src, _ = make_scail_folder(tmp_path / "src", extras={"client_state": _reduce_to_makedirs(marker)})
    result = _cli(src, tmp_path / "dst")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds Python objects outside the safe list (os.makedirs)" in result.stderr
    assert "--trust-pickle" in result.stderr and not marker.exists()
    result = _cli(src, tmp_path / "dst", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    assert marker.exists()


class _MakeDirs:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path, 0o777, True))


def _reduce_to_makedirs(path):
    return _MakeDirs(str(path))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_conversion_peak_memory_is_bounded(tmp_path):
    # 12 float32 tensors of 16 MiB: the checkpoint is ~200 MB; one 16 MiB window at a time.
    src, _ = make_scail_folder(tmp_path / "src", big_tensors=12, big_numel=4 * 2**20)
    ckpt = (src / SAT_PT).stat().st_size
    driver = (
        "import json, re, sys\n"
        "import torch, safetensors, tqdm\n"
        "from scail_win.weights import convert\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "before = hwm()\n"
        "rc = convert.main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'growth': hwm() - before}))\n"
    )
    result = subprocess.run([sys.executable, "-c", driver, str(src), str(tmp_path / "dst"), "--window-mb", "16",
                             "--no-progress"], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert report["growth"] < 0.35 * ckpt, (report, ckpt)
    with W.open_state_dict(tmp_path / "dst" / "dit.safetensors") as st:
        big = st[DIT_PREFIX + "extra.big11"]
        assert big.dtype == torch.bfloat16 and big.numel() == 4 * 2**20


@pytest.mark.parametrize("legacy", [False, True])
def test_windows_remap_the_source_but_never_reread_a_legacy_file(tmp_path, monkeypatch, legacy):
    src, dit = make_scail_folder(tmp_path / "src", big_tensors=3, big_numel=2**19)
    if legacy:
        ckpt = torch.load(src / SAT_PT, weights_only=False)
        torch.save(ckpt, src / SAT_PT, _use_new_zipfile_serialization=False)
    opened = []
    real_open = convert.open_state_dict

    def counting_open(path, **kw):
        opened.append(Path(path).name)
        return real_open(path, **kw)

    monkeypatch.setattr(convert, "open_state_dict", counting_open)
    assert convert.main([str(src), str(tmp_path / "dst"), "--window-mb", "1", "--no-progress"]) == 0
    # One open to plan, then one per window (three 1 MiB windows at least) -- or a single one.
    assert opened.count("mp_rank_00_model_states.pt") == (2 if legacy else 5)
    with torch.device("meta"):
        model = TinyDiT()
    result = W.load_into(model, tmp_path / "dst" / "dit.safetensors", prefix=DIT_PREFIX)
    assert len(result.unexpected_keys) == 3  # the extra tensors
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dit.state_dict().items())
