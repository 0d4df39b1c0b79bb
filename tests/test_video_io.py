"""scail_win.io.video: PyAV/Pillow I/O, upstream's resize-crop, atomic output."""

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scail_win.io import video as video_io
from scail_win.errors import UserError

ODD_FOLDER = "clip dir ü 日本"


def pattern(frames, height, width, seed=0):
    """Smooth moving gradients: survive lossy H.264 closely, differ per frame."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6.28, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        for c in range(3):
            wave = np.sin(xx / (13 + 4 * c) + yy / (17 + 2 * c) + phase[c] + 0.4 * t)
            out[t, :, :, c] = np.round(127.5 + 100 * wave).astype(np.uint8)
    return out


def encode_clip(path, frames, rate=25, pix_fmt="yuv420p", crf=0):
    """Write ``frames`` with PyAV directly (independent of write_video); yuv444p allows odd sizes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf)})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def reference_resize_crop(x, size):
    """Upstream's data_video.resize_for_rectangle_crop with torchvision's tensor resize, spelled out."""
    target_h, target_w = size
    h, w = x.shape[-2:]
    if w / h > target_w / target_h:
        new = [target_h, int(w * target_h / h)]
    else:
        new = [int(h * target_w / w), target_w]
    y = x
    if new != [h, w]:
        y = F.interpolate(x.to(torch.float32) if x.dtype == torch.uint8 else x, size=new,
                          mode="bicubic", align_corners=False, antialias=True)
        if x.dtype == torch.uint8:
            y = torch.round(y.clamp(0, 255)).to(torch.uint8)
    top, left = (new[0] - target_h) // 2, (new[1] - target_w) // 2
    return y[..., top:top + target_h, left:left + target_w]


def no_temp_files(folder):
    return not [p for p in Path(folder).iterdir() if p.name.endswith(".part")]


# -- reading videos -------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,pix_fmt", [
    (48, 64, "yuv420p"),      # landscape
    (80, 48, "yuv420p"),      # portrait
    (47, 65, "yuv444p"),      # odd sizes (4:2:0 cannot hold them)
])
def test_read_video_gives_every_frame_in_order(tmp_path, height, width, pix_fmt):
    frames = pattern(7, height, width)
    path = encode_clip(tmp_path / ODD_FOLDER / "pose video.mp4", frames, rate=Fraction(30000, 1001),
                       pix_fmt=pix_fmt)
    video, fps = video_io.read_video(path)
    assert video.dtype == torch.uint8 and tuple(video.shape) == (7, height, width, 3)
    assert fps == pytest.approx(30000 / 1001, abs=0)
    # crf 0 leaves only the RGB<->YUV rounding (and 4:2:0 chroma) between in and out
    error = np.abs(video.numpy().astype(int) - frames.astype(int))
    assert error.mean() < 3
    # order: each decoded frame is nearest to its own source frame
    for t in range(7):
        distances = [np.abs(video[t].numpy().astype(int) - f.astype(int)).mean() for f in frames]
        assert int(np.argmin(distances)) == t


def test_read_video_max_frames_is_a_prefix(tmp_path):
    path = encode_clip(tmp_path / "a.mp4", pattern(9, 32, 48))
    full, _ = video_io.read_video(path)
    head, fps = video_io.read_video(path, max_frames=4)
    assert fps == 25.0
    assert torch.equal(head, full[:4])
    with pytest.raises(ValueError):
        video_io.read_video(path, max_frames=0)


@pytest.mark.parametrize("name", ["p.mp4", "p.mkv"])   # Matroska stores no frame count: packets are counted
def test_probe_video(tmp_path, name):
    path = encode_clip(tmp_path / ODD_FOLDER / name, pattern(11, 48, 80), rate=16)
    info = video_io.probe_video(path)
    assert (info.frames, info.width, info.height) == (11, 80, 48)
    assert info.rate == Fraction(16) and info.fps == 16.0
    assert info.frames == video_io.read_video(path)[0].shape[0]


@pytest.mark.parametrize("content", [None, b"", b"this is not a video\n" * 50])
def test_unreadable_video_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / ODD_FOLDER / "rendered.mp4"
    path.parent.mkdir()
    if content is not None:
        path.write_bytes(content)
    for call in (video_io.probe_video, video_io.read_video):
        with pytest.raises(UserError) as caught:
            call(path)
        assert str(path) in str(caught.value)
        assert "\n" not in str(caught.value)


