"""scail_win.testing.smoke's file writing (the rest of the smoke setup runs in test_pipeline)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scail_win.testing import smoke
from scail_win.errors import UserError


def test_save_writes_the_file_whole(tmp_path):
    target = tmp_path / "models" / "vae.pth"
    smoke._save({"w": torch.arange(4.0)}, target)
    assert torch.equal(torch.load(target)["w"], torch.arange(4.0))
    assert [p.name for p in target.parent.iterdir()] == ["vae.pth"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def full_disk(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        # What torch.save raised on the GPU host when /tmp filled up.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 44057088 vs 44056976")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "models" / "vae.pth"
    with pytest.raises(UserError) as caught:
        smoke._save({"w": torch.zeros(1)}, target)
    message = str(caught.value)
    assert str(target) in message and "unexpected pos" in message and "free on its disk" in message
    assert "\n" not in message
    assert list(target.parent.iterdir()) == []
