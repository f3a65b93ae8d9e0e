"""Pictures of coloured shapes: the built-in prompts' images (and the test fixtures' calibration images)."""

from __future__ import annotations

import random

SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def draw_shapes(rng: random.Random, size: tuple[int, int], count: int = 2, background=None):
    """A picture of ``count`` coloured shapes; returns it with the shapes' names ("red circle", ...)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background or (rng.randint(200, 255),) * 3)
    draw = ImageDraw.Draw(image)
    regions = []
    for _ in range(count):
        color, shape = rng.choice(list(SHAPE_COLORS)), rng.choice(SHAPES)
        x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
        x1 = x0 + rng.randint(max(12, width // 6), width // 2)
        y1 = y0 + rng.randint(max(12, height // 6), height // 2)
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=SHAPE_COLORS[color])
        elif shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=SHAPE_COLORS[color])
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=SHAPE_COLORS[color])
        regions.append(f"{color} {shape}")
    return image, regions
