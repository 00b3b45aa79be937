"""Augmentation of aligned face crops on batched tensors, on whatever device the batch is on."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F


def random_affine(pixels: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip, small zoom, rotation and shift in one resampling. Faces are aligned, so the ranges stay small:
    enough to cover detector jitter at serving time, not so much that faces leave the frame."""
    batch = pixels.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, device=pixels.device, generator=generator) * (high - low) + low

    angle = uniform(-10.0, 10.0) * strength * math.pi / 180
    scale = 1.0 / uniform(1.0 - 0.1 * strength, 1.0 + 0.15 * strength)
    flip = torch.where(torch.rand(batch, device=pixels.device, generator=generator) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(-0.08, 0.08) * strength, uniform(-0.08, 0.08) * strength
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], dim=1), torch.stack([sin * flip, cos, shift_y], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_colour(pixels: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and saturation jitter, and some grayscale faces: photos in the wild vary in
    exposure and white balance far more than UTKFace does."""
    batch = pixels.shape[0]

    def factor(spread: float) -> torch.Tensor:
        return (1.0 + (torch.rand(batch, 1, 1, 1, device=pixels.device, generator=generator) * 2 - 1) * spread * strength)

    gray = (pixels * torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturation = factor(0.4)
    to_gray = torch.rand(batch, 1, 1, 1, device=pixels.device, generator=generator) < 0.05 * strength
    saturation = torch.where(to_gray, torch.zeros_like(saturation), saturation)
    pixels = gray + (pixels - gray) * saturation
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = mean + (pixels - mean) * factor(0.3)
    return (pixels * factor(0.3)).clamp(0, 255)


def chosen(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """A `(N, 1, 1, 1)` mask picking each face with `probability`."""
    return torch.rand(pixels.shape[0], 1, 1, 1, device=pixels.device, generator=generator) < probability


def per_face(pixels: torch.Tensor, low: float, high: float, generator: torch.Generator | None, channels: int = 1) -> torch.Tensor:
    return torch.rand(pixels.shape[0], channels, 1, 1, device=pixels.device, generator=generator) * (high - low) + low


def random_low_resolution(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Many faces in real photos are 20-60 px, enlarged to the model's input: shrink to 30-90% and back."""
    size = pixels.shape[-1]
    factor = float(torch.rand(1, generator=generator if generator is None or generator.device.type == "cpu" else None)) * 0.6 + 0.3
    small = F.interpolate(pixels, size=max(8, round(size * factor)), mode="area")
    blurred = F.interpolate(small, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(chosen(pixels, probability, generator), blurred, pixels)


def random_blur(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Out-of-focus and motion-blurred faces: a 3x3 Gaussian-like blur of random weight."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=pixels.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(pixels.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), kernel, groups=pixels.shape[1])
    weight = per_face(pixels, 0.5, 1.0, generator)
    return torch.where(chosen(pixels, probability, generator), pixels + (blurred - pixels) * weight, pixels)


def random_noise(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sensor noise of low light and small sensors: Gaussian, standard deviation 2-12 grey levels."""
    noise = torch.randn(pixels.shape, device=pixels.device, generator=generator) * per_face(pixels, 2.0, 12.0, generator)
    return torch.where(chosen(pixels, probability, generator), pixels + noise, pixels)


def random_lighting(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Colour casts of indoor light (per-channel gains 0.8-1.2) and dark photos (gamma 1.2-2.2)."""
    cast = pixels * per_face(pixels, 0.8, 1.2, generator, channels=pixels.shape[1])
    pixels = torch.where(chosen(pixels, probability, generator), cast, pixels)
    dark = 255.0 * (pixels.clamp(0, 255) / 255.0) ** per_face(pixels, 1.2, 2.2, generator)
    return torch.where(chosen(pixels, probability / 2, generator), dark, pixels)


def random_occlusion(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Hands, microphones, glasses and other people: a flat rectangle of 15-35% of the side over part of the
    face."""
    batch, _, height, width = pixels.shape
    side = per_face(pixels, 0.15, 0.35, generator).view(batch, 1, 1)
    x0 = per_face(pixels, 0.0, 1.0, generator).view(batch, 1, 1) * (1 - side)
    y0 = per_face(pixels, 0.0, 1.0, generator).view(batch, 1, 1) * (1 - side)
    xs = torch.linspace(0, 1, width, device=pixels.device).view(1, 1, width)
    ys = torch.linspace(0, 1, height, device=pixels.device).view(1, height, 1)
    inside = ((xs >= x0) & (xs <= x0 + side) & (ys >= y0) & (ys <= y0 + side)).unsqueeze(1)
    fill = per_face(pixels, 0.0, 255.0, generator, channels=pixels.shape[1])
    mask = inside & chosen(pixels, probability, generator)
    return torch.where(mask, fill.expand_as(pixels), pixels)


def random_cut_off(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """A face cut by the photo's border or by a tight face crop: the aligner fills what lies past the photo by
    repeating its edge, so each side of a chosen face is, with even odds, cut by 3-30% of the side and filled
    with the last row or column kept. Off by default: fine-tuned with it (15% of faces), the shipped model
    aged faces cut to their centre 65% 1.2 years worse than whole ones instead of 2.0, but whole faces 0.08
    years worse than the same fine-tune without it (README: Training)."""
    batch, _, height, width = pixels.shape
    cut = per_face(pixels, 0.03, 0.3, generator, channels=4).view(batch, 4)
    cut = cut * (torch.rand(batch, 4, device=pixels.device, generator=generator) < 0.5)
    cut = cut * chosen(pixels, probability, generator).view(batch, 1)
    top, bottom = (cut[:, 0] * height).long(), height - 1 - (cut[:, 1] * height).long()
    left, right = (cut[:, 2] * width).long(), width - 1 - (cut[:, 3] * width).long()
    rows = torch.arange(height, device=pixels.device).view(1, height).clamp(top.view(batch, 1), bottom.view(batch, 1))
    cols = torch.arange(width, device=pixels.device).view(1, width).clamp(left.view(batch, 1), right.view(batch, 1))
    faces = torch.arange(batch, device=pixels.device).view(batch, 1, 1)
    return pixels[faces, :, rows.view(batch, height, 1), cols.view(batch, 1, width)].permute(0, 3, 1, 2)


def random_jpeg(pixels: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """JPEG artefacts of quality 30-90, as in photos that were shared and re-saved. JPEG coding has no tensor
    form, so the chosen faces pass through PIL on the CPU (about 0.1 ms per 64 px face)."""
    from PIL import Image

    picked = torch.nonzero(chosen(pixels, probability, generator).view(-1)).view(-1).tolist()
    if not picked:
        return pixels
    qualities = per_face(pixels, 30, 90, generator).view(-1).round().int().tolist()
    faces = pixels[picked].clamp(0, 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    coded = []
    for face, index in zip(faces, picked):
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, format="JPEG", quality=qualities[index])
        coded.append(np.asarray(Image.open(buffer).convert("RGB")))
    pixels = pixels.clone()
    pixels[picked] = torch.from_numpy(np.stack(coded)).to(pixels.device).permute(0, 3, 1, 2).float()
    return pixels


def random_degradation(pixels: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """What faces cut from real photos look like and UTKFace's clean 200 px crops do not: low resolution, blur,
    noise, colour casts and low light, occlusion and JPEG artefacts. `strength` scales how often each occurs."""
    p = min(1.0, strength)
    pixels = random_low_resolution(pixels, 0.4 * p, generator)
    pixels = random_blur(pixels, 0.25 * p, generator)
    pixels = random_lighting(pixels, 0.3 * p, generator)
    pixels = random_occlusion(pixels, 0.2 * p, generator)
    pixels = random_noise(pixels, 0.25 * p, generator)
    return random_jpeg(pixels.clamp(0, 255), 0.3 * p, generator)


def augment_batch(
    pixels: torch.Tensor,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    degrade_strength: float = 0.0,
    cut_off_probability: float = 0.0,
) -> torch.Tensor:
    """uint8 `(N, H, W, 3)` faces to augmented float `(N, 3, H, W)` on the 0-255 scale; strength 0 is a no-op.
    `degrade_strength` > 0 adds the real-photo degradations of `random_degradation`, `cut_off_probability` the
    share of faces cut as by a photo's border (`random_cut_off`)."""
    pixels = pixels.permute(0, 3, 1, 2).float()
    if strength > 0:
        pixels = random_colour(random_affine(pixels, strength, generator), strength, generator)
    if degrade_strength > 0:
        pixels = random_degradation(pixels, degrade_strength, generator)
    if cut_off_probability > 0:
        pixels = random_cut_off(pixels, cut_off_probability, generator)
    return pixels
