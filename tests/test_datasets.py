import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.data import io
from segadapt.data.datasets import build_dataset
from segadapt.data.labels import cityscapes_lut, map_labels
from segadapt.errors import ConfigError, DatasetError

from .conftest import CITYSCAPES_SAMPLE

SAMPLE = CITYSCAPES_SAMPLE  # the real frame
FRAME = "frankfurt/frankfurt_000000_000294"


# ----------------------------------------------------------------------------- helpers


def encode_png(arr, filters=(0,), interlace=0) -> bytes:
    """Minimal PNG writer (8/16-bit grey, GA, RGB, RGBA), one filter type per row, cycling."""
    arr = np.asarray(arr)
    depth = 16 if arr.dtype == np.uint16 else 8
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    h, w = arr.shape[:2]
    bpp = ch * depth // 8
    raw = np.ascontiguousarray(arr.astype(">u2" if depth == 16 else np.uint8))
    raw = raw.reshape(h, -1).view(np.uint8).reshape(h, w * bpp).astype(np.int64)
    body = bytearray()
    prev = np.zeros(w * bpp, np.int64)
    for y in range(h):
        ft = filters[y % len(filters)]
        cur = raw[y]
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if ft == 0:
            f = cur
        elif ft == 1:
            f = cur - left
        elif ft == 2:
            f = cur - prev
        elif ft == 3:
            f = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            f = cur - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        body.append(ft)
        body += (f % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(body)))
            + chunk(b"IEND", b""))


def save(path: Path, arr, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr)
    if arr.dtype == np.uint16 or kw:
        path.write_bytes(encode_png(arr, **kw))
    else:
        Image.fromarray(arr).save(path)
    return path


def cfg(kind, root, **kw):
    base = dict(kind=kind, root=str(root), split="train", list_file=None, resize=None, crop=None,
                flip=False, labels=True, keep_label_size=False, size_mismatch="error")
    base.update(kw)
    return SimpleNamespace(**base)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GTA_RAW = np.array([[7, 8, 11, 0], [26, 33, 24, 3], [23, 21, 17, 32]], dtype=np.uint8)
GTA_TRAIN = np.array([[0, 1, 2, 255], [13, 18, 11, 255], [10, 8, 5, 17]], dtype=np.uint8)


def make_gta(root: Path, n=2):
    for k in range(n):
        save(root / "images" / f"{k:05d}.png", rgb(3, 4, k))
        save(root / "labels" / f"{k:05d}.png", GTA_RAW)
    return root


# ----------------------------------------------------------------------------- PNG reading


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 2), (5, 7, 3), (5, 7, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_decode_png_all_filters_and_colour_types(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=np.int64).astype(dtype)
    out = io.decode_png(encode_png(arr, filters=(0, 1, 2, 3, 4)))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("ft", [0, 1, 2, 3, 4])
def test_decoder_and_writer_agree_with_pillow(ft, tmp_path):
    rng = np.random.default_rng(ft)
    # independent decoder: Pillow reads 8-bit RGBA and 16-bit grey exactly
    rgba = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    p = save(tmp_path / "a.png", rgba, filters=(ft,))
    np.testing.assert_array_equal(np.asarray(Image.open(p)), rgba)
    np.testing.assert_array_equal(io.decode_png(p), rgba)
    grey = rng.integers(0, 65536, (4, 6), dtype=np.int64).astype(np.uint16)
    p = save(tmp_path / "g.png", grey, filters=(ft,))
    np.testing.assert_array_equal(np.asarray(Image.open(p)).astype(np.uint16), grey)
    # 16-bit RGB: Pillow keeps only the high byte of each sample
    col = rng.integers(0, 65536, (4, 6, 3), dtype=np.int64).astype(np.uint16)
    p = save(tmp_path / "c.png", col, filters=(ft,))
    pil = np.asarray(Image.open(p))
    assert pil.dtype == np.uint8
    np.testing.assert_array_equal(pil, (col >> 8).astype(np.uint8))
    np.testing.assert_array_equal(io.decode_png(p), col)
    np.testing.assert_array_equal(io._pillow_16bit_colour(p), col)
    np.testing.assert_array_equal(io.read_synthia_label(p), col[:, :, 0])


def test_synthia_label_ids_survive_16bit(tmp_path):
    lab = np.zeros((3, 4, 4), np.uint16)
    lab[..., 0] = [[3, 4, 2, 21], [10, 8, 0, 22], [19, 12, 11, 1]]
    lab[..., 1] = 1000  # instance ids > 255 in the second channel
    lab[..., 3] = 65535
    p = save(tmp_path / "l.png", lab, filters=(4, 3))
    assert (np.asarray(Image.open(p))[..., 0] == 0).all()  # what Pillow alone gives
    out = io.read_synthia_label(p)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, lab[..., 0])


