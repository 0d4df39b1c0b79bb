"""Image and video I/O for SCAIL's inputs and outputs (PyAV + Pillow).

Replaces upstream's decord/torchvision/imageio path with the same numbers:

* ``read_image`` gives what upstream's ``ToTensor() * 2 - 1`` gives.
* ``read_video`` gives decord's frames: every frame, in order, RGB24, uint8
  T x H x W x C, and the stream's average frame rate.  Checked bit-exact
  against decord 0.6.0 on H.264/4:2:0 clips (BT.601/BT.709 tags, limited
  and full range) and on upstream's example pose video; 4:2:0 clips with an
  odd height can differ in chroma rounding (no encoder upstream uses writes
  those).
* ``resize_for_rectangle_crop`` is upstream's data_video function as run
  under torchvision >= 0.17 (what upstream pins): bicubic, antialias on,
  align_corners off, uint8 clamped and rounded, then a centre crop.
* ``write_video`` writes H.264 yuv420p at CRF 25, the settings upstream gets
  from imageio's defaults (quality 5), atomically and without clobbering;
  the same frames give the same bytes (see ``_x264_options``).

Files are opened through Python file objects so that paths with spaces and
non-ASCII letters behave the same on Windows as elsewhere.  torch is
imported inside the functions that need it: probing inputs stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, UnidentifiedImageError

from scail_win.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# imageio's default quality 5 maps to libx264 -crf int((1 - 5/10) * 51).
DEFAULT_CRF = 25
# Frames decoded and resized together: bounds the float copy of full-size frames.
RESIZE_CHUNK = 16
_EXIF_ORIENTATION = 0x0112
# FFmpeg's colour enums as frames report them (AVColorSpace, AVColorRange)
# and as swscale takes them (SWS_CS_*); plain ints, which PyAV 13 and 14.1 on
# accept (its enum classes changed between versions; 14.0.0 rejects ints).
_AVCOL_SPC_BT709 = 1
_AVCOL_RANGE_MPEG, _AVCOL_RANGE_JPEG = 1, 2
_SWS_CS_ITU709, _SWS_CS_ITU601 = 1, 5
# One scaling thread where PyAV (17 on) can thread swscale: the result then
# cannot depend on the machine's core count.
_SWS_THREADS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def _frame_to_rgb(frame: "av.VideoFrame", reformatter: VideoReformatter) -> np.ndarray:
    """H x W x 3 RGB24 of a decoded frame, its colour conversion stated in full.

    Left to PyAV's defaults (matrix and range unspecified), conversions in
    one process came out differently depending on what had been decoded and
    encoded before (seen in interleaved writes and reads of the same frames).
    The frame's own matrix and range where it states them (BT.709, full
    range), else BT.601 limited range, FFmpeg's default.  ``reformatter``
    belongs to one file's reads: ``VideoFrame.reformat`` shares one scaler
    per thread from PyAV 19 on, and a scaler that went back and forth
    between reads and writes gave the same frames different bytes.
    """
    space = _SWS_CS_ITU709 if frame.colorspace == _AVCOL_SPC_BT709 else _SWS_CS_ITU601
    src_range = _AVCOL_RANGE_JPEG if frame.color_range == _AVCOL_RANGE_JPEG else _AVCOL_RANGE_MPEG
    return reformatter.reformat(frame, format="rgb24", src_colorspace=space, dst_colorspace=space,
                                src_color_range=src_range, dst_color_range=_AVCOL_RANGE_JPEG,
                                **_SWS_THREADS).to_ndarray()


def _rgb_to_yuv420(pixels: np.ndarray, reformatter: VideoReformatter) -> "av.VideoFrame":
    """A yuv420p frame of RGB24 ``pixels``: BT.601 limited range (FFmpeg's and imageio's default), stated in full.

    ``reformatter`` belongs to one file's writes (see :func:`_frame_to_rgb`).
    """
    rgb = av.VideoFrame.from_ndarray(pixels, format="rgb24")
    return reformatter.reformat(rgb, format="yuv420p", src_colorspace=_SWS_CS_ITU601,
                                dst_colorspace=_SWS_CS_ITU601, src_color_range=_AVCOL_RANGE_JPEG,
                                dst_color_range=_AVCOL_RANGE_MPEG, **_SWS_THREADS)


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe_video`` learns without decoding the whole file."""

    frames: int
    rate: Fraction
    width: int
    height: int

    @property
    def fps(self) -> float:
        return float(self.rate)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully as RGB, mapping every failure to a UserError."""
    try:
        with Image.open(path) as img:
            # PIL opens lazily; convert() decodes, so truncated files fail here.
            rgb = img.convert("RGB")
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise UserError(f"reference image not found: {path}") from None
    except UnidentifiedImageError:
        raise UserError(f"cannot read reference image {path}: not an image format Pillow knows") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read reference image {path}: {_describe(exc)}") from None
    if orientation != 1:
        # Upstream ignores EXIF rotation; so do we, to give the same result.
        log.warning(
            "%s has an EXIF rotation tag that SCAIL ignores (as upstream does); "
            "if the character appears sideways, save the image rotated", path)
    return rgb


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a readable image; UserError naming the file otherwise."""
    img = _open_rgb(path)
    return img.height, img.width


