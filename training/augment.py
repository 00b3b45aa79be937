"""Augmentation of aligned face crops on batched tensors, on whatever device the batch is on."""

from __future__ import annotations

import math

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


def augment_batch(pixels: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 `(N, H, W, 3)` faces to augmented float `(N, 3, H, W)` on the 0-255 scale; strength 0 is a no-op."""
    pixels = pixels.permute(0, 3, 1, 2).float()
    if strength <= 0:
        return pixels
    return random_colour(random_affine(pixels, strength, generator), strength, generator)
