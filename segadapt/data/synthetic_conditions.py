"""Adverse conditions for the synthetic benchmark's target domain (``segadapt synth --condition``).

The target scene and its daytime rendering are the default benchmark's, unchanged; the
condition is applied to that image with a random generator of its own (a function of seed,
domain, index and condition), so a fog/night/rain benchmark shows the same scenes and
labels as the daytime one, and nothing changes when no condition is set. Like ACDC, the
labels stay those of the scene, also where little can be seen.

* ``fog``: Koschmieder's law on the scene depth, I = J t + A (1 - t), t = exp(-beta d),
  with a visibility of 35-110 m per image (beta = 3.9 / visibility) and patchy density:
  contrast falls with depth, the sky and distant objects vanish into the airlight; light
  scattering softens what is seen through fog.
* ``night``: the daytime image is taken as albedo and re-lit in linear light: a dim bluish
  ambient, the ego car's headlight cone on what lies ahead (falling with distance), pools
  of sodium or LED light under street lamps on the poles' tops, self-lit vehicle head and
  tail lights, traffic lights and some windows with bloom; a dark sky with light pollution
  near the horizon; then a raised camera gain, strong sensor noise and a little blur.
* ``rain``: overcast (dimmer, flatter light, grey sky), wet roads (darker ground with
  blurred reflections of what stands on it, stronger in puddles), a light mist, and rain
  streaks (thin slanted bright lines of one wind direction).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CONDITIONS = ("fog", "night", "rain")
_CONDITION_CODES = {"fog": 1001, "night": 1002, "rain": 1003}


def condition_rng(seed: int, domain_code: int, index: int, condition: str) -> np.random.Generator:
    """The generator of one image's condition: independent of the draws of its scene and rendering."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(domain_code), int(index),
                                                         _CONDITION_CODES[condition]]))


