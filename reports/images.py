"""Images embedded in a report as PNG data URIs: matplotlib figures and small pixel arrays."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

DPI = 100  # CSS pixels per inch of a figure
SCALE = 2  # figures are drawn at SCALE x DPI so they stay sharp on high-density screens


@dataclass(frozen=True)
class Img:
    """An embedded image: data URI, pixel size, alt text and optional caption."""

    src: str
    width: int
    height: int
    alt: str
    caption: str = ""
    id: str = ""


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def figure_img(fig: Figure, alt: str, caption: str = "", id: str = "") -> Img:
    """A matplotlib figure as an embedded PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI * SCALE)
    image = Image.open(io.BytesIO(buf.getvalue()))
    # A 256-colour palette keeps plots sharp at about a third of the bytes.
    small = io.BytesIO()
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(small, format="PNG")
    png = small.getvalue() if small.tell() < buf.tell() else buf.getvalue()
    return Img(_data_uri(png), round(image.width / SCALE), round(image.height / SCALE), alt, caption, id)


def array_img(pixels: np.ndarray, alt: str) -> Img:
    """A small uint8 grey [H, W] or RGB [H, W, 3] array as an embedded PNG (scaled up by the browser)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return Img(_data_uri(buf.getvalue()), pixels.shape[1], pixels.shape[0], alt)
