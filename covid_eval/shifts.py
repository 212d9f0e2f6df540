"""Fixed, seeded acquisition shifts: how a model holds up on images made elsewhere.

Each shift maps a batch of decoded uint8 images (N, H, W, C) at their stored size to shifted
images of the same shape, before the pipeline's own resize: JPEG re-encoding, down-then-up
sampling, gamma, contrast, Gaussian noise, a small crop and shift, and inverting a share of the
images (some sources store MONOCHROME1, white bones on black). The same seed gives the same
images, so every model is judged on exactly the same shifted set.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _back(pil, like: np.ndarray) -> np.ndarray:
    a = np.asarray(pil, dtype=np.uint8)
    return a[..., None] if like.shape[-1] == 1 and a.ndim == 2 else a


def jpeg(quality: int) -> Shift:
    def f(x, rng):
        out = []
        for img in x:
            buf = io.BytesIO()
            _pil(img).save(buf, format="JPEG", quality=quality)
            from PIL import Image

            out.append(_back(Image.open(io.BytesIO(buf.getvalue())), img))
        return np.stack(out)

    return f


def down_up(size: int) -> Shift:
    def f(x, rng):
        from PIL import Image

        h, w = x.shape[1:3]
        return np.stack(
            [_back(_pil(i).resize((size, size), Image.BILINEAR).resize((w, h), Image.BILINEAR), i) for i in x]
        )

    return f


def gamma(g: float) -> Shift:
    def f(x, rng):
        return np.clip(np.round(255.0 * (x / 255.0) ** g), 0, 255).astype(np.uint8)

    return f


def contrast(factor: float) -> Shift:
    """Scale each image's deviations from its own mean by ``factor`` (1.3: +30%, 0.7: -30%)."""

    def f(x, rng):
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(np.round(m + factor * (x - m)), 0, 255).astype(np.uint8)

    return f


def noise(sigma: float) -> Shift:
    def f(x, rng):
        return np.clip(np.round(x + rng.normal(0.0, sigma, x.shape)), 0, 255).astype(np.uint8)

    return f


def crop_shift(share: float = 0.05) -> Shift:
    """Crop a window ``1 - share`` of each side at a random offset, scaled back to the full size."""

    def f(x, rng):
        from PIL import Image

        h, w = x.shape[1:3]
        ch, cw = round(h * (1 - share)), round(w * (1 - share))
        out = []
        for img in x:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = _pil(img).crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
            out.append(_back(crop, img))
        return np.stack(out)

    return f


def invert(share: float = 0.05) -> Shift:
    def f(x, rng):
        pick = rng.random(len(x)) < share
        out = x.copy()
        out[pick] = 255 - out[pick]
        return out

    return f


# The robustness benchmark's shifts, in its order. ``invert`` is reported but not held to the goal.
SHIFTS: dict[str, Shift] = {
    "jpeg q30": jpeg(30),
    "jpeg q50": jpeg(50),
    "jpeg q75": jpeg(75),
    "down-up 128 px": down_up(128),
    "gamma 0.7": gamma(0.7),
    "gamma 1.4": gamma(1.4),
    "contrast -30%": contrast(0.7),
    "contrast +30%": contrast(1.3),
    "noise sigma 5": noise(5.0),
    "noise sigma 10": noise(10.0),
    "crop and shift 5%": crop_shift(0.05),
    "invert 5% of images": invert(0.05),
}
EXEMPT = {"invert 5% of images"}


def apply(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The named shift on ``images`` with a generator seeded by ``seed`` and the shift's name."""
    rng = np.random.default_rng([seed, *name.encode()])
    return SHIFTS[name](images, rng)
