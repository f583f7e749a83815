"""Image grids for samples and datasets."""

import os

import numpy as np


def image_grid(images, columns=None, padding=1, min_size=256):
    """Tiles ``(N, H, W, C)`` images in [-1, 1] into one uint8 ``(H', W', 3)`` picture.

    Small images (the 8x8 digits) are enlarged with nearest-neighbour upsampling so each
    tile is at least ``min_size / columns`` pixels wide.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Expected images of shape (N, H, W, C) with C in (1, 3, 4), got {images.shape}."
        )
    if images.shape[-1] == 4:  # latents: show the first three channels
        images = images[..., :3]
    pixels = np.clip((images + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    n, h, w, _ = pixels.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    zoom = max(1, int(np.ceil(min_size / (columns * w))))
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w = h * zoom, w * zoom
    grid = np.full(
        (rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 255, np.uint8
    )
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_image_grid(images, path, columns=None):
    """Writes `image_grid(images)` atomically (temp file, then rename); the extension
    names the format (PNG, JPEG, ...)."""
    from PIL import Image

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp{extension or '.png'}"
    Image.fromarray(image_grid(images, columns)).save(tmp)
    os.replace(tmp, path)
    return path
