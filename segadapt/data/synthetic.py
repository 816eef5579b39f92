"""The built-in synthetic benchmark: a "game" -> "real" street-scene domain shift.

A layout sampler draws street scenes (a camera over a ground plane; road,
sidewalks, buildings with windows, vegetation, terrain, poles with signs and
traffic lights, fences and walls, cars, trucks, buses, trams, persons, riders on
two-wheelers) as an *instance map*: every pixel holds the id of one drawn part,
and every part has a Cityscapes train id, a material and a depth.  Two
renderers turn an instance map into an image:

* ``source`` ("game"): flat, lightly shaded regions with clean edges and a
  saturated palette of its own;
* ``target`` ("real"): class-conditional shifts of the colour distributions
  (each material has its own target palette, so overlaps between classes
  change), per-material textures, paving grids, clouds, haze, an illumination
  gradient, cast shadows, vignetting, blur and sensor noise.

``gap`` interpolates every appearance parameter from the source renderer
(``gap=0``: the target images are drawn by the source renderer) to the target
one (``gap=1``) and beyond.  Target layouts also come from a different
distribution (horizon, road width, object frequencies, ego-vehicle hood), and
that layout shift does not depend on ``gap``.

Files are written in the real layouts, so the real readers are exercised::

    <out>/source/images/00001.png               GTA5 layout, RGB
    <out>/source/labels/00001.png               Cityscapes label ids (uint8)
    <out>/source/train.txt, val.txt             file names, one per line
    <out>/target/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <out>/target/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    <out>/source_synthia/RGB/0000000.png        (synthia=True) same source images
    <out>/source_synthia/GT/LABELS/0000000.png  16-bit RGB, channel 0 = SYNTHIA id
    <out>/synthetic.json                        marker with params, written last

Every image is a pure function of ``(seed, domain, index)`` and the size/gap
parameters, so the output is byte-identical for any number of ``workers``.

``condition`` (``fog``, ``night`` or ``rain``; default none) renders the target domain, train
and val, in that adverse condition: the same scenes and labels as the daytime benchmark, the
daytime rendering changed by ``segadapt.data.synthetic_conditions`` with a random generator
of its own (the source and, without a condition, every file stay as they are).
Only numpy and Pillow are used.

Calibration (``gap=1``, default set, seed 0; a 7-layer dilated CNN of width 24
trained from scratch for 1000 steps of batch 8 at half resolution, 128x64):
source-only 45 mIoU on source val and 19 on target val, target oracle 37 on
target val.  Target layouts rendered by the source renderer (``gap=0``, layout
shift only) give about 41.  Per-image channel standardisation (23), per-channel
histogram matching to the source (22) and even the best per-pixel colour lookup
table fitted on paired renders (25) leave most of the gap.  ``gap=2``
approaches the full target look of the material tables (source-only about 7).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segadapt.errors import ConfigError, DatasetError, write_error

FORMAT_VERSION = 1
MARKER_NAME = "synthetic.json"
from segadapt.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES  # noqa: E402,F401 - re-exported

# internal class codes besides the 19 train ids (all are "ignore" as train ids)
_STATIC = 253  # label id 4 "static" (bins, benches)
_EGO = 254  # label id 1 "ego vehicle" (the hood)
_VOID = 255  # label id 0 "unlabeled"

#: train id -> Cityscapes label id
TRAIN_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: train id -> SYNTHIA-RAND-CITYSCAPES class id (terrain, truck, train -> 0 void)
TRAIN_TO_SYNTHIA_ID = (3, 4, 2, 21, 5, 7, 15, 9, 6, 0, 1, 10, 17, 8, 0, 19, 0, 12, 11)

_LABEL_LUT = np.zeros(256, np.uint8)
_LABEL_LUT[:NUM_CLASSES] = TRAIN_TO_LABEL_ID
_LABEL_LUT[_STATIC] = 4
_LABEL_LUT[_EGO] = 1
_SYNTHIA_LUT = np.zeros(256, np.uint16)
_SYNTHIA_LUT[:NUM_CLASSES] = TRAIN_TO_SYNTHIA_ID
_TRAIN_LUT = np.full(256, IGNORE_INDEX, np.uint8)
_TRAIN_LUT[:NUM_CLASSES] = np.arange(NUM_CLASSES)

TARGET_CITIES = {"train": ("ashford", "brenmoor"), "val": ("calder", "dunmere")}
_DOMAIN_CODES = {"source": 0, "target_train": 1, "target_val": 2}


def to_label_ids(labels: np.ndarray) -> np.ndarray:
    """Internal class map (train ids, 253 static, 254 ego, 255 void) -> Cityscapes label ids."""
    return _LABEL_LUT[np.asarray(labels, np.uint8)]


def to_train_ids(labels: np.ndarray) -> np.ndarray:
    """Internal class map -> train ids with every void code mapped to 255."""
    return _TRAIN_LUT[np.asarray(labels, np.uint8)]


def to_synthia_ids(labels: np.ndarray) -> np.ndarray:
    """Internal class map -> SYNTHIA class ids (uint16; classes SYNTHIA lacks -> 0)."""
    return _SYNTHIA_LUT[np.asarray(labels, np.uint8)]


# ============================================================================ params
@dataclass
class SynthParams:
    seed: int = 0
    size: Tuple[int, int] = (256, 128)  # (W, H)
    num_source: int = 600
    num_source_val: int = 100
    num_target_train: int = 400
    num_target_val: int = 100
    gap: float = 1.0
    synthia: bool = False
    workers: int = 1
    condition: Optional[str] = None  # target domain in fog | night | rain (None: daytime)

    def __post_init__(self):
        self.size = tuple(int(v) for v in self.size)
        if self.condition in ("", "none"):
            self.condition = None

    def validate(self) -> "SynthParams":
        if len(self.size) != 2 or self.size[0] < 32 or self.size[1] < 16:
            raise ConfigError(f"synthetic size must be [W, H] with W >= 32 and H >= 16, got {list(self.size)}")
        for name in ("num_source", "num_source_val", "num_target_train", "num_target_val"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"synthetic {name} must be >= 0, got {getattr(self, name)}")
        if self.num_source < 1 or self.num_target_train < 1:
            raise ConfigError("synthetic num_source and num_target_train must be >= 1")
        if not (0.0 <= float(self.gap) <= 3.0):
            raise ConfigError(f"synthetic gap must be in [0, 3], got {self.gap}")
        if int(self.workers) < 1:
            raise ConfigError(f"synthetic workers must be >= 1, got {self.workers}")
        from segadapt.data.synthetic_conditions import CONDITIONS

        if self.condition is not None and self.condition not in CONDITIONS:
            raise ConfigError(f"synthetic condition must be one of {', '.join(CONDITIONS)} (or none), "
                              f"got {self.condition!r}")
        return self

    def identity(self) -> dict:
        """The parameters that determine the files (everything but ``workers``)."""
        return {
            "seed": int(self.seed),
            "size": [int(self.size[0]), int(self.size[1])],
            "num_source": int(self.num_source),
            "num_source_val": int(self.num_source_val),
            "num_target_train": int(self.num_target_train),
            "num_target_val": int(self.num_target_val),
            "gap": float(self.gap),
            "synthia": bool(self.synthia),
            # only when set: the daytime benchmark's marker stays as it was
            **({"condition": self.condition} if self.condition is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SynthParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ============================================================================ materials
# name: (source palette, target palette, source tex, target tex)
# tex = amplitudes (relative brightness) of noise at scales fine/small/medium/large.
_MATS: Dict[str, tuple] = {
    "sky": ([(95, 150, 235), (112, 165, 240), (82, 140, 226)],
            [(160, 185, 215), (150, 178, 212), (172, 192, 218)], (0, 0, 0, 0), (0.01, 0, 0.01, 0.02)),
    "asphalt": ([(72, 72, 80), (64, 66, 74), (80, 80, 86)],
                [(118, 116, 120), (102, 101, 106), (128, 124, 122)], (0.005, 0, 0, 0), (0.07, 0.05, 0.05, 0.08)),
    "marking_w": ([(236, 236, 236)], [(200, 200, 196)], (0, 0, 0, 0), (0.08, 0.08, 0.06, 0.05)),
    "marking_y": ([(232, 190, 40)], [(196, 178, 96)], (0, 0, 0, 0), (0.08, 0.08, 0.06, 0.05)),
    "rail": ([(150, 150, 156)], [(135, 128, 122)], (0, 0, 0, 0), (0.05, 0.05, 0.05, 0)),
    "pavement": ([(178, 160, 166), (186, 176, 160), (162, 160, 172)],
                 [(142, 128, 122), (126, 123, 121), (152, 141, 128)], (0.005, 0, 0, 0), (0.06, 0.07, 0.06, 0.06)),
    "curb": ([(204, 204, 198)], [(150, 148, 145)], (0, 0, 0, 0), (0.05, 0.05, 0.04, 0.04)),
    "grass": ([(122, 176, 62), (142, 180, 72), (110, 166, 78)],
              [(118, 116, 72), (128, 118, 82), (98, 106, 62)], (0.01, 0.03, 0.02, 0), (0.10, 0.12, 0.10, 0.10)),
    "foliage": ([(52, 136, 46), (66, 150, 42), (42, 122, 56), (76, 142, 36)],
                [(68, 86, 46), (52, 72, 42), (82, 96, 52), (62, 82, 58)], (0.01, 0.04, 0.04, 0), (0.12, 0.22, 0.16, 0.10)),
    "trunk": ([(112, 80, 50)], [(76, 66, 56)], (0, 0, 0, 0), (0.08, 0.08, 0.05, 0)),
    "facade": ([(216, 186, 140), (182, 96, 70), (160, 160, 172), (230, 220, 200), (130, 150, 186),
                (202, 130, 96), (190, 190, 150)],
               [(152, 142, 130), (126, 100, 90), (136, 136, 134), (176, 166, 150), (104, 110, 116),
                (142, 116, 100), (162, 156, 140)], (0.005, 0, 0, 0), (0.04, 0.05, 0.06, 0.08)),
    "window": ([(72, 102, 142), (52, 72, 102), (102, 142, 182)],
               [(56, 60, 66), (82, 88, 96), (112, 116, 122)], (0, 0, 0, 0), (0.04, 0.04, 0.08, 0.10)),
    "shopwindow": ([(62, 92, 122)], [(52, 56, 62)], (0, 0, 0, 0), (0.04, 0.06, 0.1, 0.1)),
    "door": ([(122, 80, 50)], [(72, 62, 56)], (0, 0, 0, 0), (0.04, 0.04, 0.04, 0)),
    "wall": ([(192, 180, 160), (162, 150, 140), (202, 162, 130)],
             [(142, 138, 130), (120, 116, 110), (150, 140, 126)], (0.005, 0, 0, 0), (0.06, 0.07, 0.08, 0.08)),
    "fence": ([(132, 132, 138), (122, 100, 70)], [(98, 98, 92), (102, 86, 72)], (0, 0, 0, 0), (0.05, 0.05, 0.05, 0.05)),
    "fence_post": ([(102, 102, 108)], [(82, 82, 80)], (0, 0, 0, 0), (0.04, 0.04, 0.04, 0)),
    "pole": ([(122, 122, 128), (102, 106, 112), (62, 72, 62)],
             [(96, 96, 92), (132, 132, 126), (72, 74, 72)], (0, 0, 0, 0), (0.05, 0.04, 0.04, 0)),
    "sign_face": ([(222, 30, 30), (30, 80, 212), (242, 242, 242), (246, 200, 30), (30, 142, 62)],
                  [(172, 52, 50), (42, 72, 150), (202, 202, 196), (202, 172, 62), (52, 112, 72)],
                  (0, 0, 0, 0), (0.04, 0.03, 0.03, 0)),
    "sign_rim": ([(242, 242, 242), (222, 30, 30)], [(202, 202, 198), (170, 60, 56)], (0, 0, 0, 0), (0.04, 0.03, 0, 0)),
    "sign_back": ([(142, 142, 148)], [(110, 110, 108)], (0, 0, 0, 0), (0.04, 0.03, 0, 0)),
    "tl_box": ([(36, 36, 36), (52, 62, 40)], [(42, 42, 40), (58, 60, 50)], (0, 0, 0, 0), (0.05, 0.03, 0, 0)),
    "tl_lit": ([(242, 40, 30), (250, 202, 40), (40, 232, 102)], [(232, 92, 72), (242, 192, 92), (92, 222, 162)],
               (0, 0, 0, 0), (0.03, 0, 0, 0)),
    "tl_off": ([(62, 62, 62)], [(56, 56, 54)], (0, 0, 0, 0), (0.03, 0, 0, 0)),
    "car_paint": ([(202, 30, 30), (30, 62, 192), (236, 236, 236), (30, 30, 32), (172, 172, 182), (242, 202, 30),
                   (42, 142, 62), (122, 42, 162)],
                  [(46, 46, 50), (176, 178, 182), (216, 216, 214), (32, 34, 38), (112, 114, 118), (122, 32, 36),
                   (42, 52, 82), (142, 136, 122)], (0.003, 0, 0, 0), (0.03, 0.02, 0.04, 0.06)),
    "glass": ([(52, 66, 92)], [(36, 40, 46)], (0, 0, 0, 0), (0.04, 0.04, 0.12, 0.12)),
    "tire": ([(26, 26, 28)], [(32, 32, 32)], (0, 0, 0, 0), (0.05, 0.03, 0, 0)),
    "bumper": ([(42, 42, 46)], [(52, 52, 54)], (0, 0, 0, 0), (0.04, 0.03, 0, 0)),
    "taillight": ([(222, 30, 30)], [(172, 42, 42)], (0, 0, 0, 0), (0.04, 0, 0, 0)),
    "headlight": ([(242, 242, 222)], [(202, 202, 196)], (0, 0, 0, 0), (0.04, 0, 0, 0)),
    "plate": ([(242, 242, 242)], [(212, 212, 202)], (0, 0, 0, 0), (0.04, 0, 0, 0)),
    "truck_paint": ([(232, 232, 232), (202, 40, 40), (40, 82, 172), (242, 182, 30)],
                    [(202, 202, 198), (152, 52, 46), (62, 82, 122), (192, 162, 82)], (0.003, 0, 0, 0),
                    (0.04, 0.03, 0.05, 0.06)),
    "cargo": ([(212, 212, 216), (162, 162, 172), (202, 182, 142)],
              [(172, 172, 168), (132, 132, 136), (162, 152, 126)], (0.003, 0, 0, 0), (0.04, 0.04, 0.06, 0.06)),
    "bus_paint": ([(242, 202, 30), (222, 40, 40), (40, 122, 202), (242, 242, 242)],
                  [(212, 192, 112), (182, 62, 52), (82, 112, 152), (212, 212, 206)], (0.003, 0, 0, 0),
                  (0.04, 0.03, 0.05, 0.06)),
    "train_paint": ([(222, 222, 226), (202, 52, 42), (242, 192, 42)],
                    [(192, 192, 188), (172, 62, 52), (212, 182, 92)], (0.003, 0, 0, 0), (0.04, 0.03, 0.05, 0.06)),
    "moto_paint": ([(212, 30, 30), (22, 22, 22), (42, 82, 202), (242, 142, 22)],
                   [(152, 42, 42), (32, 32, 34), (62, 72, 112), (172, 112, 62)], (0, 0, 0, 0), (0.04, 0.03, 0, 0)),
    "engine": ([(82, 82, 86)], [(62, 62, 60)], (0, 0, 0, 0), (0.06, 0.04, 0, 0)),
    "frame": ([(222, 30, 30), (30, 30, 32), (42, 92, 212), (242, 242, 242)],
              [(142, 52, 52), (36, 36, 38), (72, 82, 112), (192, 192, 186)], (0, 0, 0, 0), (0.04, 0.03, 0, 0)),
    "spokes": ([(96, 96, 100)], [(112, 110, 106)], (0, 0, 0, 0), (0.2, 0.1, 0, 0)),
    "skin": ([(242, 202, 172), (212, 162, 122), (152, 106, 76), (102, 72, 52)],
             [(206, 172, 152), (182, 142, 116), (132, 102, 82), (92, 72, 62)], (0, 0, 0, 0), (0.03, 0.02, 0, 0)),
    "hair": ([(42, 32, 22), (92, 62, 32), (222, 202, 122), (22, 22, 22)],
             [(42, 36, 32), (82, 66, 52), (172, 152, 112), (32, 32, 32)], (0, 0, 0, 0), (0.06, 0.04, 0, 0)),
    "top": ([(222, 42, 42), (42, 82, 202), (242, 242, 242), (32, 32, 32), (42, 162, 72), (242, 182, 32),
             (152, 62, 172), (242, 122, 32)],
            [(62, 62, 72), (42, 46, 62), (152, 152, 150), (32, 32, 34), (92, 62, 52), (122, 112, 92),
             (162, 62, 62), (72, 92, 112)], (0, 0, 0, 0), (0.05, 0.05, 0.04, 0)),
    "bottom": ([(42, 62, 142), (32, 32, 32), (122, 92, 62), (202, 202, 192), (82, 82, 82)],
               [(42, 46, 62), (32, 32, 34), (82, 72, 62), (122, 122, 116), (62, 62, 64)], (0, 0, 0, 0),
               (0.05, 0.05, 0.04, 0)),
    "helmet": ([(242, 242, 242), (222, 30, 30), (22, 22, 22)], [(192, 192, 192), (142, 42, 42), (32, 32, 32)],
               (0, 0, 0, 0), (0.03, 0.02, 0, 0)),
    "hood": ([(42, 42, 52)], [(32, 32, 36), (62, 64, 72), (182, 182, 186)], (0, 0, 0, 0), (0.03, 0.02, 0.04, 0.1)),
    "static": ([(62, 122, 72), (122, 122, 132)], [(72, 82, 72), (102, 102, 100)], (0, 0, 0, 0), (0.05, 0.05, 0.04, 0)),
}
_MAT_NAMES = tuple(_MATS)
_MAT = {n: i for i, n in enumerate(_MAT_NAMES)}
_NMAT = len(_MAT_NAMES)
_GROUND_MATS = ("asphalt", "marking_w", "marking_y", "rail", "pavement", "curb", "grass")


def _palette_table(which: int) -> Tuple[np.ndarray, np.ndarray]:
    """(NMAT, K, 3) palettes padded by repetition and (NMAT,) lengths."""
    k = max(len(v[which]) for v in _MATS.values())
    table = np.zeros((_NMAT, k, 3), np.float32)
    lens = np.zeros(_NMAT, np.int64)
    for i, name in enumerate(_MAT_NAMES):
        pal = _MATS[name][which]
        lens[i] = len(pal)
        for j in range(k):
            table[i, j] = pal[j % len(pal)]
    return table, lens


_PAL_SRC, _LEN_SRC = _palette_table(0)
_PAL_TGT, _LEN_TGT = _palette_table(1)
_TEX_SRC = np.array([_MATS[n][2] for n in _MAT_NAMES], np.float32)
_TEX_TGT = np.array([_MATS[n][3] for n in _MAT_NAMES], np.float32)
# overcast target sky (drawn instead of the target sky palette on overcast days)
_SKY_OVERCAST = np.array([(206, 210, 215), (190, 195, 201), (220, 222, 226)], np.float32)
# large-scale hue variation in the target (multiplicative per channel, times a noise field)
_TINT_TGT = np.zeros((_NMAT, 3), np.float32)
for _n, _t in {"foliage": (0.10, 0.04, 0.14), "grass": (0.10, 0.06, 0.14), "facade": (0.05, 0.04, 0.03),
               "asphalt": (0.02, 0.02, 0.03), "pavement": (0.05, 0.04, 0.03), "wall": (0.05, 0.04, 0.04)}.items():
    _TINT_TGT[_MAT[_n]] = _t
_GROUND = np.zeros(_NMAT, bool)
_GROUND[[_MAT[n] for n in _GROUND_MATS]] = True


# ============================================================================ scene
class _Cam:
    """Pinhole camera over a flat ground plane; X right, Y up, Z forward (metres)."""

    def __init__(self, W, H, yh, xv, f, hc):
        self.W, self.H, self.yh, self.xv, self.f, self.hc = W, H, yh, xv, f, hc
        # nearest depth whose ground row lies just below the image
        self.z_near = f * hc / (H + 3 - yh)

    def pt(self, X, Y, Z):
        Z = max(Z, 0.3)
        return (self.xv + self.f * X / Z, self.yh + self.f * (self.hc - Y) / Z)

    def s(self, Z):
        return self.f / max(Z, 0.3)

    def ground(self, X0, X1, Z0, Z1):
        Z0 = max(Z0, self.z_near)
        Z1 = max(Z1, Z0 + 1e-3)
        return [self.pt(X0, 0, Z0), self.pt(X1, 0, Z0), self.pt(X1, 0, Z1), self.pt(X0, 0, Z1)]

    def side(self, X, Y0, Y1, Z0, Z1):
        """A vertical quad in the plane X = const (a facade along the road)."""
        return [self.pt(X, Y0, Z0), self.pt(X, Y0, Z1), self.pt(X, Y1, Z1), self.pt(X, Y1, Z0)]

    def front(self, X0, X1, Y0, Y1, Z):
        """A vertical quad in the plane Z = const (facing the camera)."""
        return [self.pt(X0, Y0, Z), self.pt(X1, Y0, Z), self.pt(X1, Y1, Z), self.pt(X0, Y1, Z)]

    def ellipse(self, X, Y, Z, rx, ry):
        x, y = self.pt(X, Y, Z)
        s = self.s(Z)
        return [x - rx * s, y - ry * s, x + rx * s, y + ry * s]


# depth modes of an instance (for haze): constant Z, ground row, side plane, sky
_D_CONST, _D_GROUND, _D_SIDE, _D_SKY = 0, 1, 2, 3


class _Obj:
    __slots__ = ("layer", "z", "seq", "cls", "dmode", "dval", "parts")

    def __init__(self, layer, z, seq, cls, dmode, dval):
        self.layer, self.z, self.seq, self.cls = layer, z, seq, cls
        self.dmode, self.dval = dmode, dval
        self.parts = []

    def poly(self, mat, pts, shade=1.0, cls=None):
        self.parts.append(("poly", mat, pts, shade, cls, 0))

    def ellipse(self, mat, box, shade=1.0, cls=None, outline=0):
        self.parts.append(("ellipse", mat, box, shade, cls, outline))

    def line(self, mat, pts, width, shade=1.0, cls=None):
        self.parts.append(("line", mat, pts, shade, cls, width))


@dataclass
class Scene:
    """A rasterised layout: an instance map and per-instance attributes."""

    inst: np.ndarray  # (H, W) int32 instance ids
    cls: np.ndarray  # (N,) uint8 internal class codes (train ids, 253..255 void)
    mat: np.ndarray  # (N,) int16 material index
    shade: np.ndarray  # (N,) float32 face shading
    ckey: np.ndarray  # (N,) int32 colour key: instances of one object + material share a colour
    dmode: np.ndarray  # (N,) int8 depth mode
    dval: np.ndarray  # (N,) float32 depth parameter
    shadows: list  # polygons (image coordinates) of cast shadows on the ground
    cam: tuple  # (W, H, yh, xv, f, hc)
    sun_side: int  # -1 / +1: the side the light comes from

    @property
    def classes(self) -> np.ndarray:
        """Internal class map (H, W) uint8: train ids, 253 static, 254 ego vehicle, 255 void."""
        return self.cls[self.inst]

    @property
    def train_ids(self) -> np.ndarray:
        return to_train_ids(self.classes)


class _Builder:
    def __init__(self, cam: _Cam):
        self.cam = cam
        self.objs: List[_Obj] = []
        self.shadows: List[list] = []

    def obj(self, layer, z, cls, dmode=_D_CONST, dval=None) -> _Obj:
        o = _Obj(layer, z, len(self.objs), cls, dmode, z if dval is None else dval)
        self.objs.append(o)
        return o

    def shadow_ground(self, X0, X1, Z0, Z1):
        self.shadows.append(self.cam.ground(X0, X1, Z0, Z1))

    def rasterize(self, sun_side) -> Scene:
        W, H = self.cam.W, self.cam.H
        img = Image.new("I", (W, H), 0)
        draw = ImageDraw.Draw(img)
        ids: Dict[tuple, int] = {}
        ckeys: Dict[tuple, int] = {}
        rec_cls, rec_mat, rec_shade, rec_ckey, rec_dm, rec_dv = [], [], [], [], [], []
        for o in sorted(self.objs, key=lambda o: (o.layer, -o.z, o.seq)):
            for kind, mat, geom, shade, cls, width in o.parts:
                c = o.cls if cls is None else cls
                key = (o.seq, mat, shade, c)
                iid = ids.get(key)
                if iid is None:
                    iid = ids[key] = len(rec_cls)
                    rec_cls.append(c)
                    rec_mat.append(_MAT[mat])
                    rec_shade.append(shade)
                    rec_ckey.append(ckeys.setdefault((o.seq, mat), len(ckeys)))
                    rec_dm.append(o.dmode)
                    rec_dv.append(o.dval)
                if kind == "poly":
                    draw.polygon([(float(x), float(y)) for x, y in geom], fill=iid)
                elif kind == "ellipse":
                    x0, y0, x1, y1 = (float(v) for v in geom)
                    if x1 - x0 < 0.5 or y1 - y0 < 0.5:
                        continue
                    if width:
                        draw.ellipse([x0, y0, x1, y1], outline=iid, width=int(width))
                    else:
                        draw.ellipse([x0, y0, x1, y1], fill=iid)
                else:
                    draw.line([(float(x), float(y)) for x, y in geom], fill=iid, width=int(width))
        inst = np.asarray(img, dtype=np.int32)
        return Scene(
            inst=inst,
            cls=np.array(rec_cls, np.uint8),
            mat=np.array(rec_mat, np.int16),
            shade=np.array(rec_shade, np.float32),
            ckey=np.array(rec_ckey, np.int32),
            dmode=np.array(rec_dm, np.int8),
            dval=np.array(rec_dv, np.float32),
            shadows=self.shadows,
            cam=(W, H, self.cam.yh, self.cam.xv, self.cam.f, self.cam.hc),
            sun_side=sun_side,
        )


# ---------------------------------------------------------------------------- layout distributions
@dataclass(frozen=True)
class LayoutDist:
    horizon: Tuple[float, float]  # horizon row / H
    vp_x: Tuple[float, float]  # vanishing point column / W
    cam_h: Tuple[float, float]  # camera height (m)
    lanes: Tuple[int, int]  # number of lanes (inclusive range)
    lane_w: Tuple[float, float]
    sidewalk_w: Tuple[float, float]
    side_p: Tuple[float, float, float, float]  # buildings, park, wall+vegetation, open
    far_block_p: float  # a row of buildings closes the street
    bld_height: Tuple[float, float]
    cars: float  # Poisson means below
    parked_frac: float
    trucks: float
    buses: float
    tram_p: float
    persons: float
    riders: float
    moto_frac: float
    parked_bikes: float
    poles: float  # per side
    sign_p: float
    light_p: float
    street_trees: float  # per side
    fence_p: float
    wall_p: float
    hood_p: float
    crosswalk_p: float
    statics: float
    yellow_p: float
    grass_strip_p: float


SOURCE_LAYOUT = LayoutDist(
    horizon=(0.36, 0.50), vp_x=(0.30, 0.70), cam_h=(1.4, 1.8), lanes=(2, 5), lane_w=(3.2, 3.8),
    sidewalk_w=(2.0, 4.0), side_p=(0.70, 0.15, 0.10, 0.05), far_block_p=0.55, bld_height=(7.0, 32.0),
    cars=3.5, parked_frac=0.25, trucks=0.35, buses=0.18, tram_p=0.04, persons=1.5, riders=0.25,
    moto_frac=0.6, parked_bikes=0.15, poles=2.0, sign_p=0.45, light_p=0.3, street_trees=0.8,
    fence_p=0.3, wall_p=0.2, hood_p=0.05, crosswalk_p=0.15, statics=0.5, yellow_p=0.6, grass_strip_p=0.1,
)
TARGET_LAYOUT = LayoutDist(
    horizon=(0.40, 0.54), vp_x=(0.38, 0.62), cam_h=(1.2, 1.5), lanes=(1, 3), lane_w=(2.9, 3.5),
    sidewalk_w=(2.5, 5.0), side_p=(0.55, 0.30, 0.10, 0.05), far_block_p=0.45, bld_height=(6.0, 22.0),
    cars=3.0, parked_frac=0.6, trucks=0.2, buses=0.12, tram_p=0.05, persons=3.0, riders=0.35,
    moto_frac=0.3, parked_bikes=0.4, poles=2.5, sign_p=0.45, light_p=0.3, street_trees=2.0,
    fence_p=0.35, wall_p=0.25, hood_p=0.65, crosswalk_p=0.2, statics=1.0, yellow_p=0.05, grass_strip_p=0.3,
)


def _u(rng, lo_hi):
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


class _Layout:
    """Draws one street scene into a _Builder."""

    def __init__(self, rng: np.random.Generator, W: int, H: int, dist: LayoutDist):
        self.rng, self.W, self.H, self.d = rng, W, H, dist
        yh = _u(rng, dist.horizon) * H
        xv = _u(rng, dist.vp_x) * W
        f = W * float(rng.uniform(0.8, 0.95))
        hc = _u(rng, dist.cam_h)
        self.cam = _Cam(W, H, yh, xv, f, hc)
        self.b = _Builder(self.cam)
        self.sun = -1 if rng.random() < 0.5 else 1
        self.shadow_len = float(rng.uniform(0.3, 1.1))

    # ------------------------------------------------------------------ helpers
    def _poisson(self, lam):
        return int(self.rng.poisson(lam))

    def _quad_seg(self, X1, Y1, X2, Y2, t, Z):
        """A thick segment in the plane Z = const as an image polygon."""
        dx, dy = X2 - X1, Y2 - Y1
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n * t / 2, dx / n * t / 2
        c = self.cam
        return [c.pt(X1 + nx, Y1 + ny, Z), c.pt(X2 + nx, Y2 + ny, Z), c.pt(X2 - nx, Y2 - ny, Z),
                c.pt(X1 - nx, Y1 - ny, Z)]

    # ------------------------------------------------------------------ scene
    def build(self) -> Scene:
        rng, d = self.rng, self.d
        lanes = int(rng.integers(d.lanes[0], d.lanes[1] + 1))
        lw = _u(rng, d.lane_w)
        ego = int(rng.integers(0, lanes)) if lanes > 1 else 0
        if lanes >= 2 and rng.random() < 0.6:
            ego = lanes - 1 - int(rng.integers(0, max(1, lanes // 2)))  # keep right, mostly
        off = float(rng.uniform(-0.4, 0.4))
        self.XL = -(ego + 0.5) * lw + off
        self.XR = self.XL + lanes * lw
        self.lanes, self.lw = lanes, lw
        self.swL = _u(rng, d.sidewalk_w)
        self.swR = _u(rng, d.sidewalk_w)
        self.far_block = rng.random() < d.far_block_p
        self.Zend = float(rng.uniform(35, 130)) if self.far_block else 400.0
        self.grass_strip = rng.random() < d.grass_strip_p

        sky = self.b.obj(0, 1e9, 10, _D_SKY, 0.0)
        sky.poly("sky", [(-2, -2), (self.W + 2, -2), (self.W + 2, self.H + 2), (-2, self.H + 2)])
        self._background()
        self._ground(lanes, lw)
        for side in (-1, 1):
            kind = int(rng.choice(4, p=np.array(d.side_p) / sum(d.side_p)))
            self._side(side, kind)
        self._street_furniture()
        self._vehicles()
        self._people()
        if rng.random() < d.hood_p:
            self._hood()
        return self.b.rasterize(self.sun)

    # ------------------------------------------------------------------ far background
    def _background(self):
        rng, c = self.rng, self.cam
        Zb = 300.0 if not self.far_block else self.Zend + 40
        # a distant band of trees or buildings hides the horizon line
        band = self.b.obj(1, Zb + 1, 8 if rng.random() < 0.5 else 2, _D_CONST, Zb)
        mat = "foliage" if band.cls == 8 else "facade"
        xs = np.linspace(-400, 400, 41)
        tops = rng.uniform(4, 14 if band.cls == 8 else 25, size=xs.size)
        pts = [c.pt(xs[0], -1.0, Zb)]
        for x, t in zip(xs, tops):
            pts.append(c.pt(x, t, Zb))
        pts.append(c.pt(xs[-1], -1.0, Zb))
        band.poly(mat, pts, shade=0.9)
        if self.far_block:
            Z = self.Zend
            X = -80.0
            while X < 80:
                w = float(rng.uniform(8, 25))
                h = float(rng.uniform(*self.d.bld_height))
                o = self.b.obj(1, Z + 0.5, 2, _D_CONST, Z)
                o.poly("facade", c.front(X, X + w, -0.5, h, Z))
                self._windows_front(o, X, X + w, h, Z)
                X += w

    def _windows_front(self, o, X0, X1, h, Z):
        rng, c = self.rng, self.cam
        s = c.s(Z)
        fh = float(rng.uniform(2.8, 3.6))
        ws = float(rng.uniform(2.2, 3.6))
        wr, hr = float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.4, 0.65))
        if ws * wr * s < 1.2:
            return
        y = 1.0
        while y + fh * hr < h - 0.5:
            x = X0 + 0.6
            while x + ws * wr < X1 - 0.3:
                o.poly("window", c.front(x, x + ws * wr, y, y + fh * hr, Z))
                x += ws
            y += fh

    # ------------------------------------------------------------------ ground plane
    def _ground(self, lanes, lw):
        rng, c, b, d = self.rng, self.cam, self.b, self.d
        Zf = self.Zend
        XL, XR = self.XL, self.XR
        swL, swR = self.swL, self.swR
        road = b.obj(2, 0, 0, _D_GROUND)
        road.poly("asphalt", c.ground(XL, XR, 0, Zf))
        for side, X in ((-1, XL), (1, XR)):
            sw = swL if side < 0 else swR
            o = b.obj(2, 0, 1, _D_GROUND)
            Xo = X + side * sw
            o.poly("pavement", c.ground(min(X, Xo), max(X, Xo), 0, Zf))
            o.poly("curb", c.ground(min(X, X + side * 0.25), max(X, X + side * 0.25), 0, Zf), shade=1.0)
            if self.grass_strip and sw > 2.6:
                g = b.obj(2, 0, 9, _D_GROUND)
                a, e = X + side * 0.6, X + side * 1.6
                g.poly("grass", c.ground(min(a, e), max(a, e), 0, Zf))
        # markings: dashed lane lines, solid edge lines, optional yellow centre line
        m = b.obj(2, 0, 0, _D_GROUND)
        yellow = rng.random() < d.yellow_p
        centre = int(rng.integers(1, lanes)) if lanes > 1 else None
        period = float(rng.uniform(8, 12))
        dash = period * float(rng.uniform(0.3, 0.5))
        for k in range(1, lanes):
            X = XL + k * lw
            if k == centre and yellow:
                for dx in (-0.18, 0.08):
                    m.poly("marking_y", c.ground(X + dx, X + dx + 0.1, 0, Zf))
                continue
            z = float(rng.uniform(0, period)) - period
            while z < min(Zf, 150):
                m.poly("marking_w", c.ground(X - 0.07, X + 0.07, z, z + dash))
                z += period
        if rng.random() < 0.7:
            for X in (XL + 0.3, XR - 0.45):
                m.poly("marking_w", c.ground(X, X + 0.15, 0, Zf))
        if rng.random() < d.crosswalk_p:
            z0 = float(rng.uniform(6, 30))
            X = XL + 0.5
            while X < XR - 0.5:
                m.poly("marking_w", c.ground(X, X + 0.5, z0, z0 + 3.0))
                X += 1.0
        if rng.random() < 0.08 or self._tram_planned():
            X = (XL + XR) / 2 + float(rng.uniform(-1, 1))
            for dx in (-0.75, 0.7):
                m.poly("rail", c.ground(X + dx, X + dx + 0.07, 0, Zf))

    def _tram_planned(self):
        if not hasattr(self, "_tram"):
            self._tram = self.rng.random() < self.d.tram_p
        return self._tram

    # ------------------------------------------------------------------ roadside
    def _side(self, side, kind):
        """kind: 0 buildings, 1 park, 2 wall/fence + vegetation, 3 open terrain."""
        rng, c, b, d = self.rng, self.cam, self.b, self.d
        edge = (self.XL - self.swL) if side < 0 else (self.XR + self.swR)
        far = edge + side * 60
        Zf = self.Zend
        g = b.obj(2, -1, 9 if kind != 0 else 1, _D_GROUND)
        g.poly("grass" if kind != 0 else "pavement", c.ground(min(edge, far), max(edge, far), 0, Zf))
        if kind == 0:
            self._building_row(side, edge)
        elif kind == 1:
            self._tree_line(side, edge + side * float(rng.uniform(8, 25)))
            for _ in range(self._poisson(5)):
                X = edge + side * float(rng.uniform(2, 25))
                self._tree(X, float(rng.uniform(5, min(Zf, 80))), big=True)
            for _ in range(self._poisson(2)):
                X = edge + side * float(rng.uniform(1, 8))
                self._bush(X, float(rng.uniform(4, min(Zf, 60))))
        elif kind == 2:
            if rng.random() < 0.5:
                self._building_row(side, edge + side * float(rng.uniform(3, 10)))
            else:
                self._tree_line(side, edge + side * float(rng.uniform(4, 12)))
            self._wall(side, edge + side * 0.1, 0, Zf, wall=rng.random() < 0.6)
        else:
            self._tree_line(side, edge + side * float(rng.uniform(30, 60)))
        # fences / walls / hedges along the sidewalk edge
        if kind != 2:
            for p, is_wall in ((d.fence_p, False), (d.wall_p, True)):
                if rng.random() < p:
                    z0 = float(rng.uniform(0, 30))
                    self._wall(side, edge + side * 0.1, z0, z0 + float(rng.uniform(5, 40)), wall=is_wall)
        for _ in range(self._poisson(d.street_trees)):
            sw = self.swL if side < 0 else self.swR
            X = (self.XL - sw * 0.55) if side < 0 else (self.XR + sw * 0.55)
            self._tree(X, float(rng.uniform(4, min(Zf, 70))), big=False)

    def _building_row(self, side, X):
        rng, c, b, d = self.rng, self.cam, self.b, self.d
        z = c.z_near * 0.5
        sun_here = side == self.sun
        while z < self.Zend:
            L = float(rng.uniform(6, 26))
            if rng.random() < 0.12:  # a gap between buildings
                z += float(rng.uniform(3, 10))
                continue
            h = float(rng.uniform(*d.bld_height))
            Xb = X + side * (float(rng.uniform(0, 2.0)) if rng.random() < 0.4 else 0.0)
            z1 = min(z + L, self.Zend)
            o = b.obj(3, z, 2, _D_SIDE, Xb)
            o.poly("facade", c.side(Xb, -0.3, h, z, z1))
            if rng.random() < 0.5:
                o.poly("facade", c.side(Xb, h - 0.6, h, z, z1), shade=0.8)  # cornice
            self._windows_side(o, Xb, z, z1, h)
            if sun_here:
                dlen = min(h * self.shadow_len, 30.0)
                self.b.shadow_ground(min(Xb, Xb - side * dlen), max(Xb, Xb - side * dlen), z, z1)
            z = z1

    def _windows_side(self, o, X, z0, z1, h):
        rng, c = self.rng, self.cam
        fh = float(rng.uniform(2.8, 3.6))
        ws = float(rng.uniform(2.2, 3.6))
        wr, hr = float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.4, 0.65))
        shop = rng.random() < 0.5
        y0 = 3.5 if shop else 1.0
        if shop:
            z = z0 + 0.5
            while z + 2.5 < z1:
                pts = c.side(X, 0.3, 2.8, z, z + 2.5)
                if abs(pts[1][0] - pts[0][0]) >= 0.8:
                    o.poly("shopwindow" if rng.random() < 0.8 else "door", pts)
                z += 3.2
        z = z0 + 0.4
        while z + ws * wr < z1:
            x0 = c.pt(X, 0, z)[0]
            x1 = c.pt(X, 0, z + ws * wr)[0]
            if abs(x1 - x0) >= 0.8:
                y = y0
                while y + fh * hr < h - 0.7:
                    o.poly("window", c.side(X, y, y + fh * hr, z, z + ws * wr))
                    y += fh
            z += ws

    def _tree_line(self, side, X):
        rng, c, b = self.rng, self.cam, self.b
        z = c.z_near * 0.5
        o = b.obj(3, self.Zend + 1, 8, _D_SIDE, X)
        zs = [z]
        while zs[-1] < self.Zend:
            zs.append(zs[-1] + float(rng.uniform(3, 9)))
        tops = rng.uniform(5, 14, size=len(zs))
        pts = [c.pt(X, -0.2, zs[0])] + [c.pt(X, t, zz) for zz, t in zip(zs, tops)] + [c.pt(X, -0.2, zs[-1])]
        o.poly("foliage", pts, shade=0.85)

    def _wall(self, side, X, z0, z1, wall):
        rng, c, b = self.rng, self.cam, self.b
        z0 = max(z0, c.z_near * 0.5)
        z1 = min(z1, self.Zend)
        if z1 <= z0:
            return
        h = float(rng.uniform(0.8, 2.4)) if wall else float(rng.uniform(1.0, 1.8))
        o = b.obj(4, z0, 3 if wall else 4, _D_SIDE, X)
        if wall:
            o.poly("wall", c.side(X, -0.2, h, z0, z1))
            o.poly("wall", c.side(X, h - 0.15, h, z0, z1), shade=1.15)
        else:
            o.poly("fence", c.side(X, 0.0, h, z0, z1))
            z = z0
            step = float(rng.uniform(2.0, 3.0))
            while z < z1:
                o.poly("fence_post", c.side(X, 0.0, h + 0.05, z, z + 0.12))
                z += step
            o.poly("fence_post", c.side(X, h - 0.08, h + 0.02, z0, z1))

    def _tree(self, X, Z, big):
        rng, c, b = self.rng, self.cam, self.b
        o = b.obj(5, Z, 8, _D_CONST, Z)
        th = float(rng.uniform(1.8, 3.2))
        tw = float(rng.uniform(0.2, 0.4))
        R = float(rng.uniform(1.5, 3.2 if big else 2.4))
        o.poly("trunk", c.front(X - tw / 2, X + tw / 2, -0.1, th + R * 0.5, Z))
        for _ in range(int(rng.integers(3, 7))):
            dx, dy = rng.uniform(-R * 0.7, R * 0.7), rng.uniform(-R * 0.5, R * 0.7)
            r = R * float(rng.uniform(0.55, 0.9))
            o.ellipse("foliage", c.ellipse(X + dx, th + R + dy, Z, r, r * float(rng.uniform(0.8, 1.1))))
        if self.sun:
            dl = (th + R) * self.shadow_len
            Xs = X - self.sun * dl * 0.6
            self.b.shadow_ground(min(X, Xs) - R * 0.5, max(X, Xs) + R * 0.5, Z - R * 0.6, Z + R * 0.6)

    def _bush(self, X, Z):
        rng, c = self.rng, self.cam
        o = self.b.obj(5, Z, 8, _D_CONST, Z)
        for _ in range(int(rng.integers(2, 5))):
            r = float(rng.uniform(0.4, 1.0))
            o.ellipse("foliage", c.ellipse(X + rng.uniform(-0.8, 0.8), r * 0.7, Z, r, r * 0.75))

    # ------------------------------------------------------------------ poles, signs, lights
    def _street_furniture(self):
        rng, c, b, d = self.rng, self.cam, self.b, self.d
        for side in (-1, 1):
            Xc = (self.XL - 0.45) if side < 0 else (self.XR + 0.45)
            for _ in range(self._poisson(d.poles)):
                Z = float(rng.uniform(4, min(self.Zend, 80)))
                self._pole(Xc, Z, side)
            for _ in range(self._poisson(d.statics / 2)):
                sw = self.swL if side < 0 else self.swR
                X = Xc + side * float(rng.uniform(0.5, max(0.6, sw - 0.8)))
                Z = float(rng.uniform(4, min(self.Zend, 50)))
                o = b.obj(5, Z, _STATIC, _D_CONST, Z)
                w, h = float(rng.uniform(0.5, 1.8)), float(rng.uniform(0.6, 1.2))
                o.poly("static", c.front(X - w / 2, X + w / 2, 0, h, Z))

    def _pole(self, X, Z, side):
        rng, c = self.rng, self.cam
        o = self.b.obj(5, Z, 5, _D_CONST, Z)
        s = c.s(Z)
        h = float(rng.uniform(3.5, 8.0))
        w = float(rng.uniform(0.12, 0.25))
        if w * s >= 1.0:
            o.poly("pole", c.front(X - w / 2, X + w / 2, -0.1, h, Z))
        else:
            o.line("pole", [c.pt(X, 0, Z), c.pt(X, h, Z)], width=1)
        r = rng.random()
        if r < self.d.sign_p:
            # traffic sign(s) on the pole
            y = float(rng.uniform(2.0, min(h - 0.3, 3.2)))
            size = float(rng.uniform(0.55, 0.9))
            self._sign(o, X - side * (size / 2 + w / 2) * float(rng.random() < 0.3), y, Z, size)
        elif r < self.d.sign_p + self.d.light_p:
            y = float(rng.uniform(2.6, min(h - 0.2, 4.5))) if h > 3.0 else 2.6
            if rng.random() < 0.35 and h > 5:
                # overhead arm across the road with a hanging light
                Xe = X - side * float(rng.uniform(2.5, 6.0))
                o.line("pole", [c.pt(X, h - 0.3, Z), c.pt(Xe, h - 0.3, Z)], width=max(1, int(round(0.12 * s))))
                self._tlight(Xe, h - 0.35 - 1.0, Z)
            else:
                self._tlight(X - side * 0.3, y, Z)
        elif h > 6 and rng.random() < 0.5:
            # street lamp: arm and head
            Xe = X - side * 1.5
            o.line("pole", [c.pt(X, h, Z), c.pt(Xe, h + 0.3, Z)], width=max(1, int(round(0.1 * s))))
            o.poly("pole", c.front(Xe - 0.35, Xe + 0.35, h + 0.15, h + 0.4, Z))
        if self.sun:
            dl = h * self.shadow_len
            Xs = X - self.sun * dl
            self.b.shadow_ground(min(X, Xs), max(X, Xs), Z - 0.08, Z + 0.08)

    def _sign(self, o, X, y, Z, size):
        rng, c = self.rng, self.cam
        shape = int(rng.integers(0, 5))
        back = rng.random() < 0.25
        r = size / 2
        if shape == 0:  # round
            o.ellipse("sign_back" if back else "sign_rim", c.ellipse(X, y, Z, r, r), cls=7)
            if not back:
                o.ellipse("sign_face", c.ellipse(X, y, Z, r * 0.78, r * 0.78), cls=7)
        elif shape == 1:  # triangle
            for mat, k in (("sign_back" if back else "sign_rim", 1.0), ("sign_face", 0.7)):
                if back and mat == "sign_face":
                    break
                o.poly(mat, [c.pt(X - r * k, y - r * 0.8 * k, Z), c.pt(X + r * k, y - r * 0.8 * k, Z),
                             c.pt(X, y + r * k, Z)], cls=7)
        elif shape == 2:  # diamond
            for mat, k in (("sign_back" if back else "sign_rim", 1.0), ("sign_face", 0.72)):
                if back and mat == "sign_face":
                    break
                o.poly(mat, [c.pt(X - r * k, y, Z), c.pt(X, y - r * k, Z), c.pt(X + r * k, y, Z),
                             c.pt(X, y + r * k, Z)], cls=7)
        else:  # rectangular / information sign
            w = size * (1.0 if shape == 3 else float(rng.uniform(1.4, 2.2)))
            hh = size * (1.0 if shape == 3 else 0.6)
            o.poly("sign_back" if back else "sign_rim", c.front(X - w / 2, X + w / 2, y - hh / 2, y + hh / 2, Z), cls=7)
            if not back:
                o.poly("sign_face", c.front(X - w * 0.42, X + w * 0.42, y - hh * 0.4, y + hh * 0.4, Z), cls=7)

    def _tlight(self, X, y, Z):
        rng, c = self.rng, self.cam
        o = self.b.obj(5, Z - 0.01, 6, _D_CONST, Z)
        w, h = 0.34, 0.95
        o.poly("tl_box", c.front(X - w / 2, X + w / 2, y, y + h, Z))
        if rng.random() < 0.2:
            return  # seen from the back
        lit = int(rng.integers(0, 3))
        for k in range(3):
            yy = y + h * (0.8 - 0.3 * k)
            o.ellipse("tl_lit" if k == lit else "tl_off", c.ellipse(X, yy, Z, 0.11, 0.11))

    # ------------------------------------------------------------------ vehicles
    def _vehicles(self):
        rng, d = self.rng, self.d
        occupied: List[Tuple[float, float, float, float]] = []

        def free(X0, X1, Z0, Z1):
            for a0, a1, b0, b1 in occupied:
                if X0 < a1 + 0.3 and X1 > a0 - 0.3 and Z0 < b1 + 1.0 and Z1 > b0 - 1.0:
                    return False
            return True

        kinds = (["tram"] if self._tram_planned() else []) + ["bus"] * self._poisson(d.buses) + \
            ["truck"] * self._poisson(d.trucks) + ["car"] * self._poisson(d.cars)
        zmax = min(self.Zend - 2, 90.0)
        for kind in kinds:
            dims = {"car": (1.8, 4.4), "truck": (2.5, 8.0), "bus": (2.55, 12.0), "tram": (2.65, 28.0)}[kind]
            wid = dims[0] * float(rng.uniform(0.92, 1.08))
            L = dims[1] * float(rng.uniform(0.85, 1.15))
            for _ in range(8):
                parked = kind == "car" and rng.random() < d.parked_frac
                if parked:
                    side = -1 if rng.random() < 0.5 else 1
                    Xc = (self.XL + wid / 2 + 0.2) if side < 0 else (self.XR - wid / 2 - 0.2)
                elif kind == "tram":
                    Xc = (self.XL + self.XR) / 2
                else:
                    lane = int(rng.integers(0, self.lanes))
                    Xc = self.XL + (lane + 0.5) * self.lw + float(rng.uniform(-0.3, 0.3))
                Z0 = float(rng.uniform(4.0, max(4.5, zmax)))
                X0, X1 = Xc - wid / 2, Xc + wid / 2
                if free(X0, X1, Z0, Z0 + L) and abs(Xc) > 0.3 * (Z0 < 6):
                    occupied.append((X0, X1, Z0, Z0 + L))
                    facing = 1 if (Xc > self.XL + self.lw * 0.9 or parked) else -1
                    if not parked and Xc < 0 and rng.random() < 0.6:
                        facing = -1  # oncoming traffic on the left
                    self._vehicle(kind, X0, X1, Z0, L, facing)
                    break

    def _vehicle(self, kind, X0, X1, Z0, L, facing):
        rng, c, b = self.rng, self.cam, self.b
        cls = {"car": 13, "truck": 14, "bus": 15, "tram": 16}[kind]
        o = b.obj(5, Z0, cls, _D_CONST, Z0)
        paint = {"car": "car_paint", "truck": "truck_paint", "bus": "bus_paint", "tram": "train_paint"}[kind]
        Z1 = Z0 + L
        # visible side face (the one facing the camera axis)
        Xs = X1 if X1 < 0 else (X0 if X0 > 0 else None)
        wheel_r = 0.33 if kind == "car" else 0.5
        ground_clear = 0.25 if kind == "car" else 0.35
        if kind == "car":
            h1 = float(rng.uniform(0.85, 1.05))
            h2 = h1 + float(rng.uniform(0.38, 0.55))
        elif kind == "truck":
            h1 = float(rng.uniform(3.0, 3.8))
            h2 = h1
        elif kind == "bus":
            h1 = float(rng.uniform(2.9, 3.3))
            h2 = h1
        else:
            h1 = float(rng.uniform(3.3, 3.7))
            h2 = h1
        if Xs is not None:
            sh = 0.8
            if kind == "car":
                o.poly(paint, c.side(Xs, ground_clear, h1, Z0, Z1), shade=sh)
                za, zb = Z0 + 0.22 * L, Z0 + 0.78 * L
                cab = [c.pt(Xs, h1, Z0 + 0.12 * L), c.pt(Xs, h1, Z0 + 0.85 * L), c.pt(Xs, h2, zb), c.pt(Xs, h2, za)]
                o.poly(paint, cab, shade=sh)
                o.poly("glass", [c.pt(Xs, h1 + 0.05, Z0 + 0.2 * L), c.pt(Xs, h1 + 0.05, Z0 + 0.78 * L),
                                 c.pt(Xs, h2 - 0.06, zb - 0.1), c.pt(Xs, h2 - 0.06, za + 0.1)])
            elif kind == "truck":
                o.poly("cargo", c.side(Xs, 0.9, h1, Z0, Z1 - 2.4), shade=sh)
                o.poly(paint, c.side(Xs, 0.5, 2.9, Z1 - 2.3, Z1), shade=sh)
                o.poly("glass", c.side(Xs, 1.8, 2.6, Z1 - 1.5, Z1 - 0.3))
                o.poly("bumper", c.side(Xs, 0.4, 0.9, Z0, Z1 - 2.4))
            else:
                o.poly(paint, c.side(Xs, ground_clear, h1, Z0, Z1), shade=sh)
                z = Z0 + 0.5
                pane = 1.6 if kind == "bus" else 2.0
                while z + pane < Z1 - 0.4:
                    o.poly("glass", c.side(Xs, 1.25, h1 - 0.45, z, z + pane * 0.85))
                    z += pane
            nwheel = 2 if kind == "car" else 3
            for k in range(nwheel):
                zc = Z0 + L * (0.17 + 0.66 * k / (nwheel - 1))
                pts = [c.pt(Xs, wheel_r + wheel_r * math.sin(a), zc + wheel_r * math.cos(a))
                       for a in np.linspace(0, 2 * math.pi, 10, endpoint=False)]
                o.poly("tire", pts)
        # rear (or front) face
        if kind == "truck" and facing < 0:
            o.poly("cargo", c.front(X0, X1, 0.9, h1, Z0 + 2.4), shade=0.9)
            o.poly(paint, c.front(X0, X1, 0.5, 2.9, Z0))
            o.poly("glass", c.front(X0 + 0.15, X1 - 0.15, 1.8, 2.7, Z0))
        else:
            m = "cargo" if kind == "truck" else paint
            o.poly(m, c.front(X0, X1, ground_clear, h1, Z0))
        if kind == "car":
            o.poly(paint, c.front(X0 + 0.15, X1 - 0.15, h1, h2, Z0 + 0.22 * L))
            o.poly("glass", c.front(X0 + 0.25, X1 - 0.25, h1 + 0.04, h2 - 0.06, Z0 + 0.18 * L))
            o.poly("bumper", c.front(X0, X1, ground_clear, ground_clear + 0.2, Z0))
            lamp = "taillight" if facing > 0 else "headlight"
            for xa in (X0 + 0.08, X1 - 0.33):
                o.poly(lamp, c.front(xa, xa + 0.25, h1 - 0.28, h1 - 0.1, Z0))
            o.poly("plate", c.front((X0 + X1) / 2 - 0.26, (X0 + X1) / 2 + 0.26, ground_clear + 0.25,
                                    ground_clear + 0.37, Z0))
        elif kind in ("bus", "tram"):
            top = 1.2 if facing > 0 else 0.9
            o.poly("glass", c.front(X0 + 0.15, X1 - 0.15, top, h1 - 0.35, Z0))
            for xa in (X0 + 0.1, X1 - 0.35):
                o.poly("taillight" if facing > 0 else "headlight", c.front(xa, xa + 0.25, 0.5, 0.8, Z0))
        elif kind == "truck" and facing > 0:
            o.poly("bumper", c.front(X0, X1, 0.35, 0.9, Z0))
        for xa in (X0 + 0.02, X1 - 0.32):
            o.poly("tire", c.front(xa, xa + 0.3, 0.0, ground_clear + 0.05, Z0 + 0.2))
        # cast shadow under the vehicle
        self.b.shadow_ground(X0 - 0.15 - max(0, -self.sun) * 0.5, X1 + 0.15 + max(0, self.sun) * 0.5,
                             Z0 - 0.3, Z1)

    # ------------------------------------------------------------------ people and two-wheelers
    def _people(self):
        rng, d = self.rng, self.d
        n = self._poisson(d.persons)
        for _ in range(n):
            group = 1 + (self._poisson(0.6) if rng.random() < 0.3 else 0)
            side = -1 if rng.random() < 0.5 else 1
            sw = self.swL if side < 0 else self.swR
            Z = float(rng.uniform(3.5, min(self.Zend - 1, 55)))
            if rng.random() < 0.1:
                X = float(rng.uniform(self.XL + 0.5, self.XR - 0.5))  # crossing the road
            else:
                X = (self.XL - float(rng.uniform(0.5, sw))) if side < 0 else (self.XR + float(rng.uniform(0.5, sw)))
            for k in range(group):
                self._person(X + k * float(rng.uniform(0.5, 0.8)), Z + float(rng.uniform(-0.5, 0.5)))
        for _ in range(self._poisson(d.riders)):
            moto = rng.random() < d.moto_frac
            Z = float(rng.uniform(4, min(self.Zend - 1, 50)))
            lane = int(rng.integers(0, self.lanes))
            X = self.XL + (lane + float(rng.uniform(0.2, 0.8))) * self.lw
            if not moto and rng.random() < 0.5:
                X = self.XR - 0.6
            self._two_wheeler(X, Z, moto, rider=True)
        for _ in range(self._poisson(d.parked_bikes)):
            side = -1 if rng.random() < 0.5 else 1
            sw = self.swL if side < 0 else self.swR
            X = (self.XL - float(rng.uniform(0.6, sw))) if side < 0 else (self.XR + float(rng.uniform(0.6, sw)))
            Z = float(rng.uniform(4, min(self.Zend - 1, 40)))
            for k in range(1 + self._poisson(0.7)):
                self._two_wheeler(X, Z + k * 0.6, moto=rng.random() < 0.25, rider=False)

    def _person(self, X, Z, cls=11):
        rng, c = self.rng, self.cam
        o = self.b.obj(5, Z, cls, _D_CONST, Z)
        h = float(rng.uniform(1.5, 1.95))
        k = h / 1.75
        stride = float(rng.uniform(-0.12, 0.12))
        for sx in (-1, 1):
            o.poly("bottom", c.front(X + sx * 0.03 + (sx * stride if sx > 0 else 0), X + sx * 0.17 * k, 0, 0.9 * k, Z))
        o.poly("top", [c.pt(X - 0.17 * k, 0.85 * k, Z), c.pt(X + 0.17 * k, 0.85 * k, Z),
                       c.pt(X + 0.22 * k, 1.45 * k, Z), c.pt(X - 0.22 * k, 1.45 * k, Z)])
        for sx in (-1, 1):
            o.poly("top", c.front(min(X + sx * 0.2 * k, X + sx * 0.28 * k), max(X + sx * 0.2 * k, X + sx * 0.28 * k),
                                  0.78 * k, 1.42 * k, Z), shade=0.9)
            o.poly("skin", c.front(min(X + sx * 0.21 * k, X + sx * 0.27 * k), max(X + sx * 0.21 * k, X + sx * 0.27 * k),
                                   0.7 * k, 0.8 * k, Z))
        o.poly("skin", c.front(X - 0.05 * k, X + 0.05 * k, 1.43 * k, 1.53 * k, Z))
        o.ellipse("hair", c.ellipse(X, 1.64 * k, Z, 0.115 * k, 0.13 * k))
        o.ellipse("skin", c.ellipse(X, 1.61 * k, Z, 0.1 * k, 0.11 * k))
        if rng.random() < 0.15:  # a bag
            o.poly("bottom", c.front(X + 0.22 * k, X + 0.4 * k, 0.75 * k, 1.05 * k, Z), shade=0.7)
        self.b.shadow_ground(X - 0.3, X + 0.3 + 0.6 * self.sun, Z - 0.25, Z + 0.35)

    def _two_wheeler(self, X, Z, moto, rider):
        rng, c = self.rng, self.cam
        s = c.s(Z)
        cls = 17 if moto else 18
        o = self.b.obj(5, Z, cls, _D_CONST, Z)
        dirn = -1 if rng.random() < 0.5 else 1
        r = 0.32 if moto else 0.34
        base = 0.68 if moto else 0.52
        lw = max(1, int(round(0.05 * s)))
        for sx in (-1, 1):
            cx = X + sx * base
            if moto:
                o.ellipse("tire", c.ellipse(cx, r, Z, r, r))
                o.ellipse("engine", c.ellipse(cx, r, Z, r * 0.45, r * 0.45))
            else:
                o.ellipse("spokes", c.ellipse(cx, r, Z, r, r))
                o.ellipse("tire", c.ellipse(cx, r, Z, r, r), outline=max(1, int(round(0.05 * s))))
        if moto:
            pts = [(-0.55, 0.5), (-0.62, 0.78), (-0.1, 0.86), (0.3, 0.98), (0.55, 0.78), (0.45, 0.45), (0.0, 0.32)]
            o.poly("moto_paint", [c.pt(X + dirn * px, py, Z) for px, py in pts])
            o.poly("engine", [c.pt(X + dirn * px, py, Z) for px, py in ((-0.2, 0.3), (0.25, 0.3), (0.2, 0.6),
                                                                         (-0.15, 0.6))])
            seat = (X - dirn * 0.2, 0.9)
            bar = (X + dirn * 0.45, 1.05)
        else:
            rear, bb, st, head, front = (-0.52, 0.34), (-0.05, 0.3), (-0.2, 0.9), (0.38, 0.88), (0.52, 0.34)
            P = lambda p: c.pt(X + dirn * p[0], p[1], Z)  # noqa: E731
            for a, e in ((rear, bb), (rear, st), (st, bb), (st, head), (bb, head), (head, front)):
                o.line("frame", [P(a), P(e)], width=lw)
            o.line("frame", [P(head), P((0.32, 1.02))], width=lw)
            seat = (X - dirn * 0.2, 0.95)
            bar = (X + dirn * 0.32, 1.02)
        if rider:
            k = float(rng.uniform(0.92, 1.08))
            sh = (X + dirn * 0.05, seat[1] + 0.58 * k)
            o.poly("top", self._quad_seg(seat[0], seat[1], sh[0], sh[1], 0.34 * k, Z - 0.02), cls=12)
            o.poly("bottom", self._quad_seg(seat[0], seat[1], X + dirn * 0.05, 0.35, 0.15 * k, Z - 0.03), cls=12)
            o.poly("top", self._quad_seg(sh[0], sh[1] - 0.05, bar[0], bar[1], 0.09 * k, Z - 0.04), cls=12)
            hx, hy = sh[0] + dirn * 0.06, sh[1] + 0.2 * k
            if moto or rng.random() < 0.4:
                o.ellipse("helmet", c.ellipse(hx, hy, Z - 0.02, 0.14 * k, 0.14 * k), cls=12)
            else:
                o.ellipse("hair", c.ellipse(hx, hy + 0.02, Z - 0.02, 0.115 * k, 0.125 * k), cls=12)
                o.ellipse("skin", c.ellipse(hx + dirn * 0.02, hy, Z - 0.02, 0.1 * k, 0.11 * k), cls=12)
        self.b.shadow_ground(X - base - 0.3, X + base + 0.3, Z - 0.15, Z + 0.25)

    # ------------------------------------------------------------------ ego vehicle
    def _hood(self):
        rng = self.rng
        o = self.b.obj(6, 0, _EGO, _D_CONST, 1.0)
        hh = self.H * float(rng.uniform(0.06, 0.13))
        o.ellipse("hood", [-0.35 * self.W, self.H - hh, 1.35 * self.W, self.H + 2.2 * hh])


def sample_scene(rng: np.random.Generator, size: Tuple[int, int], domain: str = "source") -> Scene:
    """Draws one street layout from the source or target layout distribution."""
    dist = SOURCE_LAYOUT if domain == "source" else TARGET_LAYOUT
    return _Layout(rng, int(size[0]), int(size[1]), dist).build()


# ============================================================================ renderer
def _lerp(a, b, g):
    return a + (b - a) * g


class _Noise:
    """Smooth noise fields at a few scales (unit std), drawn once per image."""

    def __init__(self, rng, W, H):
        k = W / 256.0
        self.fields = []
        for cell in (1.0, 2.5 * k, 7.0 * k, 24.0 * k, 64.0 * k):
            if cell <= 1.0:
                f = rng.standard_normal((H, W), dtype=np.float32)
            else:
                gw, gh = int(math.ceil(W / cell)) + 2, int(math.ceil(H / cell)) + 2
                g = rng.standard_normal((gh, gw)).astype(np.float32)
                big = Image.fromarray(g).resize((int(round(gw * cell)), int(round(gh * cell))),
                                                          Image.BICUBIC)
                ox, oy = int(rng.integers(0, max(1, big.width - W))), int(rng.integers(0, max(1, big.height - H)))
                f = np.asarray(big, np.float32)[oy:oy + H, ox:ox + W]
                f = f / (f.std() + 1e-6)
            self.fields.append(f)


GAP_PARTS = ("palette", "texture", "light", "optics")
#: how far each component moves at gap = 1 (the tables above describe a full "real" look;
#: calibrated so that a small CNN trained on the source loses roughly half of its
#: mIoU on the target, see the module notes)
_PART_SCALE = {"palette": 0.55, "texture": 1.0, "light": 0.5, "optics": 1.0}


def render(scene: Scene, rng: np.random.Generator, g: float, parts: Optional[Dict[str, float]] = None) -> np.ndarray:
    """Renders a scene; ``g`` = 0 is the source ("game") renderer, 1 the target ("real") one.

    Every random draw is made whatever ``g``, so ``g`` only scales the appearance.
    ``parts`` optionally scales the components of the shift separately (a factor
    per name of GAP_PARTS: class palettes, textures, lighting/shadows/haze/tone,
    blur/noise), for ablations.
    """
    g = float(g)
    parts = parts or {}
    unknown = set(parts) - set(GAP_PARTS)
    if unknown:
        raise ValueError(f"unknown gap parts {sorted(unknown)}; known: {GAP_PARTS}")
    gp, gt, gl, go = (g * _PART_SCALE[k] * float(parts.get(k, 1.0)) for k in GAP_PARTS)
    W, H, yh, xv, f, hc = scene.cam
    inst = scene.inst
    n_ck = int(scene.ckey.max()) + 1 if scene.ckey.size else 0
    # ---- random state of the image (drawn in a fixed order)
    sunny = rng.random() < 0.5
    u = rng.random(n_ck)
    jit = rng.standard_normal((n_ck, 3)).astype(np.float32)
    ljit = rng.standard_normal(n_ck).astype(np.float32)
    sky_u = rng.random()
    noise = _Noise(rng, W, H)
    light_a, light_t = float(rng.uniform(0.12, 0.35)), float(rng.uniform(0, 2 * math.pi))
    expo = float(rng.standard_normal())
    wb = rng.standard_normal(3).astype(np.float32)
    gamma_u = float(rng.uniform(-1, 1))
    vig = float(rng.uniform(0.15, 0.4))
    blur = float(rng.uniform(0.5, 1.1))
    sensor = float(rng.uniform(2.0, 6.0))
    sensor_noise = rng.standard_normal((H, W, 3), dtype=np.float32)

    # ---- per-instance colours: class-conditional palettes
    ck_mat = np.zeros(n_ck, np.int64)
    ck_mat[scene.ckey] = scene.mat
    idx_s = np.minimum((u * _LEN_SRC[ck_mat]).astype(np.int64), _LEN_SRC[ck_mat] - 1)
    idx_t = np.minimum((u * _LEN_TGT[ck_mat]).astype(np.int64), _LEN_TGT[ck_mat] - 1)
    col_s = _PAL_SRC[ck_mat, idx_s]
    col_t = _PAL_TGT[ck_mat, idx_t].copy()
    sky_m = ck_mat == _MAT["sky"]
    if not sunny and sky_m.any():
        col_t[sky_m] = _SKY_OVERCAST[min(int(sky_u * 3), 2)]
    col = _lerp(col_s, col_t, gp) + jit * _lerp(5.0, 11.0, gp) + ljit[:, None] * _lerp(5.0, 14.0, gp)
    inst_col = (col[scene.ckey] * scene.shade[:, None]).astype(np.float32)
    mat = scene.mat.astype(np.int64)[inst]

    ys = np.arange(H, dtype=np.float32)[:, None]
    xs = np.arange(W, dtype=np.float32)[None, :]
    # ---- luminance multiplier M (H, W): textures and patterns
    amps = _lerp(_TEX_SRC, _TEX_TGT, gt)
    M = np.ones((H, W), np.float32)
    for k in range(4):
        a = amps[:, k]
        if a.any():
            M += a[mat] * noise.fields[k]
    sky_px = mat == _MAT["sky"]
    grad = _lerp(0.55, 0.25, gl)
    M *= np.where(sky_px, 1.0 + 2 * grad * np.minimum(0.0, (ys - yh) / H), 1.0).astype(np.float32)
    fol = mat == _MAT["foliage"]
    holes = np.minimum(np.clip(noise.fields[1] - 0.6, 0, None) * _lerp(0.15, 0.5, gt), 0.7)
    M *= np.where(fol, 1 - holes, 1.0)
    below = ys > yh + 0.5
    zrow = np.where(below, f * hc / np.maximum(ys - yh, 0.5), 1e4).astype(np.float32)
    if gt > 0:
        pav = (mat == _MAT["pavement"]) & below
        Xg = (xs - xv) * zrow / f
        grid = (np.mod(Xg, 0.6) < 0.06) | (np.mod(zrow, 0.6) < 0.06 * np.maximum(1.0, zrow / 8))
        M *= np.where(pav & grid, 1 - 0.18 * gt, 1.0)
        courses = np.mod(ys, 3.0 * W / 256) < 0.9
        M *= np.where((mat == _MAT["facade"]) & courses, 1 - 0.07 * gt, 1.0)
        M *= np.where((mat == _MAT["asphalt"]) & (noise.fields[3] > 0.9), 1 - 0.12 * gt, 1.0)
    q = max(2, int(round(3 * W / 256)))
    mesh = (np.mod(xs + ys, q) < 1) | (np.mod(xs - ys, q) < 1)
    M *= np.where((mat == _MAT["fence"]) & ~mesh, 0.62, 1.0)
    # ---- cast shadows on the ground (a per-channel multiplier)
    strength = _lerp(0.22, 0.55 if sunny else 0.12, gl)
    C = None
    if scene.shadows and strength > 0:
        sh_img = Image.new("L", (W, H), 0)
        sd = ImageDraw.Draw(sh_img)
        for poly in scene.shadows:
            sd.polygon([(float(x), float(y)) for x, y in poly], fill=255)
        r = _lerp(0.0, 1.2, gl) * W / 256
        if r > 0.05:
            sh_img = sh_img.filter(ImageFilter.GaussianBlur(r))
        sh = np.asarray(sh_img, np.float32) * (strength / 255.0) * _GROUND[mat]
        tint_sh = np.array(_lerp(np.ones(3), np.array([1.0, 0.95, 0.8]), gl), np.float32)
        C = 1 - sh[..., None] * tint_sh
    # ---- the image: colour x multipliers x large-scale tints
    img = inst_col[inst] * M[..., None]
    if gt > 0:
        img *= 1.0 + (_TINT_TGT * gt)[mat] * noise.fields[3][..., None]
    if C is not None:
        img *= C
    # clouds
    cloud_amt = _lerp(0.0, 0.55 if sunny else 0.9, gl)
    if cloud_amt > 0 and sky_px.any():
        cl = np.clip(0.6 * noise.fields[4] + 0.4 * noise.fields[3] - (0.2 if sunny else -0.4), 0, 1.5)
        cl = (cl * (cloud_amt / 1.5) * sky_px)[..., None]
        img += (np.float32(235 if sunny else 215) - img) * cl
    # ---- haze with depth (aerial perspective)
    dm = scene.dmode.astype(np.int64)[inst]
    dv = scene.dval[inst]
    depth = np.where(dm == _D_GROUND, zrow, dv)
    dx = np.where(np.abs(xs - xv) < 0.5, 0.5, xs - xv)
    depth = np.where(dm == _D_SIDE, np.abs(dv * f / dx), depth)
    hmax = _lerp(0.22, 0.55 if not sunny else 0.4, gl)
    hz = np.where(dm == _D_SKY, 0.0, hmax * (1 - np.exp(-depth / 90.0))).astype(np.float32)[..., None]
    haze_col = _lerp(np.array([178, 198, 232], np.float32), np.array([200, 204, 210], np.float32), gl)
    img += (haze_col - img) * hz
    # ---- global lighting: gradient, exposure, white balance (one per-channel gain map)
    A = _lerp(0.03, light_a, gl)
    L = 1 + 2 * A * ((xs / W - 0.5) * math.cos(light_t) + (ys / H - 0.5) * math.sin(light_t))
    gain = math.exp(_lerp(0.04, 0.14, gl) * expo) * np.exp(_lerp(0.01, 0.07, gl) * wb)
    img *= L[..., None] * gain.astype(np.float32)
    # ---- tone curve (contrast, lift, gamma) through a lookup table
    contrast = _lerp(1.0, 0.82, gl)
    gam = _lerp(1.0, 1.0 + 0.18 * gamma_u, gl)
    lv = np.arange(256, dtype=np.float64)
    lut = 255.0 * np.power(np.clip((lv - 128.0) * contrast + 128.0 + _lerp(0.0, 6.0, gl), 0, 255) / 255.0, gam)
    out = lut.astype(np.float32)[np.clip(img + 0.5, 0, 255).astype(np.uint8)]
    v = _lerp(0.0, vig, gl)
    if v > 0:
        r2 = ((xs / W - 0.5) ** 2 + (ys / H - 0.5) ** 2) * 2
        out *= (1 - v * r2)[..., None]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    # ---- optics and sensor
    sigma = _lerp(0.0, blur, go) * W / 256
    if sigma > 0.05:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(sigma)))
    sd_ = _lerp(0.8, sensor, go)
    noisy = out.astype(np.float32)
    noisy += sensor_noise * (sd_ * np.sqrt(np.maximum(noisy, 8.0) / 128.0))
    noisy += noise.fields[0][..., None] * (sd_ * 0.5)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def render_source(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    return render(scene, rng, 0.0)


def render_target(scene: Scene, rng: np.random.Generator, gap: float = 1.0) -> np.ndarray:
    return render(scene, rng, gap)


def image_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of (seed, domain, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _DOMAIN_CODES[domain], int(index)]))


def make_sample(params: SynthParams, domain: str, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """(RGB image (H, W, 3) uint8, internal class map (H, W) uint8) of one image.

    ``domain``: ``source``, ``target_train`` or ``target_val``.  Use
    :func:`to_train_ids` / :func:`to_label_ids` on the class map.
    """
    rng = image_rng(params.seed, domain, index)
    if domain == "source":
        scene = sample_scene(rng, params.size, "source")
        img = render(scene, rng, 0.0)
    else:
        scene = sample_scene(rng, params.size, "target")
        img = render(scene, rng, params.gap)
        if params.condition is not None:
            from segadapt.data.synthetic_conditions import apply_condition, condition_rng

            img = apply_condition(img, scene, params.condition,
                                  condition_rng(params.seed, _DOMAIN_CODES[domain], index, params.condition))
    return img, scene.classes


def class_frequencies(label_maps: Iterable[np.ndarray]) -> np.ndarray:
    """Fraction of labelled pixels per train id (19,) over train-id (or internal) label maps."""
    counts = np.zeros(256, np.int64)
    for lab in label_maps:
        counts += np.bincount(np.asarray(lab, np.uint8).ravel(), minlength=256)
    c = counts[:NUM_CLASSES].astype(np.float64)
    return c / max(c.sum(), 1.0)


# ============================================================================ writer
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png16_rgb(path: Union[str, Path], arr: np.ndarray) -> None:
    """Writes an (H, W, 3) uint16 array as a 16-bit RGB PNG (Pillow cannot write these)."""
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {arr.shape}")
    h, w = arr.shape[:2]
    rows = np.zeros((h, 1 + w * 6), np.uint8)  # filter byte 0 per row
    rows[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(h, w * 6)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    data += _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(data)


def read_png16(path: Union[str, Path]) -> np.ndarray:
    """Reads a 16-bit grey/RGB PNG written without filters or interlacing (as by write_png16_rgb)."""
    raw = Path(path).read_bytes()
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        raise DatasetError(f"{path}: not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos < len(raw):
        (n,) = struct.unpack(">I", raw[pos:pos + 4])
        tag, body = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    ch = {0: 1, 2: 3}.get(ctype)
    if depth != 16 or ch is None or interlace:
        raise DatasetError(f"{path}: expected a 16-bit grey or RGB PNG, got depth {depth} colour type {ctype}")
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * ch * 2)
    if rows[:, 0].any():
        raise DatasetError(f"{path}: PNG row filters are not supported by this reader")
    return rows[:, 1:].copy().view(">u2").astype(np.uint16).reshape(h, w, ch)


def _save_png(path: Path, arr: np.ndarray) -> None:
    # RGB images are noisy and compress little: favour speed
    Image.fromarray(arr).save(path, format="PNG", compress_level=1 if arr.ndim == 3 else 6)


def _jobs(p: SynthParams) -> List[Tuple[str, int]]:
    n_src = p.num_source + p.num_source_val
    return ([("source", i) for i in range(n_src)] + [("target_train", i) for i in range(p.num_target_train)]
            + [("target_val", i) for i in range(p.num_target_val)])


def _src_name(i: int, n: int) -> str:
    return f"{i + 1:0{max(5, len(str(n)))}d}.png"


def _synthia_name(i: int, n: int) -> str:
    return f"{i:0{max(7, len(str(n)))}d}.png"


def _target_paths(split: str, index: int, count: int) -> Tuple[str, str]:
    cities = TARGET_CITIES[split]
    per = -(-count // len(cities))
    city = cities[index // per]
    stem = f"{city}_{index % per:06d}_{19:06d}"
    return (f"target/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
            f"target/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png")


def target_files(params: SynthParams, split: str) -> List[Tuple[str, str]]:
    """(image, label) paths relative to the output folder of the target split ``train`` / ``val``."""
    n = params.num_target_train if split == "train" else params.num_target_val
    return [_target_paths(split, i, n) for i in range(n)]


def _work(args) -> List[Tuple[str, np.ndarray]]:
    root, pdict, chunk = args
    p = SynthParams.from_dict(pdict)
    root = Path(root)
    n_src = p.num_source + p.num_source_val
    out = []
    for domain, i in chunk:
        img, lab = make_sample(p, domain, i)
        if domain == "source":
            name = _src_name(i, n_src)
            _save_png(root / "source" / "images" / name, img)
            _save_png(root / "source" / "labels" / name, to_label_ids(lab))
            if p.synthia:
                sname = _synthia_name(i, n_src)
                _save_png(root / "source_synthia" / "RGB" / sname, img)
                ids = to_synthia_ids(lab)
                write_png16_rgb(root / "source_synthia" / "GT" / "LABELS" / sname,
                                np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1))
        else:
            split = "train" if domain == "target_train" else "val"
            n = p.num_target_train if split == "train" else p.num_target_val
            ip, lp = _target_paths(split, i, n)
            _save_png(root / ip, img)
            _save_png(root / lp, to_label_ids(lab))
        out.append((domain, np.bincount(lab.ravel(), minlength=256)[:NUM_CLASSES]))
    return out


def _write_all(root: Path, p: SynthParams) -> dict:
    n_src = p.num_source + p.num_source_val
    dirs = [root / "source" / "images", root / "source" / "labels"]
    for split, n in (("train", p.num_target_train), ("val", p.num_target_val)):
        for city in TARGET_CITIES[split]:
            dirs += [root / "target" / "leftImg8bit" / split / city, root / "target" / "gtFine" / split / city]
    if p.synthia:
        dirs += [root / "source_synthia" / "RGB", root / "source_synthia" / "GT" / "LABELS"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    names = [_src_name(i, n_src) for i in range(n_src)]
    (root / "source" / "train.txt").write_text("".join(n + "\n" for n in names[:p.num_source]))
    (root / "source" / "val.txt").write_text("".join(n + "\n" for n in names[p.num_source:]))
    if p.synthia:
        snames = [_synthia_name(i, n_src) for i in range(n_src)]
        (root / "source_synthia" / "train.txt").write_text("".join(n + "\n" for n in snames[:p.num_source]))
        (root / "source_synthia" / "val.txt").write_text("".join(n + "\n" for n in snames[p.num_source:]))

    jobs = _jobs(p)
    pdict = p.identity()
    workers = max(1, min(int(p.workers), len(jobs)))
    nchunks = max(1, min(len(jobs), workers * 8))
    chunks = [jobs[k::nchunks] for k in range(nchunks)]
    counts = {"source": np.zeros(NUM_CLASSES, np.int64), "target_train": np.zeros(NUM_CLASSES, np.int64),
              "target_val": np.zeros(NUM_CLASSES, np.int64)}
    args = [(str(root), pdict, ch) for ch in chunks]
    def collect(results):
        from tqdm import tqdm

        # disable=None: a bar on terminals only
        for res in tqdm(results, total=len(args), desc="synthetic benchmark", unit="chunk", disable=None):
            for domain, cnt in res:
                counts[domain] += cnt

    if workers == 1:
        collect(map(_work, args))
    else:
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:  # terminates the workers on errors
            collect(pool.imap_unordered(_work, args))
    return {k: [int(x) for x in v] for k, v in counts.items()}


def _marker(p: SynthParams, class_pixels: dict) -> dict:
    return {
        "format": "segadapt-synthetic",
        "format_version": FORMAT_VERSION,
        "params": p.identity(),
        "layouts": {
            "source": "gta5",
            "target": "cityscapes",
            "source_synthia": "synthia" if p.synthia else None,
        },
        "target_cities": {k: list(v) for k, v in TARGET_CITIES.items()},
        "class_names": list(CLASS_NAMES),
        "class_pixels": class_pixels,
    }


def read_marker(out_dir: Union[str, Path]) -> Optional[dict]:
    path = Path(out_dir) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable synthetic-data marker ({e}); remove {out_dir} and generate again")


def generate(out_dir: Union[str, Path], params: Optional[SynthParams] = None) -> Path:
    """Generates the benchmark into ``out_dir`` (which must not exist or be empty).

    Files are written to ``<out>.tmp-<pid>`` and the folder is renamed into place
    once the marker (written last) is there.
    """
    p = (params or SynthParams()).validate()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} already exists and is not empty: remove it or choose another --out")
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        class_pixels = _write_all(tmp, p)
        (tmp / MARKER_NAME).write_text(json.dumps(_marker(p, class_pixels), indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as e:  # a full disk met by a writer that names no file (PIL's close): name the output
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _param_diff(old: dict, new: dict) -> List[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k == "workers":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            same = list(a) == list(b)
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            diffs.append(f"{k}: {a!r} on disk vs {b!r} requested")
    return diffs


def check_marker(out_dir: Union[str, Path], params: SynthParams) -> bool:
    """True if ``out_dir`` holds a complete benchmark generated with ``params``.

    False when there is no marker; DatasetError when the marker disagrees.
    """
    out = Path(out_dir)
    m = read_marker(out)
    if m is None:
        return False
    if m.get("format") != "segadapt-synthetic" or m.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{out} holds synthetic data of format version {m.get('format_version')!r}, this version writes "
            f"{FORMAT_VERSION}: remove the folder or choose another --out")
    diffs = _param_diff(m.get("params", {}), params.identity())
    if diffs:
        raise DatasetError(
            f"{out} was generated with different synthetic parameters ({'; '.join(diffs)}): "
            f"remove the folder, choose another --out, or use the parameters on disk")
    return True


def ensure_synthetic(out_dir: Union[str, Path], params: Optional[SynthParams] = None) -> Path:
    """Returns ``out_dir``, generating the benchmark first if it is not there yet."""
    p = (params or SynthParams()).validate()
    out = Path(out_dir)
    if check_marker(out, p):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(
            f"{out} exists but holds no complete synthetic benchmark (no {MARKER_NAME}; an interrupted "
            f"generation?): remove it or choose another --out")
    try:
        return generate(out, p)
    except DatasetError:
        # another process may have finished the same folder meanwhile
        if check_marker(out, p):
            return out
        raise
    except OSError:
        if check_marker(out, p):
            return out
        raise


# ============================================================================ command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segadapt.data.synthetic",
                                 description="Generate the built-in synthetic GTA5/Cityscapes-layout benchmark.")
    d = SynthParams()
    ap.add_argument("--out", default="data/synthetic")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--size", type=int, nargs=2, default=list(d.size), metavar=("W", "H"))
    ap.add_argument("--num-source", type=int, default=d.num_source)
    ap.add_argument("--num-source-val", type=int, default=d.num_source_val)
    ap.add_argument("--num-target-train", type=int, default=d.num_target_train)
    ap.add_argument("--num-target-val", type=int, default=d.num_target_val)
    ap.add_argument("--gap", type=float, default=d.gap)
    ap.add_argument("--synthia", action="store_true")
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--condition", default=None, choices=("none", "fog", "night", "rain"))
    a = ap.parse_args(argv)
    p = SynthParams(seed=a.seed, size=tuple(a.size), num_source=a.num_source, num_source_val=a.num_source_val,
                    num_target_train=a.num_target_train, num_target_val=a.num_target_val, gap=a.gap,
                    synthia=a.synthia, workers=a.workers, condition=a.condition)
    try:
        out = ensure_synthetic(a.out, p)
    except (DatasetError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