def read_image(path: str | os.PathLike) -> "torch.Tensor":
    """1 x 3 x H x W float32 in [-1, 1], computed as upstream computes it."""
    import torch

    pixels = torch.from_numpy(np.array(_open_rgb(path), dtype=np.uint8))
    unit = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return (unit * 2 - 1).unsqueeze(0)


def sampling_size(height: int, width: int, sampling_image_size: Sequence[int]) -> tuple[int, int]:
    """Target (H, W) for a reference of ``height`` x ``width``.

    ``sampling_image_size`` is (H, W) for landscape references; portrait and
    square ones get it swapped, exactly as upstream decides it.
    """
    first, second = (int(v) for v in sampling_image_size)
    if height < width:
        return first, second
    return second, first


@contextlib.contextmanager
def _open_container(path: str | os.PathLike) -> Iterator["av.container.InputContainer"]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"video not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot open video {path}: {_describe(exc)}") from None
    with handle:
        try:
            container = av.open(handle, mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise UserError(f"cannot read video {path}: {_describe(exc)}") from None
        with container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            yield container


def _stream_rate(stream, path) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate.numerator, rate.denominator)
    raise UserError(f"video {path} does not say its frame rate; re-encode it with a fixed rate")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate and size of ``path``; decodes one frame to prove it is readable.

    The count is the container's (as decord reports it), or the number of
    packets where the container does not store one.
    """
    with _open_container(path) as container:
        stream = container.streams.video[0]
        rate = _stream_rate(stream, path)
        try:
            first = next(container.decode(stream), None)
            if first is None:
                raise UserError(f"video {path} has no frames")
            frames = stream.frames
            if frames <= 0:
                container.seek(0)
                frames = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.error.FFmpegError, ValueError) as exc:
            raise UserError(f"cannot decode video {path}: {_describe(exc)}") from None
        return VideoInfo(frames=frames, rate=rate, width=first.width, height=first.height)


def _iter_frames(path, max_frames: int | None) -> Iterator[np.ndarray]:
    """RGB24 H x W x 3 arrays of ``path``'s frames in order, at most ``max_frames``."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    with _open_container(path) as container:
        # Single-threaded decoding: with FFmpeg's frame threads running while
        # frames are converted, later libx264 encodes in this process came out
        # differently from the same frames (seen 3 in 8 runs; never with one
        # decoding thread).  Decoding is a small part of a job.
        stream = container.streams.video[0]
        reformatter = VideoReformatter()
        count = 0
        try:
            for frame in container.decode(stream):
                yield _frame_to_rgb(frame, reformatter)
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except (av.error.FFmpegError, ValueError) as exc:
            raise UserError(f"cannot decode video {path} after {count} frames: {_describe(exc)}") from None
        if count == 0:
            raise UserError(f"video {path} has no frames")


def video_rate(path: str | os.PathLike) -> Fraction:
    """The stream's average frame rate (decord's ``get_avg_fps``), exactly."""
    with _open_container(path) as container:
        return _stream_rate(container.streams.video[0], path)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple["torch.Tensor", float]:
    """All frames (or the first ``max_frames``) as uint8 T x H x W x 3, and the fps.

    The same tensor upstream's decord reader gives (``get_batch`` of every
    index with the torch bridge) and its ``get_avg_fps``.
    """
    import torch

    rate = video_rate(path)
    frames = np.stack(list(_iter_frames(path, max_frames)))
    return torch.from_numpy(frames), float(rate)


