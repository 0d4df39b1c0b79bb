"""scail_win.upstream: the patch registry (reversible, strict) and the SCAIL / sat version check."""
import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from scail_win.cli import doctor
from scail_win.upstream import patches, versions
from scail_win.upstream.patches import REGISTRY, Patch, PatchTargetMissing

DIT = "dit_video_crossattn_sc_xc"


def _fake_tree(root: Path, dit_source: str = "class UlyessAttentionMixin:\n    pass\n") -> Path:
    for d in ("sat", "sgm"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / f"{DIT}.py").write_text(dit_source)
    (root / "sat" / "__init__.py").write_text("__version__ = '0.4.11'\n")
    return root


def _on_path(tree: Path, monkeypatch) -> None:
    # sat imported first: the fake tree's empty sat/ must not become `sat`;
    # in front: its DiT module wins over a SCAIL_ROOT checkout's.
    importlib.import_module("sat.model.mixins")
    monkeypatch.syspath_prepend(str(tree))
    monkeypatch.delitem(sys.modules, DIT, raising=False)


@pytest.fixture
def fake_dit(tmp_path, monkeypatch):
    """A SCAIL tree whose DiT module is importable as dit_video_crossattn_sc_xc."""
    tree = _fake_tree(tmp_path / "SCAIL")
    _on_path(tree, monkeypatch)
    yield tree
    sys.modules.pop(DIT, None)


def _stored(patch: Patch):
    """What the target's owner holds itself (a class's own entry, or absent)."""
    owner = patch._owner()
    attribute = patch.attribute_path[-1]
    if isinstance(owner, type):
        return vars(owner).get(attribute, "absent")
    return getattr(owner, attribute)


def _args(patch):
    return ({},) if patch is patches.MAPPED_TORCH_LOAD else ()


@pytest.mark.parametrize("name", [n for n, p in REGISTRY.items() if not p.in_scail_tree])
def test_each_torch_patch_reverts_exactly_also_after_an_exception(name):
    patch = REGISTRY[name]
    before = _stored(patch)
    with pytest.raises(RuntimeError, match="inside"):
        with patch.applied(*_args(patch)) as installed:
            assert _stored(patch) is installed.replacement is not before
            raise RuntimeError("inside")
    assert _stored(patch) is before
    installed = patch.install(*_args(patch))
    installed.revert()
    installed.revert()  # a second revert does nothing
    assert _stored(patch) is before


def test_nested_applications_unwind_in_order():
    before = nn.init.normal_
    with patches.all_applied(patches.SKIP_INIT):
        inner_start = nn.init.normal_
        with patches.all_applied(patches.SKIP_INIT):
            assert nn.init.normal_ is not before
        assert nn.init.normal_ is inner_start
    assert nn.init.normal_ is before and nn.Linear.reset_parameters is vars(nn.Linear)["reset_parameters"]
    with torch.no_grad():
        w = torch.ones(2, 2)
        with patches.all_applied(patches.SKIP_INIT):
            nn.init.normal_(w)
        assert torch.equal(w, torch.ones(2, 2))


def test_an_inherited_class_attribute_is_removed_again():
    # Conv1d inherits reset_parameters from _ConvNd: reverting must not leave a copy on Conv1d.
    patch = Patch("test", "torch.nn:Conv1d.reset_parameters", lambda installed: (lambda self: None), "test")
    assert "reset_parameters" not in vars(nn.Conv1d)
    with patch.applied():
        assert "reset_parameters" in vars(nn.Conv1d)
    assert "reset_parameters" not in vars(nn.Conv1d)
    assert nn.Conv1d.reset_parameters is nn.modules.conv._ConvNd.reset_parameters


def test_meta_parameters_and_real_buffers():
    with patches.META_PARAMETERS.applied():
        layer = nn.Linear(4, 4)
        layer.register_buffer("table", torch.arange(3.0))
    assert layer.weight.device.type == "meta" and layer.table.device.type == "cpu"
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def test_single_process_attention_swaps_the_dit_mixin_and_puts_it_back(fake_dit):
    from sat.model.mixins import BaseMixin

    dit = importlib.import_module(DIT)
    original = dit.UlyessAttentionMixin
    with pytest.raises(ValueError):
        with patches.SINGLE_PROCESS_ATTENTION.applied():
            assert issubclass(dit.UlyessAttentionMixin, BaseMixin)
            assert dit.UlyessAttentionMixin.__name__ == "SingleProcessAttentionMixin"
            raise ValueError
    assert dit.UlyessAttentionMixin is original