def test_interlaced_and_corrupt_pngs_raise(tmp_path):
    img = np.zeros((2, 2, 3), np.uint16)
    p = tmp_path / "inter.png"
    p.write_bytes(encode_png(img, interlace=1))
    with pytest.raises(DatasetError, match=r"inter\.png.*interlaced"):
        io.read_synthia_label(p)
    with pytest.raises(DatasetError, match="interlaced"):
        io.decode_png(p)
    good = encode_png(np.arange(60, dtype=np.uint16).reshape(4, 5, 3))
    t = tmp_path / "trunc.png"
    t.write_bytes(good[: len(good) - 20])  # IEND and the zlib checksum lost
    with pytest.raises(DatasetError, match=r"cannot read image .*trunc\.png: truncated"):
        io.decode_png(t)
    t.write_bytes(good[: len(good) // 2])
    for reader in (io.read_synthia_label, io.read_image, io.read_label):
        with pytest.raises(DatasetError, match=r"cannot read image .*trunc\.png"):
            reader(t)
    bad = bytearray(good)
    bad[40] ^= 0xFF  # inside IDAT: CRC check fails
    c = tmp_path / "crc.png"
    c.write_bytes(bytes(bad))
    with pytest.raises(DatasetError, match=r"crc\.png.*CRC"):
        io.decode_png(c)
    g = tmp_path / "garbage.png"
    g.write_bytes(b"this is not an image at all")
    for reader in (io.read_image, io.read_label, io.read_synthia_label):
        with pytest.raises(DatasetError, match=r"^cannot read image .*garbage\.png: "):
            reader(g)
    with pytest.raises(DatasetError, match="missing.png"):
        io.read_image(tmp_path / "missing.png")


def test_read_image_converts_modes(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = io.read_image(tmp_path / "g.png")
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], grey)
    rgba = np.dstack([rgb(2, 2), np.full((2, 2), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.png"), rgba[..., :3])
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.png"), [[[10, 20, 30], [40, 50, 60]]])


def test_read_label_palette_rgb_and_write_png(tmp_path):
    pal = Image.fromarray(np.array([[7, 26]], np.uint8), "P")
    pal.putpalette([i % 256 for i in range(768)])
    pal.save(tmp_path / "p.png")  # GTA5 labels are palette PNGs: the index is the id
    np.testing.assert_array_equal(io.read_label(tmp_path / "p.png"), [[7, 26]])
    same = np.dstack([np.array([[7, 26]], np.uint8)] * 3)
    io.write_png(tmp_path / "deep" / "er" / "s.png", same)
    np.testing.assert_array_equal(io.read_label(tmp_path / "deep" / "er" / "s.png"), [[7, 26]])
    io.write_png(tmp_path / "c.png", np.array([[[128, 64, 128]]], np.uint8))
    with pytest.raises(DatasetError, match=r"c\.png.*colour"):
        io.read_label(tmp_path / "c.png")
    with pytest.raises(ValueError):
        io.write_png(tmp_path / "x.png", np.zeros((2, 2), np.float32))


# ----------------------------------------------------------------------------- Cityscapes


def test_cityscapes_real_sample():
    ds = build_dataset(cfg("cityscapes", SAMPLE, split="val"))
    assert len(ds) == 1 and ds.names == [FRAME]
    img, lab = ds.samples[0]
    assert img.name == "frankfurt_000000_000294_leftImg8bit.png"
    assert lab.name == "frankfurt_000000_000294_gtFine_labelIds.png"
    train = ds.load_label_train_ids(0)
    ref = io.read_label(SAMPLE / "gtFine/val" / (FRAME + "_gtFine_labelTrainIds.png"))
    assert train.shape == ref.shape == (128, 256)
    # The two published files were downscaled separately (nearest), so they disagree on a
    # few class-boundary pixels (77 of 32768). Away from boundaries the mapping is exact.
    h, w = ref.shape
    padded = np.pad(ref, 1, mode="edge")
    interior = np.ones_like(ref, bool)
    for dy in range(3):
        for dx in range(3):
            interior &= padded[dy:dy + h, dx:dx + w] == ref
    assert interior.sum() > 0.8 * ref.size
    np.testing.assert_array_equal(train[interior], ref[interior])
    assert (train != ref).sum() <= 80
    assert set(np.unique(train)) == set(np.unique(ref))
    item = ds[0]
    assert item["image"].shape == (3, 128, 256) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), train)
    assert item["name"] == FRAME and item["index"] == 0


def test_cityscapes_train_ids_fallback_list_file_and_unlabelled(tmp_path):
    root = tmp_path / "cs"
    for city, name in [("b", "b_000001_000019"), ("a", "a_000000_000019")]:
        save(root / "leftImg8bit/val" / city / f"{name}_leftImg8bit.png", rgb(2, 3))
        save(root / "gtFine/val" / city / f"{name}_gtFine_labelTrainIds.png",
             np.array([[0, 18, 255], [1, 2, 3]], np.uint8))
    ds = build_dataset(cfg("cityscapes", root, split="val"))
    assert ds.names == ["a/a_000000_000019", "b/b_000001_000019"]
    np.testing.assert_array_equal(ds.load_label_train_ids(1), [[0, 18, 255], [1, 2, 3]])
    (root / "val.txt").write_text("b/b_000001_000019_leftImg8bit.png\n\n")
    ds = build_dataset(cfg("cityscapes", root, split="val", list_file="val.txt"))
    assert ds.names == ["b/b_000001_000019"]
    # unlabelled target: no gtFine at all
    target = tmp_path / "target"
    save(target / "leftImg8bit/train/c/c_000000_000001_leftImg8bit.png", rgb(4, 6))
    ds = build_dataset(cfg("cityscapes", target, labels=False, resize=[3, 2]))
    item = ds[0]
    assert "label" not in item and item["image"].shape == (3, 2, 3)
    with pytest.raises(DatasetError, match=r"gtFine/train does not exist"):
        build_dataset(cfg("cityscapes", target))


# ----------------------------------------------------------------------------- GTA5 / SYNTHIA / folder


def test_gta5_layout_mapping_and_list_file(tmp_path):
    root = make_gta(tmp_path / "gta", n=3)
    ds = build_dataset(cfg("gta5", root))
    assert ds.names == ["00000.png", "00001.png", "00002.png"]
    np.testing.assert_array_equal(ds.load_label_train_ids(2), GTA_TRAIN)
    item = ds[1]
    np.testing.assert_array_equal(item["label"].numpy(), GTA_TRAIN)
    np.testing.assert_allclose(item["image"].numpy(), rgb(3, 4, 1).transpose(2, 0, 1) / 255.0, atol=1e-7)
    (root / "list.txt").write_text("00002.png\n00000\n")
    ds = build_dataset(cfg("gta5", root, list_file=str(root / "list.txt")))
    assert ds.names == ["00002.png", "00000.png"]
    with pytest.raises(ConfigError, match="list_file"):
        build_dataset(cfg("gta5", root, split="val"))


def test_synthia_layout_with_16bit_labels(tmp_path):
    root = tmp_path / "syn"
    raw = np.array([[3, 4, 2, 21], [0, 16, 22, 8]], np.uint16)
    lab = np.stack([raw, np.full_like(raw, 700), np.zeros_like(raw)], axis=2)
    save(root / "RGB/0000000.png", rgb(2, 4))
    save(root / "GT/LABELS/0000000.png", lab, filters=(4, 1))
    ds = build_dataset(cfg("synthia", root, split="all"))
    assert ds.names == ["0000000.png"]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), [[0, 1, 2, 3], [255, 255, 255, 13]])
    lab[0, 0, 0] = 23
    save(root / "GT/LABELS/0000000.png", lab)
    with pytest.raises(DatasetError, match=r"GT/LABELS/0000000\.png.*23"):
        ds[0]