def _resize_bicubic(frames: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """torchvision's tensor resize (bicubic, antialias=True) without torchvision."""
    import torch
    import torch.nn.functional as F

    dtype = frames.dtype
    work = frames if dtype in (torch.float32, torch.float64) else frames.to(torch.float32)
    squeeze = work.ndim == 3
    if squeeze:
        work = work.unsqueeze(0)
    out = F.interpolate(work, size=list(size), mode="bicubic", align_corners=False, antialias=True)
    if squeeze:
        out = out.squeeze(0)
    if out.dtype == dtype:
        return out
    if dtype == torch.uint8:
        out = out.clamp(0, 255)
    if not dtype.is_floating_point:
        out = out.round()
    return out.to(dtype)


def resize_for_rectangle_crop(frames: "torch.Tensor", size: Sequence[int], reshape_mode: str = "center",
                              chunk: int = RESIZE_CHUNK) -> "torch.Tensor":
    """Scale ``frames`` (N x C x H x W or C x H x W) to cover ``size`` = (H, W), then centre-crop.

    Upstream's ``resize_for_rectangle_crop(..., reshape_mode="center")``:
    the scale keeps the aspect ratio and matches the target on the side that
    needs the larger factor (sizes truncated with int()); a frame already at
    the scaled size is not resampled.  Only the centre crop that sampling
    uses exists here (upstream's random crop is for training).  Frames are
    resampled ``chunk`` at a time (each frame's result does not depend on the
    others) to bound memory.
    """
    import torch

    if reshape_mode != "center":
        raise ValueError(f"only reshape_mode='center' is supported, got {reshape_mode!r}")
    if frames.ndim not in (3, 4):
        raise ValueError(f"expected N x C x H x W or C x H x W frames, got shape {tuple(frames.shape)}")
    target_h, target_w = (int(v) for v in size)
    if target_h < 1 or target_w < 1:
        raise ValueError(f"target size must be positive, got {tuple(size)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    height, width = frames.shape[-2:]
    if width / height > target_w / target_h:
        scaled = (target_h, int(width * target_h / height))
    else:
        scaled = (int(height * target_w / width), target_w)
    top = (scaled[0] - target_h) // 2
    left = (scaled[1] - target_w) // 2

    def crop(x):
        return x[..., top:top + target_h, left:left + target_w]

    if scaled == (height, width):
        return crop(frames)
    if frames.ndim == 3:
        return crop(_resize_bicubic(frames, scaled))
    if frames.shape[0] == 0:
        raise ValueError("no frames to resize")
    return torch.cat([crop(_resize_bicubic(frames[i:i + chunk], scaled)) for i in range(0, frames.shape[0], chunk)])


def load_reference_image(path: str | os.PathLike, sampling_image_size: Sequence[int]) -> "torch.Tensor":
    """Upstream's reference tensor: [-1, 1], 1 x 3 x H x W at the (portrait-swapped) target size."""
    image = read_image(path)
    target = sampling_size(image.shape[2], image.shape[3], sampling_image_size)
    return resize_for_rectangle_crop(image, target)


def load_pose_video(path: str | os.PathLike, size: Sequence[int], max_frames: int | None = None,
                    chunk: int = RESIZE_CHUNK) -> tuple["torch.Tensor", float]:
    """Upstream's pose tensor: T x 3 x H x W float32 in [-1, 1] at ``size``, and the fps.

    Same values as reading every frame, resize-cropping them, then
    ``(x - 127.5) / 127.5``; decoded ``chunk`` frames at a time so the
    full-size video never sits in memory as floats.
    """
    import torch

    rate = video_rate(path)
    parts = []
    batch: list[np.ndarray] = []

    def flush():
        raw = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        parts.append((resize_for_rectangle_crop(raw, size, chunk=chunk) - 127.5) / 127.5)
        batch.clear()

    for frame in _iter_frames(path, max_frames):
        batch.append(frame)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    return torch.cat(parts), float(rate)


def downsample_pose(video: "torch.Tensor") -> "torch.Tensor":
    """The ``smpl_downsample`` half-size pose video (bilinear, no antialias), T x C x H/2 x W/2."""
    import torch.nn.functional as F

    return F.interpolate(video, scale_factor=0.5, mode="bilinear", align_corners=False)


def to_uint8_frames(video: "torch.Tensor") -> "torch.Tensor":
    """Decoded T x C x H x W in [-1, 1] -> uint8 T x H x W x C as upstream saves it.

    Upstream clamps ``(x + 1) / 2`` to [0, 1] and truncates ``255 * x``
    (numpy ``astype``), it does not round; kept for identical files.
    """
    import torch

    unit = torch.clamp((video.to(torch.float32) + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * unit).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


_COUNTER = re.compile(r"^(?P<head>.*_)(?P<number>\d+)$")


def next_free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there, else the first free numbered variant.

    A name ending in ``_<digits>`` (upstream's ``<dir>_output_000000.mp4``)
    gets its counter bumped, keeping the width: ``..._000001.mp4``,
    ``..._000002.mp4``.  Other names get ``-1``, ``-2`` before the suffix.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return path
    match = _COUNTER.match(path.stem)
    if match:
        head, digits = match["head"], match["number"]

        def name(k):
            return f"{head}{int(digits) + k:0{len(digits)}d}{path.suffix}"
    else:
        def name(k):
            return f"{path.stem}-{k}{path.suffix}"
    k = 1
    while os.path.lexists(path.with_name(name(k))):
        k += 1
    return path.with_name(name(k))


def _claim(tmp: str, dest: Path) -> None:
    """Move ``tmp`` to ``dest`` in one step, failing with FileExistsError if ``dest`` exists."""
    if os.name == "nt":
        # Windows' rename refuses an existing destination: atomic and no-clobber.
        os.rename(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (FAT, some network shares): a
        # check-then-replace leaves only a tiny window for a race.
        if os.path.lexists(dest):
            raise FileExistsError(dest) from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _as_frame_array(frames) -> np.ndarray:
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 T x H x W x 3, got {array.dtype} {array.shape}")
    if array.shape[0] < 1:
        raise ValueError("frames must hold at least one frame")
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs an even width and height, got {width}x{height}")
    return np.ascontiguousarray(array)


# libx264's AVX-512 routines (PyAV 18.1.1's build, on a Xeon with AVX-512) encoded the same frames
# into different bytes from run to run: 29 different files in 40 writes of one 256x448 clip, 6 in 100
# of a 64x96 one. With the instruction set capped at AVX2 every write matched, at the same speed.
# Every CPU that torch runs at its AVX512 level has all of these; none is named on any other CPU
# (a name the CPU lacks would crash the encoder).
_X264_BELOW_AVX512 = "asm=MMX2,SSE,SSE2,SSE3,SSSE3,SSE4,SSE4.2,LZCNT,AVX,FMA3,BMI1,BMI2,AVX2,Cache64"


def _cpu_capability() -> str:
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def _x264_options() -> tuple:
    """libx264 options beyond the CRF, as (name, value) pairs: the AVX2 cap where the CPU has AVX-512.

    FFmpeg's libx264 wrapper only warns about x264-params it cannot parse, so
    a build that does not know a name keeps encoding.
    """
    return (("x264-params", _X264_BELOW_AVX512),) if _cpu_capability() == "AVX512" else ()


def _encode(frames: np.ndarray, target: str, rate: Fraction, crf: int) -> None:
    with open(target, "wb") as handle, av.open(handle, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), **dict(_x264_options())})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        reformatter = VideoReformatter()
        for index, pixels in enumerate(frames):
            frame = _rgb_to_yuv420(pixels, reformatter)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_video(frames, path: str | os.PathLike, fps: float | Fraction, *, crf: int = DEFAULT_CRF,
                overwrite: bool = False) -> Path:
    """Write uint8 T x H x W x 3 ``frames`` as an H.264 mp4; returns the path written.

    The file appears complete or not at all: frames go to a hidden temporary
    file in the destination folder, which is renamed into place when done
    and deleted on any error.  Unless ``overwrite``, an existing file is
    never replaced: the video takes ``next_free_path(path)`` instead.
    """
    array = _as_frame_array(frames)
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        _encode(array, tmp, rate, crf)
        if overwrite:
            os.replace(tmp, path)
            return path
        while True:
            dest = next_free_path(path)
            try:
                _claim(tmp, dest)
            except FileExistsError:
                continue  # another writer took that name between the check and the claim
            if dest != path:
                log.info("%s exists; wrote %s instead", path, dest.name)
            return dest
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
