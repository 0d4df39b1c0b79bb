"""SCAIL-Pose's capsule renderer (render_3d/taichi_cylinder.py render_whole) in PyTorch.

Same image as the Taichi kernel, without Taichi: a pinhole camera at the
origin looking down +z (pixel (x, y) -> ray (x - cx) / fx, (y - cy) / fy, 1,
no half-pixel offset), every limb a capsule of one radius (the "cylinder"
SDF clamps the projection onto the segment, so the ends are round), and the
same sphere tracing -- start at t = 0.1, at most 300 steps, a hit below
1e-3, steps of at least 1e-4, give up past zfar -- so that rays grazing a
limb hit or miss as they do upstream.  A hit is shaded as upstream: normal
by central differences (1e-3) of the scene SDF, diffuse 0.3 + 0.7 max(-n_z,
0) from a light along +z, a Blinn-Phong highlight 0.5 max(n.h, 0)^32, all
times a depth factor 1 - (z - near) / (far - 0.1) whose near/far come from
the whole video's z range; alpha is the limb's (0.8), background 0.  All in
float32 like the kernel, then clipped, times 255, truncated to uint8.

Rays that cannot come within reach of any capsule (outside every capsule's
bounding sphere, with a margin) are not traced: sphere tracing can only miss
them, so skipping them changes no pixel.  Frames are processed in batches
and rays in a bounded pool, which bounds memory whatever the video length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ZNEAR = 0.1
MAX_STEPS = 300
HIT_DISTANCE = 1e-3
MIN_STEP = 1e-4
NORMAL_STEP = 1e-3
NO_SURFACE = 1e6  # the kernel's initial "nearest distance"; nothing farther is seen
DEGENERATE_LENGTH = 1e-8
SHININESS = 32
# Elements of one (rays x cylinders) plane of the ray pool: 8 MiB per float
# plane, a few dozen MiB of live temporaries while tracing.
CHUNK_ELEMENTS = 1 << 21


def _flatten(specs_per_frame, device):
    """Per-frame cylinder tables, padded to the largest count (padding is marked invalid)."""
    counts = [len(specs) for specs in specs_per_frame]
    frames, most = len(counts), max(counts, default=0)
    starts = np.zeros((frames, max(most, 1), 3), np.float32)
    ends = np.zeros_like(starts)
    colors = np.zeros((frames, max(most, 1), 4), np.float32)
    valid = np.zeros((frames, max(most, 1)), bool)
    for f, specs in enumerate(specs_per_frame):
        for k, (start, end, rgba) in enumerate(specs):
            starts[f, k], ends[f, k], colors[f, k] = start, end, rgba
            valid[f, k] = True
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_tensor(starts), as_tensor(ends), as_tensor(colors), as_tensor(valid), counts


class _Scene:
    """One batch of frames' capsules, laid out for evaluating the SDF of many rays at once."""

    def __init__(self, starts, ends, valid, radius):
        self.a, self.b = starts, ends
        ba = ends - starts
        self.h = torch.sqrt((ba * ba).sum(-1))
        self.degenerate = self.h < DEGENERATE_LENGTH
        self.ba_n = torch.where(self.degenerate[..., None], torch.zeros_like(ba), ba / self.h[..., None])
        self.valid = valid
        self.radius = radius

    def sdf(self, p, frame):
        """(nearest distance capped at NO_SURFACE, index of the first nearest capsule) for points p (n, 3)."""
        pa = p[:, None, :] - self.a[frame]
        ba_n = self.ba_n[frame]
        proj = (pa * ba_n).sum(-1)
        proj = torch.minimum(proj.clamp(min=0.0), self.h[frame])
        q = pa - proj[..., None] * ba_n
        dist = torch.sqrt((q * q).sum(-1)) - self.radius
        sphere = torch.sqrt((pa * pa).sum(-1)) - self.radius
        dist = torch.where(self.degenerate[frame], sphere, dist)
        dist = torch.where(self.valid[frame], dist, torch.full_like(dist, float("inf")))
        nearest = torch.argmin(dist, dim=1)  # first minimum, as the kernel's strict "<"
        best = dist.gather(1, nearest[:, None])[:, 0]
        return best.clamp(max=NO_SURFACE), nearest