def test_folder_dataset(tmp_path):
    root = tmp_path / "imgs"
    save(root / "b.png", rgb(2, 2))
    Image.fromarray(rgb(3, 2)).save(save(root / "sub" / "a.png", rgb(1, 1)).with_suffix(".JPG"))
    (root / "notes.txt").write_text("x")
    ds = build_dataset(cfg("folder", root, labels=False))
    assert ds.names == ["b.png", "sub/a.JPG", "sub/a.png"]
    item = ds[1]
    assert set(item) == {"image", "index", "name"} and item["image"].shape == (3, 3, 2)
    with pytest.raises(ConfigError, match="labels"):
        build_dataset(cfg("folder", root, labels=True))


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"root .*nowhere does not exist"):
        build_dataset(cfg("gta5", tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="valid kinds: gta5, cityscapes, synthia, folder"):
        build_dataset(cfg("kitti", tmp_path))
    root = make_gta(tmp_path / "gta", n=2)
    (root / "labels" / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"images/00001\.png has no label .*labels/00001\.png"):
        build_dataset(cfg("gta5", root))
    (root / "labels" / "00001.png").write_bytes(b"\x89PNG garbage bytes")
    ds = build_dataset(cfg("gta5", root))
    with pytest.raises(DatasetError, match=r"cannot read image .*labels/00001\.png"):
        ds[1]
    save(root / "labels" / "00001.png", np.array([[7, 200, 7, 7]] * 3, np.uint8))
    with pytest.raises(DatasetError, match=r"labels/00001\.png.*200"):
        ds[1]
    (root / "images" / "00000.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*images/00000\.png"):
        ds[0]
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        build_dataset(cfg("gta5", empty))


def test_size_mismatch_policies(tmp_path):
    root = make_gta(tmp_path / "gta", n=2)
    small = np.array([[7, 8], [26, 0]], np.uint8)  # 2x2 label for a 4x3 image
    save(root / "labels" / "00001.png", small)
    ds = build_dataset(cfg("gta5", root, size_mismatch="error"))
    with pytest.raises(DatasetError, match=r"labels/00001\.png is 2x2 but image .*00001\.png is 4x3"):
        ds[1]
    ds = build_dataset(cfg("gta5", root, size_mismatch="resize"))
    with pytest.warns(UserWarning, match=r"labels/00001\.png"):
        item = ds[1]
    np.testing.assert_array_equal(item["label"].numpy(), [[0, 0, 1, 1], [13, 13, 255, 255], [13, 13, 255, 255]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1]  # warned once per file only
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        ds = build_dataset(cfg("gta5", root, size_mismatch="skip"))
    assert ds.names == ["00000.png"]
    with pytest.raises(ConfigError, match="size_mismatch"):
        build_dataset(cfg("gta5", root, size_mismatch="ignore"))


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_deterministic_per_seed(tmp_path):
    root = tmp_path / "gta"
    lab = np.tile(np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24], np.uint8), (8, 1))
    train = map_labels(lab, cityscapes_lut())
    img = np.dstack([train * 10] * 3).astype(np.uint8)  # image encodes its label
    save(root / "images/00000.png", img)
    save(root / "labels/00000.png", lab)
    ds = build_dataset(cfg("gta5", root, crop=[5, 4], flip=True))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    outs = [ds[(0, s)] for s in range(10)]
    for o in outs:
        assert o["image"].shape == (3, 4, 5) and o["label"].shape == (4, 5)
        assert torch.equal((o["image"][0] * 255).round().long(), o["label"] * 10)
    assert len({o["label"].numpy().tobytes() for o in outs}) > 1
    # an int key: no augmentation
    plain = ds[0]
    assert plain["image"].shape == (3, 8, 12)
    np.testing.assert_array_equal(plain["label"].numpy(), train)
    # resize then crop; keep_label_size keeps the label at full size
    ds = build_dataset(cfg("gta5", root, resize=[6, 4], keep_label_size=True))
    item = ds[0]
    assert item["image"].shape == (3, 4, 6) and item["label"].shape == (8, 12)
    with pytest.raises(ConfigError):
        build_dataset(cfg("gta5", root, crop=[2, 2], keep_label_size=True))


def test_decoded_cache_reads_each_file_once_and_changes_no_sample(tmp_path, monkeypatch):
    root = tmp_path / "gta"
    lab = np.tile(np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24], np.uint8), (8, 1))
    for k in range(3):
        save(root / f"images/{k:05d}.png", rgb(8, 12, k))
        save(root / f"labels/{k:05d}.png", np.roll(lab, k, axis=1))
    plain = build_dataset(cfg("gta5", root, crop=[5, 4], flip=True, resize=[10, 6], cat_max_ratio=0.75))
    cached = build_dataset(cfg("gta5", root, crop=[5, 4], flip=True, resize=[10, 6], cat_max_ratio=0.75, cache=True))
    reads = []
    real_read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda p: reads.append(p) or real_read(p))
    keys = [(k % 3, seed) for seed in range(4) for k in range(3)] + [1, (2, 7, 1, 2)]
    for key in keys:
        a, b = plain[key], cached[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]), key
    assert len(reads) == len(keys) + 3  # the plain dataset reads every time, the cached one once per sample
    image, label = cached._cache[0]
    assert not image.flags.writeable and not label.flags.writeable  # a transform writing into it would raise
