import logging
import os
from pathlib import Path

import pytest
import torch

from scail_win.io import embed_cache
from scail_win.io.embed_cache import EmbedCache, default_cache_dir, file_identity


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "models dir é" / "umt5 wéights.pth"
    path.parent.mkdir()
    path.write_bytes(b"t5 weights v1")
    return path


@pytest.fixture
def cache(tmp_path):
    return EmbedCache(tmp_path / "cache dir ü")


def embedding(seed=0):
    return torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_miss_then_hit(cache, weights):
    key = cache.key("a dancer, 舞蹈", weights=weights, max_length=512, dtype=torch.bfloat16)
    assert cache.get(key) is None
    emb = embedding()
    path = cache.put(key, emb)
    assert path == cache.path(key) and path.is_file()
    got = cache.get(key)
    assert got.dtype == torch.bfloat16 and torch.equal(got, emb)
    assert [p.name for p in cache.dir.iterdir()] == [path.name]  # no temporary files left


def test_key_depends_on_every_setting(cache, weights, tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "spiece.model").write_bytes(b"v1")
    base = dict(weights=weights, max_length=512, dtype=torch.bfloat16, tokenizer=tokenizer)
    key = cache.key("p", **base)
    assert cache.key("p", **base) == key
    variants = [
        cache.key("q", **base),
        cache.key("p", **{**base, "max_length": 256}),
        cache.key("p", **{**base, "dtype": torch.float32}),
        cache.key("p", **{**base, "tokenizer": None}),
    ]
    (tokenizer / "spiece.model").write_bytes(b"v2 longer")
    variants.append(cache.key("p", **base))
    assert len(set(variants + [key])) == len(variants) + 1


def test_replacing_the_weights_invalidates(cache, weights):
    key = cache.key("p", weights=weights, max_length=512, dtype=torch.bfloat16)
    cache.put(key, embedding())
    # Same size, new modification time: still a different file.
    weights.write_bytes(b"t5 weights v2")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new_key = cache.key("p", weights=weights, max_length=512, dtype=torch.bfloat16)
    assert new_key != key and cache.get(new_key) is None
    with pytest.raises(OSError):
        cache.key("p", weights=weights.with_name("missing.pth"), max_length=512, dtype=torch.bfloat16)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", None])
def test_corrupt_entry_is_a_miss_with_a_warning(cache, weights, caplog, content):
    key = cache.key("p", weights=weights, max_length=512, dtype=torch.bfloat16)
    path = cache.put(key, embedding())
    if content is None:  # a valid file that lacks the embedding
        from safetensors.torch import save_file

        save_file({"other": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="scail_win.io.embed_cache"):
        assert cache.get(key) is None
    assert "unreadable" in caplog.text
    cache.put(key, embedding(1))
    assert torch.equal(cache.get(key), embedding(1))


def test_unwritable_cache_warns_and_goes_on(tmp_path, weights, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    cache = EmbedCache(blocker)
    key = cache.key("p", weights=weights, max_length=512, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="scail_win.io.embed_cache"):
        assert cache.put(key, embedding()) is None
    assert "could not write" in caplog.text
    assert cache.get(key) is None


def test_keys_are_validated(cache):
    with pytest.raises(ValueError):
        cache.path("../escape")
    with pytest.raises(TypeError):
        cache.key(["p"], weights="x", max_length=1, dtype="bf16")


def test_file_identity_of_a_folder_changes_with_its_files(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    before = file_identity(tmp_path)
    (tmp_path / "b").write_bytes(b"2")
    assert file_identity(tmp_path) != before


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SCAIL_WIN_CACHE", str(tmp_path / "override"))
    assert default_cache_dir() == tmp_path / "override"
    assert EmbedCache().dir == tmp_path / "override" / "text-embeddings"
    monkeypatch.delenv("SCAIL_WIN_CACHE")
    monkeypatch.setattr(embed_cache.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert default_cache_dir() == tmp_path / "Local" / "scail-win" / "cache"
    monkeypatch.setattr(embed_cache.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "scail-win"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "scail-win"
