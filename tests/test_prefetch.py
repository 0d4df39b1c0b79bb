"""scail_win.weights.prefetch: the background read of weight files into the OS file cache."""

import json
import threading

import pytest

from scail_win.weights import prefetch
from scail_win.weights import checkpoint as W

BIG = 1 << 40  # more RAM than any test file needs


@pytest.fixture(autouse=True)
def fresh_prefetch(monkeypatch):
    monkeypatch.setattr(prefetch, "_started", set())
    monkeypatch.delenv(prefetch.ENV, raising=False)
    yield
    # No reader thread may outlive its test (and its monkeypatched CHUNK_BYTES).
    for thread in threading.enumerate():
        if thread.name == "scail-win-prefetch":
            thread.join(30)


def _file(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return path


def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _converted_folder(root, sizes):
    root.mkdir()
    manifest = {"format": W.FORMAT_NAME, "format_version": W.FORMAT_VERSION, "dit_dtype": "bf16", "files": {}}
    (root / W.MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    for component, size in sizes.items():
        _file(root / W.CONVERTED_FILES[component], size)
    return root


def test_reads_every_byte_of_each_file_in_several_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "CHUNK_BYTES", 64 << 10)
    a = _file(tmp_path / "a.bin", (3 << 20) + 1)
    b = _file(tmp_path / "b.bin", (1 << 20) + 7)
    p = prefetch.prefetch_files([a, b], available=BIG)
    assert p is not None and p.files == [a, b]
    assert p.wait(timeout=30) and p.done()
    assert p.bytes_read == a.stat().st_size + b.stat().st_size


def test_reads_a_file_larger_than_the_default_chunk(tmp_path):
    a = _sparse(tmp_path / "a.bin", prefetch.CHUNK_BYTES + 1)
    p = prefetch.prefetch_files([str(a)], available=BIG)
    assert p.wait(timeout=30)
    assert p.bytes_read == prefetch.CHUNK_BYTES + 1


def test_takes_only_files_within_the_ram_share(tmp_path):
    a = _file(tmp_path / "a.bin", 3000)
    b = _file(tmp_path / "b.bin", 2000)
    c = _file(tmp_path / "c.bin", 1000)
    # Room for 4000 bytes: a, not a+b, but a+c exactly.
    p = prefetch.prefetch_files([a, b, c], available=int(4000 / prefetch.RAM_SHARE))
    assert p.files == [a, c]
    assert p.wait(timeout=30) and p.bytes_read == 4000


def test_a_file_left_out_for_lack_of_ram_can_be_queued_later(tmp_path):
    a = _file(tmp_path / "a.bin", 3000)
    assert prefetch.prefetch_files([a], available=int(2000 / prefetch.RAM_SHARE)) is None
    assert prefetch.prefetch_files([a], available=BIG).files == [a]


def test_too_little_ram_for_any_file_or_unknown_ram_means_none(tmp_path):
    a = _file(tmp_path / "a.bin", 3000)
    b = _file(tmp_path / "b.bin", 2000)
    assert prefetch.prefetch_files([a, b], available=int(1999 / prefetch.RAM_SHARE)) is None
    assert prefetch.prefetch_files([a, b], available=0) is None


def test_default_budget_is_the_ram_available_now(tmp_path):
    a = _file(tmp_path / "a.bin", 1000)
    p = prefetch.prefetch_files([a])
    assert p is not None and p.wait(timeout=30) and p.bytes_read == 1000


def test_missing_files_none_and_folders_are_skipped(tmp_path):
    a = _file(tmp_path / "a.bin", 1000)
    (tmp_path / "dir").mkdir()
    p = prefetch.prefetch_files([None, tmp_path / "gone.bin", tmp_path / "dir", a, None], available=BIG)
    assert p.files == [a]
    assert p.wait(timeout=30) and p.bytes_read == 1000


def test_nothing_that_exists_means_none(tmp_path):
    assert prefetch.prefetch_files([tmp_path / "gone.bin", None, tmp_path / "no" / "x"], available=BIG) is None
    assert prefetch.prefetch_files([], available=BIG) is None


def test_a_file_gone_by_the_time_it_is_read_is_skipped_by_the_thread(tmp_path):
    b = _file(tmp_path / "b.bin", 2000)
    p = prefetch.Prefetch([tmp_path / "gone.bin", b])
    assert p.wait(timeout=30) and p.bytes_read == 2000


def test_a_file_is_queued_once_per_process(tmp_path):
    a = _file(tmp_path / "a.bin", 1000)
    b = _file(tmp_path / "b.bin", 2000)
    assert prefetch.prefetch_files([a], available=BIG).files == [a]
    assert prefetch.prefetch_files([a], available=BIG) is None
    # The same file by another spelling, and twice in one call.
    (tmp_path / "sub").mkdir()
    assert prefetch.prefetch_files([tmp_path / "sub" / ".." / "a.bin", b, b], available=BIG).files == [b]


@pytest.mark.parametrize("value", ["0", "off", "OFF", " false ", "no"])
def test_env_turns_it_off(tmp_path, monkeypatch, value):
    a = _file(tmp_path / "a.bin", 1000)
    monkeypatch.setenv(prefetch.ENV, value)
    assert prefetch.prefetch_files([a], available=BIG) is None
    # Turned off, it does not count the file as queued.
    monkeypatch.setenv(prefetch.ENV, "1")
    assert prefetch.prefetch_files([a], available=BIG).files == [a]


def test_stop_ends_the_read_early(tmp_path, monkeypatch):
    # 16384 reads of 4 KiB: far more than happen before stop() on any machine.
    monkeypatch.setattr(prefetch, "CHUNK_BYTES", 4096)
    size = 64 << 20
    a = _sparse(tmp_path / "a.bin", size)
    b = _sparse(tmp_path / "b.bin", size)
    p = prefetch.prefetch_files([a, b], available=BIG)
    p.stop()
    assert p.done()
    assert 0 <= p.bytes_read < size
    read = p.bytes_read
    assert p.wait(timeout=1) and p.bytes_read == read


def test_prefetch_weights_of_a_folder_that_is_not_weights_is_none(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / W.MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    for root in (tmp_path / "missing", tmp_path / "empty", tmp_path / "bad"):
        assert prefetch.prefetch_weights(root, available=BIG) is None


def test_prefetch_weights_converted_folder_dit_first_in_load_order(tmp_path):
    root = _converted_folder(tmp_path / "w", {"vae": 1003, "t5": 1001, "dit": 1000})  # no CLIP file
    p = prefetch.prefetch_weights(root, available=BIG)
    assert p.files == [root / "dit.safetensors", root / "t5.safetensors", root / "vae.safetensors"]
    assert p.wait(timeout=30) and p.bytes_read == sum(f.stat().st_size for f in p.files)


def test_prefetch_weights_original_folder_without_a_readable_dit(tmp_path):
    root = tmp_path / "w"
    vae = _file(root / W.VAE_PTH, 1000)
    t5 = _file(root / W.T5_PTH, 2000)
    p = prefetch.prefetch_weights(root, available=BIG)
    assert p.files == [t5, vae]


def test_prefetch_weights_leaves_the_dit_to_the_loader_when_it_does_not_fit(tmp_path):
    root = _converted_folder(tmp_path / "w", {"dit": 5000, "t5": 2000, "clip": 1000, "vae": 1500})
    p = prefetch.prefetch_weights(root, available=int(4000 / prefetch.RAM_SHARE))
    assert p.files == [root / "t5.safetensors", root / "clip.safetensors"]


def test_load_order_is_dit_t5_clip_vae(tmp_path):
    root = _converted_folder(tmp_path / "w", {})
    layout = W.find_weights(root)
    assert prefetch.load_order(layout) == [layout.dit, layout.t5, layout.clip, layout.vae]
    assert [p.name for p in prefetch.load_order(layout)] == [
        W.CONVERTED_FILES[c] for c in ("dit", "t5", "clip", "vae")]
