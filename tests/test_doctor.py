"""scail_win.cli.doctor: checks, text and JSON output, exit status, broken weights."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from scail_win.weights import convert
from scail_win.cli import doctor
from scail_win.placement import host_memory
from weights_fixtures import SAT_PT, T5_PTH, VAE_PTH, make_scail_folder, truncate

REPO = Path(__file__).resolve().parents[1]


def _scail_tree(root: Path, with_example: bool = True) -> Path:
    for d in ("sat", "sgm", "examples/001"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "dit_video_crossattn_sc_xc.py").write_text("")
    if with_example:
        doctor._encode_h264(root / doctor.EXAMPLE_VIDEO, frames=4, size=32)
    return root


def _by_status(checks, status):
    return [c for c in checks if c.status == status]


def test_cli_json_on_truncated_weights_fails_without_traceback(tmp_path):
    weights, _ = make_scail_folder(tmp_path / "SCAIL Preview é")
    truncate(weights / SAT_PT)
    truncate(weights / T5_PTH, keep=0.95)
    (weights / VAE_PTH).write_bytes(b"")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "scail_win", "doctor", "--weights", str(weights), "--json",
                             "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["counts"]["FAIL"] == 3
    fails = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert {c["name"] for c in fails} == {"weights"}
    text = "\n".join(c["detail"] for c in fails)
    size = (weights / SAT_PT).stat().st_size
    assert f"model/1/mp_rank_00_model_states.pt ({size / 1000:.1f} kB): not a complete zip archive" in text
    assert "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth" in text and "Wan2.1_VAE.pth (0 B)" in text
    assert all("re-download" in c["fix"] for c in fails)
    names = {c["name"] for c in report["checks"]}
    assert {"python", "torch", "cuda", "ram", "triton", "deepspeed", "decord", "flash_attn", "hook", "scail",
            "h264", "disk"} <= names


def test_text_output_converted_folder_corruptions(tmp_path, capsys):
    src, _ = make_scail_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    assert convert.main([str(src), str(dst), "--no-progress"]) == 0
    dit = (dst / "dit.safetensors").read_bytes()
    (dst / "dit.safetensors").write_bytes(struct.pack("<Q", len(dit) + 10) + dit[8:])  # header too large
    t5 = (dst / "t5.safetensors").read_bytes()
    (dst / "t5.safetensors").write_bytes(t5[:8] + b"x" + t5[9:])  # not JSON
    truncate(dst / "clip.safetensors", keep=0.8)  # data cut off
    from safetensors.torch import save_file
    save_file({"other": torch.zeros(100)}, str(dst / "vae.safetensors"))  # intact, but not what was converted
    (dst / "umt5-xxl" / "tokenizer.json").unlink()
    (dst / "umt5-xxl" / "tokenizer_config.json").unlink()
    capsys.readouterr()
    assert doctor.main(["--weights", str(dst), "--output", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    joined = "\n".join(lines)
    assert "dit.safetensors (" in joined and "is larger than the file: truncated" in joined
    assert "t5.safetensors (" in joined and "header is not valid JSON" in joined
    assert "clip.safetensors (" in joined and "beyond the end of the file: truncated" in joined
    assert f"vae.safetensors ({(dst / 'vae.safetensors').stat().st_size} B)" in joined
    assert "expected the converted vae" in joined
    assert "umt5-xxl/tokenizer_config.json: missing" in joined
    assert "umt5-xxl/tokenizer.json and umt5-xxl/spiece.model: both missing" in joined
    assert all(f'python -m scail_win convert "{src.resolve()}" "{dst}"' in ln for ln in lines)
    assert len(lines) == 6
    assert out.splitlines()[-1].endswith("6 FAIL")


def test_missing_weights_folder_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("SCAIL_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    checks = doctor.check_weights(None, None)
    assert len(checks) == 1 and checks[0].status == "FAIL" and checks[0].fix == "pass --weights DIR"
    (tmp_path / "SCAIL-Preview").mkdir()
    (check,) = doctor.check_weights(None, None)
    assert check.status == "FAIL" and "neither a SCAIL-Preview folder" in check.detail


def test_weights_folder_is_found_as_sample_finds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SCAIL_WEIGHTS", raising=False)
    here, tree = tmp_path / "here", _scail_tree(tmp_path / "SCAIL é", with_example=False)
    here.mkdir()
    monkeypatch.chdir(here)
    beside = tree / "SCAIL-Preview"
    beside.mkdir()
    # Only beside the checkout: checked, with a warning that sample looks in ./SCAIL-Preview.
    assert doctor.find_weights(None, tree) == (beside, "beside the SCAIL checkout")
    warn = doctor.check_weights(None, tree)[0]
    assert warn.status == "WARN" and str(here / "SCAIL-Preview") in warn.detail and "SCAIL_WEIGHTS" in warn.fix
    (here / "SCAIL-Preview").mkdir()
    assert doctor.find_weights(None, tree) == (here / "SCAIL-Preview", "current folder")
    env_dir = tmp_path / "from env"
    monkeypatch.setenv("SCAIL_WEIGHTS", str(env_dir))
    assert doctor.find_weights(None, tree) == (env_dir, "SCAIL_WEIGHTS")
    (check,) = doctor.check_weights(None, tree)  # named but missing: the loader's own message
    assert check.status == "FAIL" and f"weights folder {env_dir} does not exist" in check.detail
    assert doctor.find_weights("rel", tree) == (here / "rel", "--weights")


def test_scail_tree_and_git_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("SCAIL_ROOT", raising=False)
    tree = _scail_tree(tmp_path / "SCAIL é", with_example=False)
    check, root = doctor.check_scail(str(tree))
    assert check.status == "OK" and root == tree and "not a git clone" in check.detail
    git = tree / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("33122ea0123456789abcdef0123456789abcdef0\n")
    assert doctor.git_commit(tree) == "33122ea01234 (main)"
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\nabcdef0123456789abcdef0123456789abcdef01 refs/heads/main\n")
    assert doctor.git_commit(tree) == "abcdef012345 (main)"
    (git / "HEAD").write_text("0123456789abcdef0123456789abcdef01234567\n")
    assert doctor.git_commit(tree) == "0123456789ab"
    # A worktree points at its git dir through a .git file.
    other = _scail_tree(tmp_path / "wt", with_example=False)
    (other / ".git").write_text(f"gitdir: {git}\n")
    assert doctor.git_commit(other) == "0123456789ab"

    check, root = doctor.check_scail(str(tmp_path))
    assert check.status == "FAIL" and root is None and "not a SCAIL checkout" in check.detail
    monkeypatch.chdir(tree)
    check, root = doctor.check_scail(None)
    assert check.status == "OK" and "current folder" in check.detail
    monkeypatch.chdir(tmp_path)
    check, root = doctor.check_scail(None)
    assert check.status == "WARN" and root is None
    monkeypatch.setenv("SCAIL_ROOT", str(tree))
    assert doctor.check_scail(None)[0].detail.startswith(f"{tree} (SCAIL_ROOT)")


def test_video_checks(tmp_path):
    tree = _scail_tree(tmp_path / "scail")
    checks = doctor.check_video(tree)
    assert [c.name for c in checks] == ["h264", "decode"] and all(c.status == "OK" for c in checks)
    assert "32x32, decoded 4 frames" in checks[1].detail
    (tree / doctor.EXAMPLE_VIDEO).write_bytes(b"\0" * 1000)
    decode = doctor.check_video(tree)[1]
    assert decode.status == "FAIL" and "cannot decode" in decode.detail
    assert [c.name for c in doctor.check_video(None)] == ["h264"]


def test_hook_status_rendering(monkeypatch):
    rows = [{"name": "sat.model.position_embedding.triton_rotary", "target": "scail_win.rotary",
             "when": "always", "state": "redirected", "origin": None}]
    fake = types.ModuleType("scail_win.hook")
    fake.status = lambda: {"active": True, "disabled_by_env": False, "redirects": rows}
    fake.format_status = lambda info: "scail-win import hook: active\n  more lines"
    monkeypatch.setitem(sys.modules, "scail_win.hook", fake)
    check = doctor.check_hook()
    assert check.status == "OK"
    assert check.detail == "active; sat.model.position_embedding.triton_rotary -> scail_win.rotary (redirected)"
    rows.append({"name": "arguments", "target": "scail_win.arguments", "when": "from a SCAIL checkout",
                 "state": "not redirected: imported before the hook was installed", "origin": "/x/arguments.py"})
    check = doctor.check_hook()
    assert check.status == "WARN" and "imported before the hook: arguments" in check.detail
    fake.status = lambda: {"active": False, "disabled_by_env": True, "redirects": rows}
    fake.format_status = lambda info: "scail-win import hook: off (SCAIL_WIN_DISABLE is set)"
    check = doctor.check_hook()
    assert check.status == "WARN" and check.detail.startswith("inactive: off (SCAIL_WIN_DISABLE is set)")

    def broken():
        raise RuntimeError("boom")

    fake.status = broken
    assert "boom" in doctor.check_hook().detail
    assert doctor.check_hook().status == "WARN"


def test_real_hook_status_is_rendered():
    from scail_win import hook

    check = doctor.check_hook()
    if hook.status()["active"]:
        assert "scail_win.rotary" in check.detail
    else:
        assert check.status == "WARN" and check.detail.startswith("inactive: off")


def test_memory_disk_and_versions(monkeypatch, tmp_path):
    info = host_memory.parse_meminfo("MemTotal:       16318480 kB\nMemAvailable:    8000000 kB\nHugePages_Total: 0\n")
    assert info == {"MemTotal": 16318480 * 1024, "MemAvailable": 8000000 * 1024, "HugePages_Total": 0}
    if Path("/proc/meminfo").exists():
        mem = host_memory.memory_info()
        assert mem["ram_total"] > 0 and "swap_total" in mem
    monkeypatch.setattr(host_memory, "memory_info", lambda: {"ram_total": 8 * 2**30, "ram_available": 2**30,
                                                        "swap_total": 0, "swap_free": 0})
    ram, swap = doctor.check_memory()
    assert ram.status == "WARN" and "below 16 GB" in ram.detail and swap.status == "OK"
    usage = types.SimpleNamespace(free=512 * 2**20)
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage)
    check = doctor.check_disk(tmp_path / "not" / "yet")
    assert check.status == "FAIL" and "536.9 MB free" in check.detail
    usage.free = 3 * 2**30
    assert doctor.check_disk(tmp_path).status == "WARN"
    usage.free = 50 * 2**30
    assert doctor.check_disk(tmp_path).status == "OK"
    assert doctor._version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert doctor._version_tuple("2.1.0a0+git123") == (2, 1, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_checks_report_vram():
    checks = doctor.check_gpus(torch)
    assert checks and all("GiB VRAM" in c.detail for c in checks)


def test_optional_packages_say_what_they_change(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    checks = {c.name: c for c in doctor.check_optional()}
    assert checks["triton"].status == "OK"
    assert "kernels on CUDA run on PyTorch, slower" in checks["triton"].detail
