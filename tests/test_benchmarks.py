"""The benchmarks' CPU smoke runs: they keep working between GPU sessions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_load_times_every_path_on_the_same_weights(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--dir", str(tmp_path / "w"), "--layers", "1",
         "--width-div", "16", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["convert"]["dtype"] == "bf16"
    rows = report["paths"]
    assert [r["path"] for r in rows] == ["upstream", "ours", "ours-pt", "ours-noprefetch"]
    assert all("error" not in r and r["ready_s"] > 0 for r in rows), rows
    # Four loaders, one set of weights.
    assert len({r["checksum"] for r in rows}) == 1
    assert rows[1]["prefetched_gib"] > 0 and rows[3]["prefetched_gib"] == 0
    assert "checksums differ" not in result.stdout


def test_velocity_roughness_tells_a_smooth_velocity_from_a_rough_one(monkeypatch):
    import torch

    from scail_win.samplers import flow_sigmas

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_speed

    sigmas = flow_sigmas(50, 5.0)

    def euler_states(velocity):
        x, states = torch.tensor([1.0, 2.0]), []
        for i in range(50):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(i)
            states.append(x)
        return states

    smooth = bench_speed.velocity_roughness(euler_states(lambda i: torch.stack([sigmas[i], sigmas[i] ** 2])), 50)
    rough = bench_speed.velocity_roughness(euler_states(lambda i: torch.tensor([(-1.0) ** i, 1.0 + i % 3])), 50)
    assert smooth[1] < 0.1 < 1.0 < rough[1]


def _scail_win_imports(path: Path):
    """(line, module, name) for every ``from scail_win... import name`` in a script, at any depth."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("scail_win"):
            for alias in node.names:
                yield node.lineno, node.module, alias.name


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_imports_name_what_the_package_has(script):
    """The benchmarks run on the GPU machine only, and mostly import inside functions: a module
    moved or a function renamed in the package shows up here, not an hour into a GPU session."""
    import importlib
    import importlib.util

    missing = []
    for line, module, name in _scail_win_imports(REPO / "benchmarks" / script):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{script}:{line}: no module {module}")
            continue
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:  # needs SCAIL's code (sgm, upstream's DiT), absent here
            if (exc.name or "").startswith("scail_win"):
                missing.append(f"{script}:{line}: {module}: {exc}")
            continue
        if not hasattr(loaded, name) and not (hasattr(loaded, "__path__")
                                              and importlib.util.find_spec(f"{module}.{name}") is not None):
            missing.append(f"{script}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def _compare_revisions(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import compare_revisions

    return compare_revisions


def test_compare_revisions_tells_a_changed_decision_from_a_changed_estimate(monkeypatch):
    diff_plans = _compare_revisions(monkeypatch).diff_plans
    plan = {"blocks_on_gpu": 9, "offload_mode": "pinned", "peaks": {"denoise": 1000, "text": 500}}
    refusal = "UserError: the DiT does not fit in 2 GiB"
    base = {"a": plan, "b": plan, "c": plan, "d": refusal, "e": refusal}
    head = {"a": plan, "b": {**plan, "peaks": {"denoise": 1002, "text": 500}}, "c": {**plan, "blocks_on_gpu": 8},
            "d": refusal, "e": "UserError: the DiT does not fit in 3 GiB"}
    diff = diff_plans(base, head)
    assert diff["decisions_differ"] == ["c", "e"]
    assert (diff["count"], diff["refused"], diff["identical"], diff["estimates_differ"]) == (5, 2, 2, 1)
    assert diff["largest_peak_change"] == pytest.approx(0.002)
    assert diff_plans(base, {**base, "f": plan})["decisions_differ"] == ["f"]


@pytest.mark.slow
def test_compare_revisions_finds_a_revisions_plans_equal_to_its_own(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs the repository's git history")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_revisions.py"), "--base", "HEAD",
                             "--head", "HEAD", "--stages", "plans", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "compare.json").read_text())["plans"]
    assert report["count"] == 960 and report["decisions_differ"] == []
    assert "Memory plans, base vs head" in result.stdout


def test_compare_revisions_pipeline_without_scail_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("SCAIL_ROOT", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        _compare_revisions(monkeypatch).parse_args(["--base", "HEAD", "--stages", "pipeline"])
    assert exit_info.value.code == 2
    assert "--scail-root" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")
                                          if '__name__ == "__main__"' in p.read_text(encoding="utf-8")))
def test_benchmark_answers_help_without_a_gpu(script):
    """Module-level code and the option parser of every benchmark run here, not first on the GPU machine."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
