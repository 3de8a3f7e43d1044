"""Small HTML helpers shared by the evaluation report's modules (escaping, number checks, PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image


def e(x) -> str:
    return html.escape(str(x), quote=True)


def isnum(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
