"""A dependency-free loss chart (PIL) for previews on a node and in headless runs."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from .progress import Smoother


def loss_chart(history: Sequence[tuple[int, float, float]], width: int = 512, height: int = 256) -> Image.Image:
    """Raw loss (light) and smoothed loss (dark) against the step; axis labels show the ranges."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    points = [(s, lo) for s, lo, _ in history if lo == lo and abs(lo) != float("inf")]
    if not points:
        draw.text((left + 8, top + 8), "no steps yet", fill=(80, 80, 80))
        return img
    smoother = Smoother(0.9)
    smooth = [(s, smoother.update(lo)) for s, lo in points]
    s0, s1 = points[0][0], max(points[-1][0], points[0][0] + 1)
    lo_min = min(lo for _, lo in points)
    lo_max = max(max(lo for _, lo in points), lo_min + 1e-8)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (right - left)
        y = bottom - (loss - lo_min) / (lo_max - lo_min) * (bottom - top)
        return x, y

    if len(points) > 1:
        draw.line([xy(s, lo) for s, lo in points], fill=(160, 190, 230), width=1)
        draw.line([xy(s, lo) for s, lo in smooth], fill=(20, 70, 160), width=2)
    else:
        x, y = xy(*points[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 70, 160))
    draw.text((2, top), f"{lo_max:.3g}", fill=(60, 60, 60))
    draw.text((2, bottom - 10), f"{lo_min:.3g}", fill=(60, 60, 60))
    draw.text((left, bottom + 4), f"step {s0}", fill=(60, 60, 60))
    label = f"step {points[-1][0]} · loss {smooth[-1][1]:.4f}"
    draw.text((right - 7 * len(label), bottom + 4), label, fill=(60, 60, 60))
    return img
