"""Reading and writing images and label maps.

Pillow decodes 16-bit-per-channel RGB(A) PNGs into its 8-bit "RGB"/"RGBA" modes
by keeping only the most significant byte of every sample, which destroys the
SYNTHIA class ids (small numbers stored in 16 bits).  :func:`read_synthia_label`
therefore reads 16-bit colour PNGs in one of three ways, fastest first:

1. ``cv2`` when it happens to be importable;
2. Pillow twice, once with its big-endian and once with its little-endian
   16-bit unpacker (the latter picks the low byte of each big-endian sample);
   the two bytes are recombined;
3. :func:`decode_png`, a small self-contained PNG decoder (zlib + numpy).

Every failure to read a file raises DatasetError("cannot read image <path>: <reason>").
Every write goes through ``segadapt.utils.files.atomic_write``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from segadapt.errors import DatasetError
from segadapt.utils.files import atomic_write

try:  # optional fast path, never required
    import cv2 as _cv2  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _cv2 = None

PathLike = Union[str, Path]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _fail(path: PathLike, reason) -> DatasetError:
    text = str(reason).replace("\n", " ").strip() or type(reason).__name__
    return DatasetError(f"cannot read image {path}: {text}")


# --------------------------------------------------------------------------- PNG header


class PngHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int


def read_png_header(path: PathLike) -> Optional[PngHeader]:
    """IHDR of a PNG file (reads 33 bytes), or None when the file is not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError as e:
        raise _fail(path, e) from None
    if not head.startswith(PNG_SIGNATURE):
        return None
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise _fail(path, "truncated or malformed PNG header")
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return PngHeader(w, h, depth, ctype, interlace)


def image_size(path: PathLike) -> tuple:
    """(W, H) of an image file without decoding its pixels."""
    hdr = read_png_header(path)
    if hdr is not None:
        return hdr.width, hdr.height
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise _fail(path, e) from None


# --------------------------------------------------------------------------- pure PNG decoder


