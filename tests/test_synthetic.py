"""The built-in synthetic benchmark: layouts, ids, determinism, marker, gap, SYNTHIA copy."""
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segadapt.data import synthetic as S
from segadapt.errors import ConfigError, DatasetError

SMALL = dict(size=(64, 32), num_source=4, num_source_val=2, num_target_train=3, num_target_val=2)
VALID_LABEL_IDS = {0, 1, 4} | set(S.TRAIN_TO_LABEL_ID)
SYNTHIA_IDS = {3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11}


def _img(path) -> Image.Image:
    """Opens, loads and closes an image file."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "bench"
    params = S.SynthParams(seed=3, synthia=True, **SMALL)
    assert S.generate(out, params) == out
    return out, params


def test_gta5_source_layout(small):
    out, p = small
    assert (out / "source" / "train.txt").read_text().split() == [f"{i:05d}.png" for i in range(1, 5)]
    assert (out / "source" / "val.txt").read_text().split() == ["00005.png", "00006.png"]
    names = sorted(x.name for x in (out / "source" / "images").iterdir())
    assert names == [f"{i:05d}.png" for i in range(1, 7)]
    assert sorted(x.name for x in (out / "source" / "labels").iterdir()) == names
    for n in names:
        im = _img(out / "source" / "images" / n)
        lab = _img(out / "source" / "labels" / n)
        assert im.mode == "RGB" and im.size == (64, 32)
        assert lab.mode == "L" and lab.size == (64, 32)


def test_cityscapes_target_layout(small):
    out, p = small
    pat = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")
    for split, n in (("train", 3), ("val", 2)):
        imgs = sorted((out / "target" / "leftImg8bit" / split).glob("*/*.png"))
        assert len(imgs) == n
        cities = {x.parent.name for x in imgs}
        assert cities <= set(S.TARGET_CITIES[split]) and len(cities) >= 1
        for x in imgs:
            m = pat.match(x.name)
            assert m and m.group(1) == x.parent.name
            stem = x.name[: -len("_leftImg8bit.png")]
            lab = out / "target" / "gtFine" / split / x.parent.name / f"{stem}_gtFine_labelIds.png"
            assert lab.is_file()
            assert _img(x).mode == "RGB" and _img(x).size == (64, 32)
            assert _img(lab).mode == "L" and _img(lab).size == (64, 32)
        assert [tuple(out / q for q in pair) for pair in S.target_files(p, split)] == [
            (x, out / "target" / "gtFine" / split / x.parent.name / x.name.replace(
                "_leftImg8bit.png", "_gtFine_labelIds.png")) for x in imgs]
    # the two splits use different cities
    assert not set(S.TARGET_CITIES["train"]) & set(S.TARGET_CITIES["val"])


def test_labels_are_cityscapes_label_ids(small):
    out, _ = small
    seen = set()
    for p in list((out / "source" / "labels").glob("*.png")) + list((out / "target" / "gtFine").rglob("*.png")):
        ids = set(np.unique(np.asarray(_img(p))).tolist())
        assert ids <= VALID_LABEL_IDS, (p, ids - VALID_LABEL_IDS)
        seen |= ids
    assert len(seen & set(S.TRAIN_TO_LABEL_ID)) >= 6


def test_labels_read_back_with_project_lut(small):
    labels = pytest.importorskip("segadapt.data.labels")
    out, _ = small
    lut = labels.cityscapes_lut()
    for p in (out / "source" / "labels").glob("*.png"):
        train = labels.map_labels(np.asarray(_img(p)), lut, p)
        assert set(np.unique(train).tolist()) <= set(range(19)) | {255}


def test_id_tables():
    lab = np.array([[0, 7, 9, 13], [18, 253, 254, 255]], np.uint8)
    assert S.to_label_ids(lab).tolist() == [[7, 20, 22, 26], [33, 4, 1, 0]]
    assert S.to_train_ids(lab).tolist() == [[0, 7, 9, 13], [18, 255, 255, 255]]
    assert S.to_synthia_ids(lab).tolist() == [[3, 9, 0, 8], [11, 0, 0, 0]]
    assert S.to_synthia_ids(np.array([14, 16], np.uint8)).tolist() == [0, 0]


def test_marker_written_last_with_params(small):
    out, p = small
    m = json.loads((out / S.MARKER_NAME).read_text())
    assert m["format_version"] == S.FORMAT_VERSION
    assert m["params"] == p.identity()
    assert "workers" not in m["params"]
    # the marker is the newest file of the folder
    newest = max((x for x in out.rglob("*") if x.is_file()), key=lambda x: x.stat().st_mtime_ns)
    assert newest.stat().st_mtime_ns == (out / S.MARKER_NAME).stat().st_mtime_ns
    assert not list(out.parent.glob("bench.tmp-*"))


def test_ensure_reuses_matching_folder(small):
    out, p = small
    before = (out / S.MARKER_NAME).stat().st_mtime_ns
    q = S.SynthParams(seed=3, synthia=True, workers=4, **SMALL)  # workers do not matter
    assert S.ensure_synthetic(out, q) == out
    assert (out / S.MARKER_NAME).stat().st_mtime_ns == before


def test_ensure_rejects_other_params(small):
    out, _ = small
    q = S.SynthParams(seed=4, synthia=True, **dict(SMALL, num_target_val=5))
    with pytest.raises(DatasetError) as e:
        S.ensure_synthetic(out, q)
    msg = str(e.value)
    assert str(out) in msg and "seed" in msg and "num_target_val" in msg and "size" not in msg


def test_ensure_rejects_nonempty_folder_without_marker(tmp_path):
    out = tmp_path / "half"
    (out / "source").mkdir(parents=True)
    (out / "source" / "00001.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="remove it or choose another --out"):
        S.ensure_synthetic(out, S.SynthParams(**SMALL))
    with pytest.raises(DatasetError, match="not empty"):
        S.generate(out, S.SynthParams(**SMALL))


def test_ensure_generates_into_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    p = S.SynthParams(**dict(SMALL, num_source=1, num_source_val=0, num_target_train=1, num_target_val=1))
    assert S.ensure_synthetic(out, p) == out
    assert (out / S.MARKER_NAME).is_file()
    assert (out / "source" / "val.txt").read_text() == ""


def test_deterministic_and_independent_of_workers(tmp_path):
    p1 = S.SynthParams(seed=7, workers=1, **SMALL)
    p2 = S.SynthParams(seed=7, workers=2, **SMALL)
    a = _files(S.generate(tmp_path / "a", p1))
    b = _files(S.generate(tmp_path / "b", p2))
    assert a.keys() == b.keys() and a == b
    c = _files(S.generate(tmp_path / "c", S.SynthParams(seed=8, **SMALL)))
    assert c.keys() == a.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing) >= len([k for k in a if k.endswith(".png")]) - 1


def test_each_image_depends_on_seed_domain_index_only():
    p = S.SynthParams(seed=1, size=(64, 32), num_source=10)
    q = S.SynthParams(seed=1, size=(64, 32), num_source=3, num_target_train=50)
    for dom in ("source", "target_train", "target_val"):
        x1, l1 = S.make_sample(p, dom, 2)
        x2, l2 = S.make_sample(q, dom, 2)
        assert np.array_equal(x1, x2) and np.array_equal(l1, l2)
    a, _ = S.make_sample(p, "target_train", 2)
    b, _ = S.make_sample(p, "target_val", 2)
    assert not np.array_equal(a, b)


def test_invalid_params():
    with pytest.raises(ConfigError):
        S.SynthParams(size=(8, 8)).validate()
    with pytest.raises(ConfigError):
        S.SynthParams(num_source=-1).validate()
    with pytest.raises(ConfigError):
        S.SynthParams(gap=-0.5).validate()
    assert S.SynthParams(size=[80, 40]).size == (80, 40)


def _samples(domain, n, size=(128, 64)):
    p = S.SynthParams(seed=11, size=size)
    return [S.make_sample(p, domain, i) for i in range(n)]


def test_class_frequencies_are_skewed():
    for domain in ("source", "target_train"):
        labs = [S.to_train_ids(lab) for _, lab in _samples(domain, 16)]
        fr = S.class_frequencies(labs)
        assert fr.shape == (19,) and abs(fr.sum() - 1) < 1e-9
        big = fr[[0, 2, 8, 10]].sum()
        assert big > 0.5, (domain, fr)
        things = fr[[6, 7, 11, 12, 13, 14, 15, 16, 17, 18]].sum()
        assert 0.005 < things < 0.2, (domain, fr)
        # the rarest classes appear in few images
        present = np.array([[np.any(lab == c) for c in range(19)] for lab in labs]).mean(0)
        assert present[[12, 16, 17]].min() < 0.5
        assert (present > 0).sum() >= 12


def test_target_layouts_differ_from_source():
    src = S.class_frequencies(S.to_train_ids(lab) for _, lab in _samples("source", 16))
    tgt = S.class_frequencies(S.to_train_ids(lab) for _, lab in _samples("target_train", 16))
    assert np.abs(src - tgt).sum() > 0.05
    # the ego-vehicle hood (label id 1) is a target-side feature
    hood = [np.mean(S.to_label_ids(lab) == 1) for _, lab in _samples("target_train", 16)]
    assert np.mean([h > 0 for h in hood]) > 0.2


def test_renderers_shift_class_conditional_colours():
    """Same label map, both renderers: classes shift differently, beyond any global colour map."""
    A, B, L = [], [], []
    for k in range(6):
        scene = S.sample_scene(np.random.default_rng(100 + k), (96, 48), "source")
        src = S.render(scene, np.random.default_rng(k), 0.0)
        tgt = S.render(scene, np.random.default_rng(k), 1.0)
        assert np.array_equal(src, S.render(scene, np.random.default_rng(k), 0.0))
        assert not np.array_equal(src, tgt)
        lab = scene.train_ids
        # textures and noise: the target is less flat inside the largest drawn part
        big = scene.inst == np.bincount(scene.inst.ravel()).argmax()
        assert tgt[big].std(0).mean() > src[big].std(0).mean() + 2
        A.append(src.reshape(-1, 3)), B.append(tgt.reshape(-1, 3)), L.append(lab.ravel())
    A, B, L = (np.concatenate(x).astype(np.float64) for x in (A, B, L))
    classes = [c for c in range(19) if (L == c).sum() > 300]
    assert len(classes) >= 6
    shift = np.array([(B[L == c] - A[L == c]).mean(0) for c in classes])
    # classes move differently, not by one global offset ...
    assert np.linalg.norm(shift - shift.mean(0), axis=1).max() > 20
    # ... and the best global affine colour map (3x3 matrix + offset, fitted on all
    # pixels) leaves class-conditional residuals
    X = np.concatenate([A, np.ones((len(A), 1))], 1)
    R = B - X @ np.linalg.lstsq(X, B, rcond=None)[0]
    resid = np.array([np.linalg.norm(R[L == c].mean(0)) for c in classes])
    assert resid.max() > 12 and (resid > 6).sum() >= 3, resid


def test_gap_zero_is_the_source_renderer():
    scene = S.sample_scene(np.random.default_rng(1), (64, 32), "target")
    a = S.render(scene, np.random.default_rng(2), 0.0)
    b = S.render_source(scene, np.random.default_rng(2))
    c = S.render_target(scene, np.random.default_rng(2), gap=0.0)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    # a larger gap moves the image further from the source rendering
    d = [np.abs(S.render(scene, np.random.default_rng(2), g).astype(float) - a).mean() for g in (0.5, 1.0, 1.5)]
    assert d[0] < d[1] < d[2]


def _decode_png16(data: bytes):
    """Minimal independent PNG decoder: returns (bit depth, colour type, array) for unfiltered rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype = hdr[:4]
    raw = zlib.decompress(idat)
    stride = 1 + w * 3 * depth // 8
    rows = [raw[i * stride:(i + 1) * stride] for i in range(h)]
    assert all(r[0] == 0 for r in rows)
    arr = np.array([np.frombuffer(r[1:], ">u2") for r in rows]).reshape(h, w, 3)
    return depth, ctype, arr