def test_a_missing_target_is_refused_in_one_line_naming_it_and_the_versions(tmp_path, monkeypatch):
    tree = _fake_tree(tmp_path / "SCAIL", dit_source="class SomethingElse:\n    pass\n")
    _on_path(tree, monkeypatch)
    try:
        with pytest.raises(PatchTargetMissing) as info:
            with patches.SINGLE_PROCESS_ATTENTION.applied():
                pass
    finally:
        sys.modules.pop(DIT, None)
    text = str(info.value)
    assert "\n" not in text
    assert "single-process-attention" in text and f"{DIT}:UlyessAttentionMixin does not exist" in text
    assert f"SCAIL at {tree}" in text and "sat " in text and versions.TESTED_COMMIT.sha[:12] in text
    missing_module = Patch("test", "scail_win_no_such_module:thing", lambda installed: None, "test")
    with pytest.raises(PatchTargetMissing, match="module scail_win_no_such_module not importable"):
        missing_module.install()
    missing_attribute = Patch("test", "torch.nn:NoSuchLayer.forward", lambda installed: None, "test")
    with pytest.raises(PatchTargetMissing, match="torch.nn has no NoSuchLayer"):
        missing_attribute.install()


def test_mapped_torch_load_reads_the_mapped_file_with_the_real_torch_load(tmp_path):
    # The config path is the file itself (the SCAIL-Preview layout): the reader's
    # own torch.load must be the real one, or it would recurse.
    pt = tmp_path / "vae.pth"
    torch.save({"w": torch.arange(4.0)}, pt)
    other = tmp_path / "other.pt"
    torch.save({"x": torch.ones(1)}, other)
    real_load = torch.load
    with patches.MAPPED_TORCH_LOAD.applied({str(pt): pt}) as installed:
        assert torch.equal(torch.load(str(pt))["w"], torch.arange(4.0))
        assert torch.load is installed.replacement
        assert torch.equal(torch.load(other, weights_only=True)["x"], torch.ones(1))  # unmapped: passed through
        with installed.suspended():
            assert torch.load is real_load
        assert torch.load is installed.replacement
    assert torch.load is real_load


def test_assigning_load_state_dict_casts_and_assigns():
    layer = nn.Linear(2, 2).to(torch.bfloat16)
    weight = torch.ones(2, 2)
    with patches.ASSIGNING_LOAD_STATE_DICT.applied():
        layer.load_state_dict({"weight": weight, "bias": torch.zeros(2, dtype=torch.bfloat16)})
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.float(), weight)
    bias = torch.zeros(2, dtype=torch.bfloat16)
    with patches.ASSIGNING_LOAD_STATE_DICT.applied():
        layer.load_state_dict({"weight": weight.bfloat16(), "bias": bias})
    assert layer.bias.data_ptr() == bias.data_ptr()  # assigned, not copied


def test_the_registry_lists_every_patch_and_checks_targets_in_a_tree(tmp_path):
    expected = {"cuda-device-default", "single-process-attention", "mapped-torch-load",
                "assigning-load-state-dict", "meta-parameters",
                *(f"skip-init:{n}" for n in patches.INIT_FUNCTIONS),
                "skip-reset:Linear", "skip-reset:Conv3d", "skip-reset:Conv2d"}
    assert set(REGISTRY) == expected
    assert all(p.why and ":" in p.target for p in REGISTRY.values())
    assert [n for n, p in REGISTRY.items() if p.in_scail_tree] == ["single-process-attention"]

    tree = _fake_tree(tmp_path / "SCAIL")
    assert patches.check_targets(tree) == {name: None for name in REGISTRY}
    (tree / f"{DIT}.py").write_text("from sat.model.mixins import BaseMixin as UlyessAttentionMixin\n")
    assert patches.check_targets(tree)["single-process-attention"] is None
    (tree / f"{DIT}.py").write_text("class Other:\n    UlyessAttentionMixin = 1\n")
    problem = patches.check_targets(tree)["single-process-attention"]
    assert problem == f"{DIT}:UlyessAttentionMixin not defined in {tree / (DIT + '.py')}"
    (tree / f"{DIT}.py").unlink()
    assert patches.check_targets(tree)["single-process-attention"] == f"{DIT} not found in {tree}"
    assert patches.check_targets(None)["single-process-attention"] == "no SCAIL checkout to look in"