def _paeth_row(cur: bytes, prior: bytes, bpp: int) -> bytearray:
    out = bytearray(cur)
    n = len(out)
    for i in range(n):
        a = out[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa = abs(p - a)
        pb = abs(p - b)
        pc = abs(p - c)
        if pa <= pb and pa <= pc:
            pred = a
        elif pb <= pc:
            pred = b
        else:
            pred = c
        out[i] = (out[i] + pred) & 0xFF
    return out


def _average_row(cur: bytes, prior: bytes, bpp: int) -> bytearray:
    out = bytearray(cur)
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        out[i] = (out[i] + ((a + prior[i]) >> 1)) & 0xFF
    return out


def _unfilter(data: np.ndarray, height: int, stride: int, bpp: int, path: PathLike) -> np.ndarray:
    rows = data.reshape(height, stride + 1)
    out = np.empty((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype = int(rows[y, 0])
        cur = rows[y, 1:]
        if ftype == 0:
            rec = cur
        elif ftype == 1:  # Sub: running sum (mod 256) over pixels, per byte position
            rec = np.cumsum(cur.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up
            rec = cur + prior
        elif ftype == 3:  # Average
            rec = np.frombuffer(_average_row(cur.tobytes(), prior.tobytes(), bpp), dtype=np.uint8)
        elif ftype == 4:  # Paeth
            rec = np.frombuffer(_paeth_row(cur.tobytes(), prior.tobytes(), bpp), dtype=np.uint8)
        else:
            raise _fail(path, f"invalid PNG filter type {ftype} in row {y}")
        out[y] = rec
        prior = out[y]
    return out


def decode_png(source: Union[PathLike, bytes], path: Optional[PathLike] = None) -> np.ndarray:
    """Decode a non-interlaced PNG of bit depth 8 or 16 without Pillow.

    Returns (H, W) for grey / palette (palette indices) images and (H, W, C) for
    grey+alpha, RGB and RGBA; dtype uint8 or uint16 following the bit depth.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        blob = bytes(source)
        name = path if path is not None else "<bytes>"
    else:
        name = path if path is not None else source
        try:
            with open(source, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise _fail(name, e) from None
    if not blob.startswith(PNG_SIGNATURE):
        raise _fail(name, "not a PNG file")
    pos = len(PNG_SIGNATURE)
    header = None
    idat = []
    ended = False
    while pos < len(blob):
        if pos + 8 > len(blob):
            raise _fail(name, "truncated PNG chunk header")
        length, ctype = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + length]
        crc_bytes = blob[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise _fail(name, f"truncated PNG chunk {ctype!r}")
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != struct.unpack(">I", crc_bytes)[0]:
            raise _fail(name, f"CRC mismatch in PNG chunk {ctype.decode('latin-1')}")
        pos += 12 + length
        if ctype == b"IHDR":
            if length != 13:
                raise _fail(name, "malformed IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            ended = True
            break
    if header is None:
        raise _fail(name, "PNG has no IHDR chunk")
    if not idat:
        raise _fail(name, "PNG has no image data (IDAT)")
    if not ended:
        raise _fail(name, "truncated PNG (no IEND chunk)")
    width, height, depth, color, comp, filt, interlace = header
    if width == 0 or height == 0:
        raise _fail(name, f"empty PNG ({width}x{height})")
    if color not in _CHANNELS:
        raise _fail(name, f"invalid PNG colour type {color}")
    if comp != 0 or filt != 0:
        raise _fail(name, "unknown PNG compression or filter method")
    if interlace != 0:
        raise _fail(name, "interlaced (Adam7) PNGs are not supported; re-save the file without interlacing")
    if depth not in (8, 16) or (color == 3 and depth != 8):
        raise _fail(name, f"PNG bit depth {depth} with colour type {color} is not supported")
    channels = _CHANNELS[color]
    bpp = channels * depth // 8
    stride = width * bpp
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise _fail(name, f"corrupt PNG data ({e})") from None
    if len(raw) < height * (stride + 1):
        raise _fail(name, "truncated PNG image data")
    data = np.frombuffer(raw, dtype=np.uint8, count=height * (stride + 1))
    pixels = _unfilter(data, height, stride, bpp, name)
    if depth == 16:
        pixels = pixels.view(">u2").astype(np.uint16)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape)


# --------------------------------------------------------------------------- Pillow helpers


def _open_loaded(path: PathLike) -> Image.Image:
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:
        if im is not None:
            im.close()
        raise _fail(path, e) from None


def _pillow_16bit_colour(path: PathLike) -> Optional[np.ndarray]:
    """Full 16-bit samples of a 16-bit colour PNG via Pillow, or None if unsupported.

    Pillow's own decode keeps the high byte of each big-endian sample; decoding
    again with the little-endian unpacker keeps the low byte.
    """
    try:
        with Image.open(path) as im:
            tile = list(im.tile)
            if len(tile) != 1:
                return None
            args = tile[0][3]
            if not (isinstance(args, str) and args.endswith(";16B")):
                return None
            im.load()
            high = np.asarray(im)
        with Image.open(path) as im:
            t = im.tile[0]
            new_args = args[:-4] + ";16L"
            if hasattr(t, "_replace"):
                im.tile = [t._replace(args=new_args)]
            else:
                im.tile = [(t[0], t[1], t[2], new_args)]
            im.load()
            low = np.asarray(im)
    except Exception:
        return None
    if high.dtype != np.uint8 or low.dtype != np.uint8 or high.shape != low.shape:
        return None
    return (high.astype(np.uint16) << 8) | low


# --------------------------------------------------------------------------- public readers


def read_image(path: PathLike) -> np.ndarray:
    """Image file -> (H, W, 3) uint8 RGB (grey, palette, alpha and 16-bit are converted)."""
    im = _open_loaded(path)
    try:
        if im.mode == "RGB":
            arr = np.asarray(im)
        elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
            a = np.asarray(im)
            if im.mode.startswith("I;16"):
                a = (a.astype(np.uint16) >> 8).astype(np.uint8)
            else:
                a = np.clip(a, 0, 255).astype(np.uint8)
            arr = np.repeat(a[:, :, None], 3, axis=2)
        else:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise _fail(path, e) from None
    finally:
        im.close()
    return np.ascontiguousarray(arr)


def read_label(path: PathLike) -> np.ndarray:
    """Label file -> (H, W) raw ids.

    8-bit grey and palette PNGs give their values / palette indices (uint8);
    16-bit grey gives uint16.  An RGB(A) label is accepted only when its colour
    channels are equal (a grey map saved as RGB): a colour-coded label
    (e.g. ``*_color.png``) cannot be read as ids and raises DatasetError.
    """
    im = _open_loaded(path)
    try:
        arr = np.asarray(im)
    except Exception as e:
        raise _fail(path, e) from None
    finally:
        im.close()
    if arr.ndim == 3:
        rgb = arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]
        if rgb.shape[2] == 3 and not (
            np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
        ):
            raise DatasetError(
                f"cannot read label {path}: it is a colour image, expected a single-channel map of label ids"
            )
        arr = rgb[:, :, 0]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_synthia_label(path: PathLike) -> np.ndarray:
    """SYNTHIA ``GT/LABELS`` PNG -> (H, W) uint16 class ids (the first channel)."""
    hdr = read_png_header(path)
    if hdr is None:
        raise _fail(path, "not a PNG file")
    if hdr.bit_depth == 16 and hdr.color_type in (2, 4, 6):
        if hdr.interlace != 0:
            raise _fail(path, "interlaced (Adam7) 16-bit PNGs are not supported; re-save without interlacing")
        if _cv2 is not None:
            arr = _cv2.imread(str(path), _cv2.IMREAD_UNCHANGED)
            if arr is not None and arr.dtype == np.uint16:
                # cv2 returns BGR(A); the first PNG channel (R, or grey for GA) is last of the colours
                if arr.ndim == 3:
                    first = 2 if arr.shape[2] >= 3 else 0
                    return np.ascontiguousarray(arr[:, :, first])
                return np.ascontiguousarray(arr)
        arr = _pillow_16bit_colour(path)
        if arr is None:
            arr = decode_png(path)
        return np.ascontiguousarray(arr[:, :, 0])
    if hdr.bit_depth < 8:
        raise _fail(path, f"PNG bit depth {hdr.bit_depth} is not supported for labels")
    lab = read_label(path) if hdr.color_type in (0, 3) else _first_channel_8bit(path)
    return lab.astype(np.uint16)


def _first_channel_8bit(path: PathLike) -> np.ndarray:
    im = _open_loaded(path)
    try:
        arr = np.asarray(im)
    except Exception as e:
        raise _fail(path, e) from None
    finally:
        im.close()
    return arr[:, :, 0] if arr.ndim == 3 else arr


def write_png(path: PathLike, array) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG (atomically), creating parent folders."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"write_png expects (H, W) or (H, W, 3), got shape {arr.shape}")
    with atomic_write(path) as f:
        Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")