def test_synthia_copy(small):
    out, p = small
    rgb = sorted((out / "source_synthia" / "RGB").glob("*.png"))
    gt = sorted((out / "source_synthia" / "GT" / "LABELS").glob("*.png"))
    assert [x.name for x in rgb] == [f"{i:07d}.png" for i in range(6)] == [x.name for x in gt]
    to_train = {lid: t for t, lid in enumerate(S.TRAIN_TO_LABEL_ID)}
    for i, (r, g) in enumerate(zip(rgb, gt)):
        assert r.read_bytes() == (out / "source" / "images" / f"{i + 1:05d}.png").read_bytes()
        depth, ctype, arr = _decode_png16(g.read_bytes())
        assert depth == 16 and ctype == 2 and arr.shape == (32, 64, 3)
        assert not arr[..., 1:].any()
        ids = arr[..., 0]
        assert set(np.unique(ids).tolist()) <= SYNTHIA_IDS | {0}
        assert np.array_equal(S.read_png16(g)[..., 0], ids)
        # channel 0 agrees with the GTA5-layout label of the same image
        gta = np.asarray(_img(out / "source" / "labels" / f"{i + 1:05d}.png"))
        train = np.vectorize(lambda v: to_train.get(int(v), 255))(gta).astype(np.uint8)
        assert np.array_equal(S.to_synthia_ids(train), ids)


def test_png16_writer_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65535, size=(5, 7, 3)).astype(np.uint16)
    S.write_png16_rgb(tmp_path / "x.png", arr)
    depth, ctype, back = _decode_png16((tmp_path / "x.png").read_bytes())
    assert depth == 16 and ctype == 2 and np.array_equal(back, arr)
    assert np.array_equal(S.read_png16(tmp_path / "x.png"), arr)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--size", "64", "32", "--num-source", "2", "--num-source-val", "1",
            "--num-target-train", "2", "--num-target-val", "1"]
    assert S.main(args) == 0
    assert (out / S.MARKER_NAME).is_file()
    assert S.main(args) == 0
    assert S.main(args + ["--seed", "5"]) == 2
    assert "different synthetic parameters" in capsys.readouterr().err
