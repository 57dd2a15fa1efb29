"""Small PNGs for the report: thumbnails, heat maps as translucent overlays, mask outlines.

The browser stacks them (image, map, outline) in one box, so each map is a separate small file and the site
never re-encodes an image per method."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np

from ..files import write_bytes

__all__ = ["write_png", "heat_rgba", "outline_rgba", "grid_values"]


def write_png(path: Union[str, Path], pixels: np.ndarray) -> Path:
    """Write ``pixels`` (S, S, 3 or 4) uint8 as a PNG atomically (:func:`nha_plugin.files.write_bytes`)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=True)
    return write_bytes(path, buf.getvalue())


def heat_rgba(heat: np.ndarray, size: int = 112) -> np.ndarray:
    """A map (S, S) min-max scaled on its own and coloured (matplotlib ``jet``), alpha 0.55, resized to ``size``.

    Returns:
        (size, size, 4) uint8. A constant map is drawn uniformly at the colormap's low end.
    """
    import matplotlib
    from PIL import Image
    h = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    span = h.max() - h.min()
    scaled = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    rgba = (matplotlib.colormaps["jet"](scaled) * 255).astype(np.uint8)
    rgba[..., 3] = 140
    return np.asarray(Image.fromarray(rgba).resize((size, size), Image.BILINEAR))


def outline_rgba(mask: np.ndarray, size: int = 112) -> np.ndarray:
    """The boundary of a boolean mask (S, S) as white pixels on a transparent (size, size, 4) uint8 image."""
    from PIL import Image
    m = np.asarray(Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize((size, size))) > 127
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = m & ~inner
    out = np.zeros((size, size, 4), np.uint8)
    out[edge] = (255, 255, 255, 255)
    return out


def grid_values(values: np.ndarray, digits: int = 3) -> list:
    """A small map (h, w) as nested lists rounded to ``digits`` (for the data shards; the browser colours it)."""
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()