def _normalized(v):
    return v * (1.0 / torch.sqrt((v * v).sum(-1, keepdim=True)))


def _pixel_rays(height, width, fx, fy, cx, cy, device):
    f32 = dict(dtype=torch.float32, device=device)
    x = torch.arange(width, **f32)
    y = torch.arange(height, **f32)
    u = (x - torch.tensor(cx, **f32)) / torch.tensor(fx, **f32)
    v = (y - torch.tensor(cy, **f32)) / torch.tensor(fy, **f32)
    uu, vv = u[None, :].expand(height, width), v[:, None].expand(height, width)
    rays = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1).reshape(-1, 3)
    return _normalized(rays)


def _candidates(rays, scene, batch_frames, radius):
    """(frame in batch, pixel) of the rays that pass within reach of some capsule's bounding sphere."""
    centre = (scene.a + scene.b) * 0.5
    reach = (scene.h * 0.5 + radius) * 1.01 + 2 * HIT_DISTANCE
    reach = torch.where(scene.valid, reach, torch.full_like(reach, -1.0))
    frames, pixels = [], []
    step = max(1, CHUNK_ELEMENTS // max(1, centre.shape[1]))
    for f in range(batch_frames):
        m, r = centre[f], reach[f]
        for p0 in range(0, rays.shape[0], step):
            d = rays[p0:p0 + step]
            # Distance from the capsule's centre to the ray's line, |m x d| (d is a
            # unit vector): no cancellation, unlike |m|^2 - (m.d)^2, and elementwise,
            # since a TF32 matmul would be too coarse for the margin.
            cross_x = m[:, 1] * d[:, 2:3] - m[:, 2] * d[:, 1:2]
            cross_y = m[:, 2] * d[:, 0:1] - m[:, 0] * d[:, 2:3]
            cross_z = m[:, 0] * d[:, 1:2] - m[:, 1] * d[:, 0:1]
            near = (cross_x * cross_x + cross_y * cross_y + cross_z * cross_z) < r * r
            hit = torch.nonzero((near & (r > 0)).any(dim=1))[:, 0] + p0
            pixels.append(hit)
            frames.append(torch.full_like(hit, f))
    return torch.cat(frames), torch.cat(pixels)


def _trace(rays, cand_frame, cand_pixel, scene, zfar, pool):
    """Sphere-trace the candidate rays; returns their hit mask, hit points and capsule index.

    At most `pool` rays are marched at once and the pool is refilled as rays
    hit or give up, so the few grazing rays that need all 300 steps share
    their late iterations with fresh rays instead of each chunk paying them.
    """
    total, device = cand_pixel.numel(), rays.device
    hit_mask = torch.zeros(total, dtype=torch.bool, device=device)
    hit_p = torch.zeros((total, 3), dtype=torch.float32, device=device)
    hit_k = torch.zeros(total, dtype=torch.long, device=device)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    t = torch.zeros(0, dtype=torch.float32, device=device)
    steps = torch.zeros(0, dtype=torch.int32, device=device)
    queued = 0
    while True:
        room = min(pool - ids.numel(), total - queued)
        if room > 0:
            ids = torch.cat([ids, torch.arange(queued, queued + room, device=device)])
            t = torch.cat([t, torch.full((room,), ZNEAR, dtype=torch.float32, device=device)])
            steps = torch.cat([steps, torch.zeros(room, dtype=torch.int32, device=device)])
            queued += room
        if ids.numel() == 0:
            break
        p = rays[cand_pixel[ids]] * t[:, None]
        d, k = scene.sdf(p, cand_frame[ids])
        hit = d < HIT_DISTANCE
        # Active rays have not hit yet: write every one (a miss writes False and a
        # point that a later hit overwrites), which needs no device sync.
        hit_mask[ids] = hit
        hit_p[ids] = p
        hit_k[ids] = k
        steps = steps + 1
        # The one sync per step: which rays march on.
        go = torch.nonzero(~hit & ~(t > zfar) & (steps < MAX_STEPS))[:, 0]
        t = (t + d.clamp(min=MIN_STEP))[go]
        ids, steps = ids[go], steps[go]
    return hit_mask, hit_p, hit_k


def _shade(p, rd, frame, k, scene, colors, near, denom):
    """RGBA in [0, 1] of hit points p, as the kernel's Blinn-Phong with depth fade."""
    grads = []
    for axis in range(3):
        offset = torch.zeros(3, dtype=torch.float32, device=p.device)
        offset[axis] = NORMAL_STEP
        grads.append(scene.sdf(p + offset, frame)[0] - scene.sdf(p - offset, frame)[0])
    n = _normalized(torch.stack(grads, dim=-1))
    diffuse = (-n[:, 2]).clamp(min=0.0)
    view = -_normalized(rd)
    light_back = torch.tensor([0.0, 0.0, -1.0], device=p.device)
    half = _normalized(view + light_back)
    spec = (n * half).sum(-1).clamp(min=0.0) ** SHININESS
    depth = (1.0 - (p[:, 2] - near) / denom).clamp(0.0, 1.0)
    rgba = colors[frame, k]
    base = rgba[:, :3] * (0.3 + 0.7 * diffuse)[:, None] * depth[:, None]
    highlight = (0.5 * spec * depth)[:, None]
    return torch.cat([base + highlight, rgba[:, 3:]], dim=-1)


def render_cylinders(specs_per_frame: Sequence[Sequence], height: int, width: int, fx: float, fy: float,
                     cx: float, cy: float, radius: float = 21.5, device=None, batch: int = 16,
                     progress: bool = False) -> np.ndarray:
    """Render each frame's (start, end, rgba) capsules: (T, height, width, 4) uint8 RGBA.

    specs_per_frame: per frame, the list skeleton.cylinder_specs returns.
    Camera intrinsics in pixels; radius in the joints' unit (NLF: mm).
    device: torch device to compute on (default CPU); batch: frames per pass.
    """
    from tqdm import tqdm

    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    device = torch.device(device if device is not None else "cpu")
    frames = len(specs_per_frame)
    out = np.zeros((frames, height, width, 4), np.uint8)
    starts, ends, colors, valid, counts = _flatten(specs_per_frame, device)
    if sum(counts) == 0:
        return out

    # The depth range of the whole video, in float32 as the kernel sees it.
    zs = torch.cat([starts[..., 2][valid], ends[..., 2][valid]]).cpu().numpy()
    z_min, z_max = zs.min(), zs.max()
    zfar = float(max(min(z_max, np.float32(25000)), np.float32(10000)))
    near = np.float32(max(z_min, np.float32(ZNEAR)))
    far = np.float32(min(z_max + np.float32(6000), np.float32(20000)))
    denom = float(far - np.float32(ZNEAR))

    rays = _pixel_rays(height, width, fx, fy, cx, cy, device)
    pixels = height * width
    pool = max(1, CHUNK_ELEMENTS // starts.shape[1])
    with torch.no_grad(), tqdm(total=frames, desc="render 3D", unit="frame", disable=not progress) as bar:
        for f0 in range(0, frames, batch):
            f1 = min(frames, f0 + batch)
            scene = _Scene(starts[f0:f1], ends[f0:f1], valid[f0:f1], radius)
            image = torch.zeros(((f1 - f0) * pixels, 4), dtype=torch.uint8, device=device)
            cand_f, cand_p = _candidates(rays, scene, f1 - f0, radius)
            hit, p, k = _trace(rays, cand_f, cand_p, scene, zfar, pool)
            cand_f, cand_p, p, k = cand_f[hit], cand_p[hit], p[hit], k[hit]
            for c0 in range(0, cand_f.numel(), pool):  # shading evaluates the SDF 6 times: chunked too
                fr, px = cand_f[c0:c0 + pool], cand_p[c0:c0 + pool]
                rgba = _shade(p[c0:c0 + pool], rays[px], fr, k[c0:c0 + pool], scene, colors[f0:f1],
                              float(near), denom)
                image[fr * pixels + px] = (rgba.clamp(0.0, 1.0) * 255).to(torch.uint8)
            out[f0:f1] = image.reshape(f1 - f0, height, width, 4).cpu().numpy()
            bar.update(f1 - f0)
    return out