def apply_condition(image: np.ndarray, scene, condition: str, rng: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 daytime rendering of ``scene`` seen in ``condition``."""
    if condition not in _CONDITION_CODES:
        raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    return {"fog": _fog, "night": _night, "rain": _rain}[condition](image, scene, rng)


# ---------------------------------------------------------------------------- helpers
def scene_depth(scene) -> np.ndarray:
    """Depth (metres) of every pixel, as the renderer's haze sees it; +inf for the sky."""
    from segadapt.data.synthetic import _D_GROUND, _D_SIDE, _D_SKY

    W, H, yh, xv, f, hc = scene.cam
    ys = np.arange(H, dtype=np.float32)[:, None]
    xs = np.arange(W, dtype=np.float32)[None, :]
    zrow = np.where(ys > yh + 0.5, f * hc / np.maximum(ys - yh, 0.5), 1e4).astype(np.float32)
    dm = scene.dmode.astype(np.int64)[scene.inst]
    dv = scene.dval[scene.inst]
    depth = np.where(dm == _D_GROUND, zrow, dv)
    dx = np.where(np.abs(xs - xv) < 0.5, 0.5, xs - xv)
    depth = np.where(dm == _D_SIDE, np.abs(dv * f / dx), depth)
    return np.where(dm == _D_SKY, np.inf, depth).astype(np.float32)


def _smooth(rng, W: int, H: int, cell: float) -> np.ndarray:
    """A smooth random field of unit standard deviation with features of about ``cell`` pixels."""
    gw, gh = int(math.ceil(W / cell)) + 2, int(math.ceil(H / cell)) + 2
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    big = np.asarray(Image.fromarray(g).resize((int(round(gw * cell)), int(round(gh * cell))), Image.BICUBIC),
                     np.float32)[:H, :W]
    return (big - big.mean()) / (big.std() + 1e-6)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float (H, W[, C]) image: separable, edges reflected (exact in float32)."""
    if sigma < 0.05:
        return x
    r = max(1, int(math.ceil(3.0 * sigma)))
    w = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
    w /= w.sum()
    out = x.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if n > r else "edge")
        acc = np.zeros_like(out)
        for j, wj in enumerate(w):
            acc += wj * np.take(p, np.arange(j, j + n), axis=axis)
        out = acc
    return out


def _to_linear(img: np.ndarray) -> np.ndarray:
    return np.power(img.astype(np.float32) / 255.0, 2.2)


def _to_srgb(lin: np.ndarray) -> np.ndarray:
    return 255.0 * np.power(np.clip(lin, 0.0, 1.0), 1.0 / 2.2)


def _finish(x: np.ndarray, rng, noise_sd: float) -> np.ndarray:
    """Sensor noise (stronger in bright pixels, as shot noise) and 8-bit quantisation."""
    H, W = x.shape[:2]
    n = rng.standard_normal((H, W, 3), dtype=np.float32)
    x = x + n * (noise_sd * np.sqrt(np.maximum(x, 8.0) / 128.0))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _maps(scene):
    from segadapt.data.synthetic import _GROUND, _MAT

    mat = scene.mat.astype(np.int64)[scene.inst]
    return mat, _MAT, _GROUND[mat]


# ---------------------------------------------------------------------------- fog
def _fog(image, scene, rng):
    H, W = image.shape[:2]
    k = W / 256.0
    depth = scene_depth(scene)
    visibility = float(rng.uniform(35.0, 110.0))  # metres at which contrast falls to 2%
    density = np.exp(0.25 * _smooth(rng, W, H, 40.0 * k))  # patchy fog
    airlight = (float(rng.uniform(178.0, 212.0)) + rng.normal(0.0, 3.0, 3)).astype(np.float32)
    noise_sd = float(rng.uniform(1.0, 2.5))
    t = np.exp(-(3.912 / visibility) * np.minimum(depth, 1e4) * density)[..., None].astype(np.float32)
    x = image.astype(np.float32) * t + airlight * (1.0 - t)
    # forward scattering: what is seen through much fog is also blurred
    w = 0.6 * (1.0 - t)
    x = x * (1.0 - w) + _blur(x, 1.2 * k) * w
    return _finish(x, rng, noise_sd)


# ---------------------------------------------------------------------------- night
def _night(image, scene, rng):
    from segadapt.data.synthetic import _EGO

    H, W = image.shape[:2]
    k = W / 256.0
    _, _, yh, xv, f, hc = scene.cam
    mat, M, ground = _maps(scene)
    cls = scene.cls[scene.inst]
    sky = mat == M["sky"]
    depth = scene_depth(scene)
    d = np.where(np.isfinite(depth), depth, 1e4)
    ys = np.arange(H, dtype=np.float32)[:, None]
    xs = np.arange(W, dtype=np.float32)[None, :]
    X = (xs - xv) * d / f  # lateral position (m)
    Y = hc - (ys - yh) * d / f  # height above the ground (m)
    albedo = _to_linear(image)

    # ---- illumination (linear RGB): ambient, ego headlights, street lamps
    light = np.zeros((H, W, 3), np.float32)
    light += float(rng.uniform(0.012, 0.035)) * np.array([0.75, 0.85, 1.2], np.float32)
    if rng.random() < 0.9:
        strength = float(rng.uniform(0.35, 0.8))
        cone = strength * np.exp(-d / 15.0) * np.exp(-(X / (1.5 + 0.25 * d)) ** 2)
        cone *= np.exp(-np.maximum(Y - 1.2, 0.0) ** 2)  # low beams light the lower part of things
        cone = np.where(sky | (cls == _EGO), 0.0, cone)
        light += cone[..., None] * np.array([1.0, 0.98, 0.9], np.float32)
    sodium = rng.random() < 0.6
    lamp_colour = np.array([1.0, 0.62, 0.28] if sodium else [0.92, 0.96, 1.0], np.float32)
    emissive = np.zeros((H, W, 3), np.float32)
    pole_ids = np.flatnonzero((scene.mat == M["pole"]) & (scene.cls == 5))
    lit = rng.random(pole_ids.size) < 0.75
    power = rng.uniform(0.6, 1.3, pole_ids.size)
    for i, on, p in zip(pole_ids, lit, power):
        rows, cols = np.nonzero(scene.inst == i)
        if not on or rows.size < 2:
            continue
        top = rows.min()
        x0 = float(cols[rows == top].mean())
        Z = float(scene.dval[i])
        Xp = (x0 - xv) * Z / f
        pool = float(p) * np.exp(-((X - Xp) ** 2 + (d - Z) ** 2) / (2 * 5.0 ** 2))
        light += np.where(sky, 0.0, pool)[..., None] * lamp_colour
        r = min(max(0.8, 0.2 * f / max(Z, 1.0)), 4.0 * k)  # the lamp head
        emissive += (3.0 * float(p) * np.exp(-((xs - x0) ** 2 + (ys - top) ** 2) / (2 * r * r)))[..., None] * lamp_colour
    x = albedo * light

    # ---- sky: dark blue, light pollution near the horizon
    glow = float(rng.uniform(0.0, 0.02))
    horizon = np.exp(-np.maximum(yh - ys, 0.0) / (0.25 * H))
    sky_lin = (np.array([0.002, 0.003, 0.008], np.float32) + glow * horizon[..., None]
               * np.array([1.0, 0.7, 0.45], np.float32))
    x = np.where(sky[..., None], np.broadcast_to(sky_lin, x.shape), x)

    # ---- self-lit things: vehicle lamps, traffic lights, some windows
    lamps = np.isin(mat, [M["headlight"], M["taillight"], M["tl_lit"]])
    emissive += np.where(lamps[..., None], albedo * 3.0, 0.0)
    cell = max(2, int(round(3 * k)))
    gy, gx = H // cell + 1, W // cell + 1
    lit_cells = rng.random((gy, gx)) < float(rng.uniform(0.2, 0.5))
    lit_windows = np.isin(mat, [M["window"], M["shopwindow"]]) & lit_cells[(np.arange(H) // cell)[:, None],
                                                                             (np.arange(W) // cell)[None, :]]
    warm = np.array([1.0, 0.78, 0.45], np.float32) * float(rng.uniform(0.15, 0.45))
    x = np.where(lit_windows[..., None], np.maximum(x, warm), x)
    x = np.maximum(x, emissive)
    x += 0.35 * _blur(emissive, 2.0 * k) + 0.2 * _blur(emissive, 6.0 * k)  # bloom

    # ---- camera: raised gain, strong noise, slight blur
    x *= float(rng.uniform(1.2, 2.0))
    out = _to_srgb(x)
    out = _blur(out, float(rng.uniform(0.3, 0.7)) * k)
    return _finish(out, rng, float(rng.uniform(4.0, 8.0)))


# ---------------------------------------------------------------------------- rain
def _reflections(x: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """For each ground pixel, the pixel mirrored about the foot of what stands above it in its column."""
    H, W = ground.shape
    rows = np.arange(H)[:, None].repeat(W, axis=1)
    contact = np.maximum.accumulate(np.where(~ground, rows, -1), axis=0)  # last non-ground row above
    mirror = np.clip(2 * contact - rows, 0, H - 1)
    cols = np.arange(W)[None, :].repeat(H, axis=0)
    return np.where((ground & (contact >= 0))[..., None], x[mirror, cols], x)


def _streaks(rng, W: int, H: int) -> np.ndarray:
    """A layer of rain streaks in [0, 1]: thin slanted lines of one wind direction."""
    layer = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(layer)
    n = int(rng.uniform(0.004, 0.010) * W * H)
    wind = float(rng.uniform(-0.35, 0.35))
    x0 = rng.uniform(-0.1 * W, 1.1 * W, n)
    y0 = rng.uniform(-0.1 * H, H, n)
    length = rng.uniform(0.03, 0.10, n) * H
    angle = wind + rng.normal(0.0, 0.04, n)
    alpha = rng.uniform(0.15, 0.45, n)
    for a, b, ln, an, al in zip(x0, y0, length, angle, alpha):
        draw.line([(float(a), float(b)), (float(a + ln * math.sin(an)), float(b + ln * math.cos(an)))],
                  fill=int(255 * al), width=1)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5 * W / 256.0)), np.float32) / 255.0


def _rain(image, scene, rng):
    H, W = image.shape[:2]
    k = W / 256.0
    _, _, yh, _, _, _ = scene.cam
    mat, M, ground = _maps(scene)
    sky = mat == M["sky"]
    depth = scene_depth(scene)
    x = _to_linear(image) * float(rng.uniform(0.55, 0.8))  # overcast
    ys = np.arange(H, dtype=np.float32)[:, None]
    grey = float(rng.uniform(0.30, 0.45)) * (1.0 - 0.25 * np.clip((yh - ys) / max(yh, 1.0), 0.0, 1.0))
    x = np.where(sky[..., None], np.broadcast_to(grey[..., None], x.shape), x)
    # wet ground: darker, with blurred reflections, stronger in puddles
    wet = ground & ~sky
    x = np.where(wet[..., None], x * float(rng.uniform(0.5, 0.7)), x)
    refl = _blur(_reflections(x, wet), 1.5 * k)
    puddles = np.clip(_smooth(rng, W, H, 20.0 * k) - 0.3, 0.0, 1.0)
    weight = float(rng.uniform(0.25, 0.5)) * (0.35 + 0.65 * puddles)
    weight = np.where(wet, weight, 0.0)[..., None]
    x = x * (1.0 - weight) + refl * weight
    # mist
    visibility = float(rng.uniform(150.0, 400.0))
    t = np.exp(-(3.912 / visibility) * np.minimum(depth, 1e4))[..., None]
    x = x * t + float(rng.uniform(0.25, 0.35)) * (1.0 - t)
    out = _to_srgb(x)
    out = out + (225.0 - out) * (0.8 * _streaks(rng, W, H))[..., None]
    return _finish(out, rng, float(rng.uniform(1.5, 3.0)))


def sample_pair(params, domain: str, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """(daytime image, conditioned image) of one target sample: for figures and checks."""
    from segadapt.data.synthetic import SynthParams, make_sample

    day = SynthParams.from_dict({**params.identity(), "condition": None})
    return make_sample(day, domain, index)[0], make_sample(params, domain, index)[0]
