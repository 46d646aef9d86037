"""Procedural demo photographs and the measurements the demo analyses are derived from.

Everything is seeded: the same `SceneParams` always give the same pixels and the same encoded bytes. The
measurements are taken on the decoded, upright file (what a model is shown), never on the drawing buffer,
so a model that looks at the image really can recover the scores.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

SCENES: tuple[str, ...] = ("landscape", "portrait", "architecture")
DRAW_SIDE = 64  # pictures are drawn this big on the long side, then scaled to their file size
MEASURE_SIDE = 64  # and measured at this scale, so blur reads the same at every file size
_GRAIN_SIDE = 512
EXIF_ORIENTATION_TAG = 0x0112
ROTATE_CW = 6  # EXIF orientation: rotate the stored pixels 90 degrees clockwise to display

# Palettes as (sky/background, ground/wall, accent) RGB triples in 0..1.
_PALETTES: tuple[tuple[tuple[float, float, float], ...], ...] = (
    ((0.45, 0.65, 0.95), (0.25, 0.55, 0.25), (1.00, 0.85, 0.40)),  # blue sky, green hills
    ((0.95, 0.60, 0.35), (0.45, 0.30, 0.20), (1.00, 0.90, 0.60)),  # sunset orange, brown land
    ((0.70, 0.72, 0.75), (0.35, 0.38, 0.40), (0.90, 0.90, 0.85)),  # overcast grey
    ((0.35, 0.45, 0.80), (0.20, 0.25, 0.50), (0.95, 0.95, 1.00)),  # dusk blue
    ((0.85, 0.80, 0.55), (0.60, 0.45, 0.25), (0.90, 0.30, 0.20)),  # desert ochre, red accent
    ((0.60, 0.85, 0.80), (0.15, 0.45, 0.45), (0.95, 0.75, 0.80)),  # teal sea, pink accent
)


@dataclass(frozen=True)
class SceneParams:
    """What to draw. Fractions are of the upright frame; gains are applied after drawing."""

    scene: str
    width: int
    height: int
    palette: int
    horizon: float  # landscape horizon / portrait eye line / architecture roof line, 0 = top
    subject_x: float  # centre of the figure, sun or main building
    brightness: float  # multiplicative exposure gain
    contrast: float  # gain around mid grey
    saturation: float  # 0 = grey, 1 = as drawn, >1 = boosted
    blur: float  # Gaussian radius as a fraction of the long side
    texture_seed: int


@dataclass(frozen=True)
class ImageFeatures:
    """Measured on the upright image scaled to MEASURE_SIDE; all values roughly in 0..1."""

    width: int
    height: int
    brightness: float  # mean luminance
    contrast: float  # luminance standard deviation
    saturation: float  # mean HSV saturation
    sharpness: float  # steepest tonal edges relative to the tonal range (blur lowers it, grain barely)
    horizon: float  # row of the strongest horizontal tonal edge, 0 = top
    subject_x: float  # where vertical edges (figure outline, building sides) concentrate, 0 = left
    imbalance: float  # left minus right share of tonal weight, -1..1
    depth_gradient: float  # |top third - bottom third| mean luminance
    isolation: float  # |centre - border| mean luminance
    hues: tuple[str, ...]  # dominant colour names, strongest first


def random_params(rng: np.random.Generator, scene: str, size: tuple[int, int]) -> SceneParams:
    """Draw scene parameters so that every measured property spreads over its whole scoring range."""
    return SceneParams(
        scene=scene,
        width=size[0],
        height=size[1],
        palette=int(rng.integers(len(_PALETTES))),
        horizon=float(rng.uniform(0.2, 0.8)),
        subject_x=float(rng.uniform(0.2, 0.8)),
        brightness=float(rng.uniform(0.35, 1.45)),
        contrast=float(rng.uniform(0.4, 1.6)),
        saturation=float(rng.uniform(0.0, 1.8)),
        blur=float(rng.choice([0.0, 0.0, 0.008, 0.015, 0.025, 0.04])),
        texture_seed=int(rng.integers(2**31)),
    )


# --- drawing ---------------------------------------------------------------------------------------------


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w
    return ys[:, None], xs[None, :]


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def _landscape(p: SceneParams, rng: np.random.Generator) -> np.ndarray:
    sky, ground, accent = (np.array(c, np.float32) for c in _PALETTES[p.palette])
    ys, xs = _grid(p.width, p.height)
    aspect = p.width / p.height
    # Sky brightens toward the horizon; the ground darkens toward the bottom.
    sky_rows = sky * (0.75 + 0.35 * (ys / p.horizon))[..., None]
    img = np.broadcast_to(sky_rows, (p.height, p.width, 3)).copy()
    sun = (xs - p.subject_x) ** 2 * aspect**2 + (ys - p.horizon * 0.45) ** 2 < 0.006
    _paint(img, sun, accent)
    phase, freq = rng.uniform(0, 6.28), rng.uniform(3, 9)
    ridge = p.horizon - 0.06 - 0.05 * np.sin(xs * freq + phase)
    _paint(img, np.broadcast_to(ys > ridge, img.shape[:2]), ground * 0.65 + sky * 0.2)
    land = np.broadcast_to(ys > p.horizon, img.shape[:2])
    ground_rows = ground * (1.05 - 0.45 * (ys - p.horizon) / (1.0 - p.horizon))[..., None]
    img[land] = np.broadcast_to(ground_rows, img.shape)[land]
    return img


def _portrait(p: SceneParams, rng: np.random.Generator) -> np.ndarray:
    background, clothes, skin = (np.array(c, np.float32) for c in _PALETTES[p.palette])
    ys, xs = _grid(p.width, p.height)
    aspect = p.width / p.height
    img = np.broadcast_to(background * (0.6 + 0.5 * xs)[..., None], (p.height, p.width, 3)).copy()
    eye = min(max(p.horizon, 0.25), 0.6)
    head_r = 0.13 * (0.8 + 0.4 * rng.random())
    body = ((xs - p.subject_x) * aspect / 0.28) ** 2 + ((ys - 1.05) / (1.05 - eye - head_r)) ** 2 < 1.0
    _paint(img, body, clothes * 0.7)
    head = ((xs - p.subject_x) * aspect / (head_r * 0.8)) ** 2 + ((ys - eye) / head_r) ** 2 < 1.0
    _paint(img, head, skin * np.array([1.0, 0.8, 0.7], np.float32))
    return img


def _architecture(p: SceneParams, rng: np.random.Generator) -> np.ndarray:
    sky, wall, window = (np.array(c, np.float32) for c in _PALETTES[p.palette])
    ys, xs = _grid(p.width, p.height)
    img = np.broadcast_to(sky * (0.8 + 0.3 * ys)[..., None], (p.height, p.width, 3)).copy()
    n_buildings = int(rng.integers(2, 5))
    for i in range(n_buildings):
        # The main building (i == 0) stands at subject_x; the others are smaller and darker.
        cx = p.subject_x if i == 0 else float(rng.uniform(0.05, 0.95))
        half = 0.16 if i == 0 else float(rng.uniform(0.05, 0.12))
        roof = p.horizon if i == 0 else float(rng.uniform(p.horizon, 0.85))
        shade = 1.0 if i == 0 else 0.7
        inside = (np.abs(xs - cx) < half) & (ys > roof)
        _paint(img, np.broadcast_to(inside, img.shape[:2]), wall * shade)
        cols = np.floor((xs - cx + half) / (2 * half) * 5)
        rows = np.floor((ys - roof) * 14)
        lit = inside & ((xs - cx + half) / (2 * half) * 5 - cols > 0.35) & ((ys - roof) * 14 - rows > 0.4)
        _paint(img, np.broadcast_to(lit, img.shape[:2]), window * shade)
    return img


_DRAW = {"landscape": _landscape, "portrait": _portrait, "architecture": _architecture}


def _grade(img: np.ndarray, p: SceneParams) -> np.ndarray:
    """Apply saturation, contrast and exposure, in that order."""
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = lum[..., None] + (img - lum[..., None]) * p.saturation
    img = (0.5 + (img - 0.5) * p.contrast) * p.brightness
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _draw_size(width: int, height: int) -> tuple[int, int]:
    scale = DRAW_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@lru_cache(maxsize=1)
def _grain_tile() -> Image.Image:
    """Fixed sensor-grain texture (values 0..12) that every picture borrows a window of."""
    noise = np.random.default_rng(20240607).integers(0, 13, size=(_GRAIN_SIDE, _GRAIN_SIDE), dtype=np.uint8)
    return Image.fromarray(noise, "L").convert("RGB")


def _add_grain(image: Image.Image, seed: int) -> Image.Image:
    w, h = image.size
    if w > _GRAIN_SIDE or h > _GRAIN_SIDE:
        return image  # phone-sized pictures are scaled-up drawings; grain would cost more than it shows
    x, y = seed % (_GRAIN_SIDE - w + 1), (seed // 7919) % (_GRAIN_SIDE - h + 1)
    return ImageChops.add(image, _grain_tile().crop((x, y, x + w, y + h)), 1.0, -6)


def render(p: SceneParams, size: tuple[int, int] | None = None) -> Image.Image:
    """The upright RGB picture for `p` at `size` (default: p's own size).

    Drawn, graded and blurred at DRAW_SIDE pixels (fast, and the blur then reads the same at every output
    size), scaled up, then given grain.
    """
    rng = np.random.default_rng(p.texture_seed)
    dw, dh = _draw_size(p.width, p.height)
    layout = replace(p, width=dw, height=dh)
    image = Image.fromarray(_grade(_DRAW[p.scene](layout, rng), p), "RGB")
    radius = p.blur * DRAW_SIDE
    if radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    out = size or (p.width, p.height)
    resample = Image.Resampling.BICUBIC if max(out) > _GRAIN_SIDE else Image.Resampling.BILINEAR
    return _add_grain(image.resize(out, resample), p.texture_seed)


# --- encoding --------------------------------------------------------------------------------------------


def encode_jpeg(image: Image.Image, *, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_exif_rotated_jpeg(upright: Image.Image, *, quality: int = 85) -> bytes:
    """Store the pixels turned 90 degrees counter-clockwise and tag Orientation=6, as an iPhone does;
    `ImageOps.exif_transpose` then gives back the upright picture."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_CW
    exif[0x010F] = "Apple"  # Make
    exif[0x0110] = "iPhone 13"  # Model
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def with_alpha(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RGBA version with a soft transparent vignette (the colour channels are left as drawn)."""
    w, h = image.size
    ys, xs = _grid(w, h)
    r = np.sqrt((xs - 0.5) ** 2 + (ys - 0.5) ** 2)
    alpha = np.clip(255 * (1.2 - 1.6 * r) + rng.integers(0, 8), 0, 255).astype(np.uint8)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba


def garbage_bytes(rng: np.random.Generator, n: int = 2048) -> bytes:
    """Bytes no image decoder accepts (no known magic number at the start)."""
    data = bytearray(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
    data[:8] = b"NOTAJPEG"
    return bytes(data)


# --- measuring -------------------------------------------------------------------------------------------


def load_upright(data: bytes) -> Image.Image:
    """Decode, honour EXIF orientation and convert to RGB (alpha dropped, as a model input would be).

    JPEGs are decoded at a reduced DCT scale close to the measuring size: much faster for big files.
    """
    image = Image.open(io.BytesIO(data))
    # Ask only for the long side to stay >= MEASURE_SIDE (draft wants both requested sides covered).
    w, h = image.size
    image.draft("RGB", (MEASURE_SIDE, 1) if w >= h else (1, MEASURE_SIDE))
    if image.info.get("exif"):  # parsing EXIF costs more than the rest of a small decode
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def _measure_scale(image: Image.Image) -> Image.Image:
    w, h = image.size
    scale = MEASURE_SIDE / max(w, h)
    if scale >= 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


_HUE_NAMES = ("red", "orange", "yellow", "green", "green", "teal", "cyan", "blue", "blue", "violet", "magenta", "pink")


def _hue_names(totals: np.ndarray, colourfulness: float) -> tuple[str, ...]:
    """Up to two colour names from saturation-weighted hue totals; 'grey' when there is little colour."""
    if colourfulness < 0.08:
        return ("grey",)
    names: list[str] = []
    for b in np.argsort(-totals, kind="stable"):
        if totals[b] < 0.15 * totals.max() or len(names) == 2:
            break
        if _HUE_NAMES[b] not in names:
            names.append(_HUE_NAMES[b])
    return tuple(names)


def _features_of_stack(lum: np.ndarray, hsv: np.ndarray) -> list[dict]:
    """Vectorised measurements of same-shaped pictures: lum (B, h, w) in 0..1, hsv (B, h, w, 3) uint8.

    Batching matters: the demo measures tens of thousands of pictures, and per-picture numpy calls
    would dominate the generation time.
    """
    n, h, w = lum.shape
    flat = lum.reshape(n, -1)
    mean = flat.mean(axis=1)
    dy, dx = np.abs(np.diff(lum, axis=1)), np.abs(np.diff(lum, axis=2))

    # Sharpness: the steepest 1% of neighbour steps over the 1-99% tonal range. Normalising by the range
    # keeps low-contrast but sharp pictures sharp; only the steepest steps count, so grain does not.
    steps = np.concatenate([dy.reshape(n, -1), dx.reshape(n, -1)], axis=1)
    if steps.shape[1]:
        k = max(1, steps.shape[1] // 100)
        top = np.partition(steps, steps.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
        lo_k, hi_k = int(flat.shape[1] * 0.01), int(flat.shape[1] * 0.99)
        ordered = np.partition(flat, (lo_k, hi_k), axis=1)
        sharpness = top / (ordered[:, hi_k] - ordered[:, lo_k] + 0.05)
    else:
        sharpness = np.zeros(n)

    # Horizon: the row where mean luminance changes most.
    rows = lum.mean(axis=2)
    horizon = (np.argmax(np.abs(np.diff(rows, axis=1)), axis=1) + 1) / h if h >= 3 else np.full(n, 0.5)

    # Subject: the centre of vertical-edge energy (smooth backgrounds add little, outlines a lot).
    energy = dx.sum(axis=1) ** 2
    energy_total = energy.sum(axis=1)
    xs = (np.arange(w - 1) + 1.0) / w
    subject_x = np.where(energy_total > 0, (energy * xs).sum(axis=1) / np.maximum(energy_total, 1e-12), 0.5)

    # Balance: share of tonal weight (departure from the mean tone) left minus right.
    weight = np.abs(lum - mean[:, None, None]) + 1e-6
    half = w // 2
    imbalance = (weight[:, :, :half].sum(axis=(1, 2)) - weight[:, :, w - half :].sum(axis=(1, 2))) / weight.sum(
        axis=(1, 2)
    )

    third = max(1, h // 3)
    depth = np.abs(lum[:, :third].mean(axis=(1, 2)) - lum[:, h - third :].mean(axis=(1, 2)))

    centre = lum[:, h // 4 : h - h // 4, w // 4 : w - w // 4]
    ring = h * w - centre.shape[1] * centre.shape[2]
    if centre.size and ring:
        centre_sum = centre.sum(axis=(1, 2))
        isolation = np.abs(centre_sum / (centre.shape[1] * centre.shape[2]) - (flat.sum(axis=1) - centre_sum) / ring)
    else:
        isolation = np.zeros(n)  # too small to have both a centre and a surround

    sat = hsv[..., 1].reshape(n, -1).astype(np.float32) / np.float32(255.0)
    colour_weight = sat * hsv[..., 2].reshape(n, -1) / np.float32(255.0)
    bins = (hsv[..., 0].reshape(n, -1).astype(np.int64) * 12) // 256 + 12 * np.arange(n)[:, None]
    hue_totals = np.bincount(bins.ravel(), weights=colour_weight.ravel(), minlength=12 * n).reshape(n, 12)
    contrast, saturation, colourfulness = flat.std(axis=1), sat.mean(axis=1), colour_weight.mean(axis=1)

    return [
        {
            "brightness": float(mean[i]),
            "contrast": float(contrast[i]),
            "saturation": float(saturation[i]),
            "sharpness": float(sharpness[i]),
            "horizon": float(horizon[i]),
            "subject_x": float(subject_x[i]) if w > 1 else 0.5,
            "imbalance": float(imbalance[i]),
            "depth_gradient": float(depth[i]),
            "isolation": float(isolation[i]),
            "hues": _hue_names(hue_totals[i], float(colourfulness[i])),
        }
        for i in range(n)
    ]


_BATCH = 32


def measure_many(images: list[Image.Image]) -> list[ImageFeatures]:
    """`measure` for many upright RGB pictures at once (same results, far fewer numpy calls)."""
    small = [_measure_scale(im) for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(small):
        groups.setdefault(im.size, []).append(i)
    out: list[ImageFeatures | None] = [None] * len(images)
    chunks = [idx[k : k + _BATCH] for idx in groups.values() for k in range(0, len(idx), _BATCH)]
    for indices in chunks:  # small chunks keep the arrays in cache
        lum = np.stack([np.asarray(small[i].convert("L")) for i in indices]).astype(np.float32) / np.float32(255.0)
        hsv = np.stack([np.asarray(small[i].convert("HSV")) for i in indices])
        for i, values in zip(indices, _features_of_stack(lum, hsv), strict=True):
            out[i] = ImageFeatures(width=images[i].width, height=images[i].height, **values)
    return [f for f in out if f is not None]


def measure(image: Image.Image) -> ImageFeatures:
    """The properties the demo analyses are computed from; `image` must already be upright RGB."""
    return measure_many([image])[0]