# -- reading images --------------------------------------------------------------------------


@pytest.mark.parametrize("mode,suffix", [("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("P", ".png")])
def test_read_image_is_totensor_times_two_minus_one(tmp_path, mode, suffix):
    rgb = pattern(1, 21, 34)[0]
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ODD_FOLDER / f"ref image{suffix}"
    path.parent.mkdir()
    image.save(path)
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    got = video_io.read_image(path)
    assert got.dtype == torch.float32 and tuple(got.shape) == (1, 3, 21, 34)
    assert torch.equal(got[0], expected * 2 - 1)
    assert got.min() >= -1 and got.max() <= 1
    assert video_io.probe_image(path) == (21, 34)


def test_read_image_keeps_stored_orientation_and_warns_about_exif(tmp_path, caplog):
    rgb = pattern(1, 20, 30)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "ref.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    with caplog.at_level("WARNING", logger="scail_win.io.video"):
        image = video_io.read_image(path)
    assert tuple(image.shape) == (1, 3, 20, 30)  # not rotated, as upstream
    assert "EXIF" in caplog.text


@pytest.mark.parametrize("content", [None, b"not an image", "truncated"])
def test_unreadable_image_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / ODD_FOLDER / "ref.jpg"
    path.parent.mkdir()
    if content == "truncated":
        Image.fromarray(pattern(1, 64, 64)[0]).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        video_io.read_image(path)
    assert str(path) in str(caught.value)


def test_sampling_size_swaps_for_portrait_and_square():
    assert video_io.sampling_size(1080, 1920, [512, 896]) == (512, 896)
    assert video_io.sampling_size(1920, 1080, [512, 896]) == (896, 512)
    assert video_io.sampling_size(700, 700, [512, 896]) == (896, 512)


# -- resize and crop ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 47, 65), (2, 3, 101, 37), (2, 3, 64, 64), (1, 3, 90, 160)])
@pytest.mark.parametrize("size", [(32, 32), (48, 80), (80, 48), (64, 112), (90, 160)])
def test_resize_for_rectangle_crop_matches_upstream_formula(shape, size):
    generator = torch.Generator().manual_seed(sum(shape) + sum(size))
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    got = video_io.resize_for_rectangle_crop(frames, list(size), reshape_mode="center")
    assert got.dtype == torch.uint8 and tuple(got.shape) == shape[:2] + size
    assert torch.equal(got, reference_resize_crop(frames, size))
    image = frames[:1].to(torch.float32) / 255 * 2 - 1   # the reference image path: floats, unclamped
    assert torch.equal(video_io.resize_for_rectangle_crop(image, size), reference_resize_crop(image, size))


def test_resize_for_rectangle_crop_chunking_and_3d_input_change_nothing():
    frames = torch.randint(0, 256, (10, 3, 36, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = video_io.resize_for_rectangle_crop(frames, (64, 112), chunk=100)
    assert torch.equal(whole, video_io.resize_for_rectangle_crop(frames, (64, 112), chunk=3))
    assert torch.equal(whole[4], video_io.resize_for_rectangle_crop(frames[4], (64, 112)))


def test_resize_for_rectangle_crop_is_centred_and_bounded():
    constant = torch.full((1, 3, 30, 40), 200, dtype=torch.uint8)
    assert torch.equal(video_io.resize_for_rectangle_crop(constant, (64, 64)), torch.full((1, 3, 64, 64), 200,
                                                                                           dtype=torch.uint8))
    # a wide frame with distinct left/right thirds: the centre crop keeps only the middle
    wide = torch.zeros((1, 1, 32, 96), dtype=torch.uint8)
    wide[..., 32:64] = 255
    assert torch.equal(video_io.resize_for_rectangle_crop(wide, (32, 32)), torch.full((1, 1, 32, 32), 255,
                                                                                     dtype=torch.uint8))
    # a frame already at the target size is returned untouched (no resampling)
    frames = torch.randint(0, 256, (2, 3, 48, 80), dtype=torch.uint8)
    assert torch.equal(video_io.resize_for_rectangle_crop(frames, (48, 80)), frames)
    with pytest.raises(ValueError):
        video_io.resize_for_rectangle_crop(frames, (48, 80), reshape_mode="random")


def test_resize_matches_torchvision_when_installed():
    functional = pytest.importorskip("torchvision.transforms.functional")
    modes = pytest.importorskip("torchvision.transforms").InterpolationMode
    frames = torch.randint(0, 256, (2, 3, 47, 65), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for size in ((32, 32), (64, 112), (112, 64)):
        h, w = frames.shape[-2:]
        new = [size[0], int(w * size[0] / h)] if w / h > size[1] / size[0] else [int(h * size[1] / w), size[1]]
        resized = functional.resize(frames, size=new, interpolation=modes.BICUBIC)
        expected = functional.crop(resized, (new[0] - size[0]) // 2, (new[1] - size[1]) // 2, *size)
        assert torch.equal(video_io.resize_for_rectangle_crop(frames, size), expected)


def test_load_pose_video_is_read_resize_normalise(tmp_path):
    path = encode_clip(tmp_path / ODD_FOLDER / "rendered.mp4", pattern(10, 36, 50), rate=16)
    frames, fps = video_io.read_video(path)
    expected = (reference_resize_crop(frames.permute(0, 3, 1, 2), (64, 96)) - 127.5) / 127.5
    got, got_fps = video_io.load_pose_video(path, (64, 96), chunk=3)
    assert got_fps == fps == 16.0
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    head, _ = video_io.load_pose_video(path, (64, 96), max_frames=5)
    assert torch.equal(head, expected[:5])
    half = video_io.downsample_pose(got)
    assert tuple(half.shape) == (10, 3, 32, 48)


def test_load_reference_image_swaps_for_portrait(tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(pattern(1, 90, 60)[0]).save(path)
    image = video_io.load_reference_image(path, (32, 64))
    assert tuple(image.shape) == (1, 3, 64, 32)
    assert torch.equal(image, reference_resize_crop(video_io.read_image(path), (64, 32)))


def test_to_uint8_frames_truncates_like_upstream():
    video = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(6, 1, 1, 1).expand(6, 3, 1, 2)
    frames = video_io.to_uint8_frames(video)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (6, 1, 2, 3)
    # (0.999 + 1) / 2 * 255 = 254.87 -> 254 (truncated, not rounded); 0 -> 127.5 -> 127
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 127, 254, 255, 255]


# -- writing videos --------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [16, 12.5, Fraction(30000, 1001), 30000 / 1001])
def test_write_then_read_round_trip(tmp_path, fps):
    frames = pattern(9, 48, 80)
    target = tmp_path / ODD_FOLDER / "out put" / "001_output_000000.mp4"
    written = video_io.write_video(torch.from_numpy(frames), target, fps)
    assert written == target and target.is_file()
    video, got_fps = video_io.read_video(target)
    assert tuple(video.shape) == (9, 48, 80, 3)
    assert got_fps == pytest.approx(float(fps), rel=1e-9)
    assert np.abs(video.numpy().astype(int) - frames.astype(int)).mean() < 6
    with av.open(str(target)) as container:
        codec = container.streams.video[0].codec_context
        assert (codec.name, codec.pix_fmt) == ("h264", "yuv420p")
    assert no_temp_files(target.parent)


def test_round_trips_do_not_depend_on_earlier_conversions(tmp_path):
    # The same frames written and read in turn used to come back as different
    # files: PyAV's default colour conversions and frame-threaded decoding
    # both made later encodes in the process differ (most runs of 20 turns).
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    files, decoded = [], []
    for i in range(16):
        files.append(video_io.write_video(frames, tmp_path / f"clip{i}.mp4", 16))
        decoded.append(video_io.read_video(files[-1])[0])
    assert len({f.read_bytes() for f in files}) == 1
    assert all(torch.equal(decoded[0], d) for d in decoded[1:])


def smooth_noise(frames, height, width, seed=0):
    """Frames like a DiT's with random weights: noise at 1/8 size, upsampled bilinearly."""
    small = torch.rand(frames, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return video_io.to_uint8_frames(F.interpolate(small, size=(height, width), mode="bilinear"))


def test_the_same_frames_give_the_same_file(tmp_path):
    # On AVX-512 CPUs libx264's own routines made 29 different files of 40 writes of such a
    # clip (see video._x264_options); elsewhere the cap is not applied and this holds anyway.
    frames = smooth_noise(17, 256, 448)
    files = [video_io.write_video(frames, tmp_path / f"clip{i}.mp4", 16) for i in range(10)]
    assert len({f.read_bytes() for f in files}) == 1


@pytest.fixture
def fresh_x264_options():
    video_io._x264_options.cache_clear()
    yield video_io._x264_options
    video_io._x264_options.cache_clear()


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT", "SVE256", "unknown"])
def test_x264_keeps_its_instruction_set_below_avx512(monkeypatch, fresh_x264_options, capability):
    monkeypatch.setattr(video_io, "_cpu_capability", lambda: capability)
    assert fresh_x264_options() == ()


def test_x264_is_capped_at_avx2_on_avx512_cpus(fresh_x264_options):
    if video_io._cpu_capability() != "AVX512":
        pytest.skip(f"this CPU runs torch at {video_io._cpu_capability()}, not AVX512")
    assert fresh_x264_options() == (("x264-params", video_io._X264_BELOW_AVX512),)


def test_write_video_never_overwrites(tmp_path):
    target = tmp_path / "001" / "001_output_000000.mp4"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    frames = pattern(3, 32, 32)
    first = video_io.write_video(frames, target, 16)
    second = video_io.write_video(frames, target, 16)
    assert first.name == "001_output_000001.mp4" and second.name == "001_output_000002.mp4"
    assert target.read_bytes() == b"precious"
    assert video_io.read_video(first)[0].shape[0] == 3
    assert no_temp_files(target.parent)
    replaced = video_io.write_video(frames, target, 16, overwrite=True)
    assert replaced == target and video_io.probe_video(target).frames == 3


@pytest.mark.skipif(os.name == "nt", reason="the hard-link path is POSIX only")
def test_write_video_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"keep")
    written = video_io.write_video(pattern(2, 16, 16), target, 8)
    assert written.name == "clip-1.mp4" and target.read_bytes() == b"keep"
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("encoder died"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, error):
    def broken(frames, target, rate, crf):
        Path(target).write_bytes(b"half a video")
        raise error

    monkeypatch.setattr(video_io, "_encode", broken)
    with pytest.raises(type(error)):
        video_io.write_video(pattern(2, 16, 16), tmp_path / "out.mp4", 16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frames,fps", [
    (np.zeros((2, 15, 16, 3), np.uint8), 16),      # odd height: no 4:2:0
    (np.zeros((2, 16, 16, 3), np.float32), 16),    # not uint8
    (np.zeros((0, 16, 16, 3), np.uint8), 16),      # no frames
    (np.zeros((2, 16, 16), np.uint8), 16),         # no channels
    (np.zeros((2, 16, 16, 3), np.uint8), 0),       # no rate
])
def test_write_video_rejects_bad_input(tmp_path, frames, fps):
    with pytest.raises(ValueError):
        video_io.write_video(frames, tmp_path / "x.mp4", fps)
    assert list(tmp_path.iterdir()) == []


def test_next_free_path(tmp_path):
    first = tmp_path / "001_output_000000.mp4"
    assert video_io.next_free_path(first) == first
    first.touch()
    assert video_io.next_free_path(first).name == "001_output_000001.mp4"
    (tmp_path / "001_output_000001.mp4").touch()
    assert video_io.next_free_path(first).name == "001_output_000002.mp4"
    nine = tmp_path / "a_09.mp4"
    nine.touch()
    assert video_io.next_free_path(nine).name == "a_10.mp4"
    plain = tmp_path / "my video.mp4"
    plain.touch()
    assert video_io.next_free_path(plain).name == "my video-1.mp4"


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_next_free_path_counts_a_dangling_link_as_taken(tmp_path):
    link = tmp_path / "x_000000.mp4"
    link.symlink_to(tmp_path / "gone.mp4")
    assert video_io.next_free_path(link).name == "x_000001.mp4"


# -- against the real upstream readers, where they are installed -----------------------------


def test_read_video_matches_decord_when_installed(tmp_path):
    decord = pytest.importorskip("decord")
    path = encode_clip(tmp_path / "rendered.mp4", pattern(6, 48, 80), crf=23)
    reader = decord.VideoReader(str(path), height=-1, width=-1)
    expected = reader.get_batch(list(range(len(reader)))).asnumpy()
    video, fps = video_io.read_video(path)
    assert np.array_equal(video.numpy(), expected)
    assert fps == reader.get_avg_fps()