def test_doctor_reports_the_patches(tmp_path):
    tree = _fake_tree(tmp_path / "SCAIL")
    check = doctor.check_patches(tree)
    assert check.status == "OK" and check.detail.startswith(f"{len(REGISTRY)} targets present: ")
    assert "single-process-attention" in check.detail
    assert "SCAIL's not checked" in doctor.check_patches(None).detail
    (tree / f"{DIT}.py").write_text("")
    check = doctor.check_patches(tree)
    assert check.status == "FAIL" and check.detail.startswith(f"1 of {len(REGISTRY)} patch targets missing: "
                                                              "single-process-attention: ")


# -- versions -----------------------------------------------------------------------


@pytest.fixture
def tested_tree(tmp_path, monkeypatch):
    """A tree whose files are, by this table, the tested ones (CRLF in one of them)."""
    tree = _fake_tree(tmp_path / "SCAIL")
    (tree / "sgm" / "util.py").write_bytes(b"def f():\r\n    return 1\r\n")
    table = {f"{DIT}.py": versions.file_sha256(tree / f"{DIT}.py"),
             "sat/__init__.py": versions.file_sha256(tree / "sat" / "__init__.py"),
             "sgm/util.py": versions.hashlib.sha256(b"def f():\n    return 1\n").hexdigest()}
    monkeypatch.setattr(versions, "TESTED_FILES", table)
    return tree


def _git(tree: Path, sha: str) -> None:
    (tree / ".git" / "refs" / "heads").mkdir(parents=True)
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tree / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")


def test_version_check_of_a_tree_without_git(tested_tree):
    check = versions.check_tree(tested_tree)
    assert check.known and check.commit is None and check.sat_version == "0.4.11" and check.differs == ()
    assert check.detail.startswith("not a git clone, sat 0.4.11; the files scail-win patches or imports match")
    (tested_tree / "sgm" / "util.py").write_text("changed\n")
    (tested_tree / "sat" / "__init__.py").unlink()
    check = versions.check_tree(tested_tree)
    assert not check.known and check.differs == ("sat/__init__.py (missing)", "sgm/util.py")
    assert "differs from SCAIL" in check.detail and "sat version unknown (untested)" in check.detail


def test_version_check_of_known_and_unknown_commits(tested_tree):
    _git(tested_tree, versions.TESTED_COMMIT.sha)
    check = versions.check_tree(tested_tree)
    assert check.known and check.detail.startswith(f"commit {versions.TESTED_COMMIT.sha[:12]} (tested)")
    (tested_tree / ".git" / "refs" / "heads" / "main").write_text(versions.SCAIL_COMMITS[-1].sha)
    assert "(same code as tested)" in versions.check_tree(tested_tree).detail
    (tested_tree / ".git" / "refs" / "heads" / "main").write_text("f" * 40)
    check = versions.check_tree(tested_tree)
    assert not check.known and "not a commit scail-win knows" in check.detail
    (tested_tree / "sat" / "__init__.py").write_text("__version__ = '9.9'\n")
    assert "sat 9.9 (untested)" in versions.check_tree(tested_tree).detail


def test_doctor_shows_the_version_line(tested_tree):
    (line,) = doctor.check_scail_version(tested_tree)
    assert line.name == "scail-code" and line.status == "OK"
    _git(tested_tree, "0" * 40)
    (line,) = doctor.check_scail_version(tested_tree)
    assert line.status == "WARN" and "untested" in line.detail and doctor.check_scail_version(None) == []


def test_the_engine_warns_once_for_an_untested_tree(tested_tree, monkeypatch, caplog):
    monkeypatch.setattr(versions, "_warned", set())
    monkeypatch.setattr(versions, "_running_sat_version", lambda: "0.4.12")
    module = type(sys)("fake_dit")
    module.__file__ = str(tested_tree / f"{DIT}.py")
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        versions.warn_if_untested(module)
    assert caplog.records == []
    (tested_tree / f"{DIT}.py").write_text("# edited\n")
    monkeypatch.setattr(versions, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        versions.warn_if_untested(module)
        versions.warn_if_untested(module)
    (record,) = caplog.records
    assert f"SCAIL checkout {tested_tree}" in record.message and f"{DIT}.py" in record.message
    monkeypatch.setattr(versions, "_running_sat_version", lambda: "0.3.0")
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        versions.warn_if_untested(module)
    assert "sat 0.3.0 is untested" in caplog.records[-1].message


@pytest.mark.scail
def test_the_table_matches_the_scail_checkout():
    check = versions.check_tree(Path(__import__("os").environ["SCAIL_ROOT"]))
    assert check.differs == () and check.sat_version in versions.SAT_VERSIONS
