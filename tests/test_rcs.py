import json
import math
import tempfile

import numpy as np
import pytest
import torch

from segadapt.config import DatasetConfig
from segadapt.data import rcs
from segadapt.data.datasets import build_dataset
from segadapt.data.io import write_png
from segadapt.data.rcs import (
    RareClassPlan,
    RareClassSampler,
    dataset_class_counts,
    label_class_counts,
    rcs_class_probs,
)
from segadapt.data.sampling import DataStream
from segadapt.errors import ConfigError, DatasetError

CAR_ID, ROAD_ID, SKY_ID = 26, 7, 23  # GTA5 / Cityscapes label ids -> train ids 13, 0, 10


def test_label_class_counts():
    lab = np.array([[0, 0, 13, 255], [18, 13, 13, 0]], dtype=np.uint8)
    counts = label_class_counts(lab)
    assert counts.shape == (19,) and counts.sum() == 7  # 255 not counted
    assert (counts[0], counts[13], counts[18]) == (3, 3, 1)


def test_rcs_probabilities_exact_softmax():
    pixels = np.array([600, 300, 100, 0])
    f = [0.6, 0.3, 0.1]
    z = [math.exp((1 - fi) / 0.1) for fi in f]
    np.testing.assert_allclose(rcs_class_probs(pixels, 0.1), [z[0] / sum(z), z[1] / sum(z), z[2] / sum(z), 0.0],
                               rtol=1e-12)
    # T = 0.01: the rarest class dominates; exp(-20) of the next one
    p = rcs_class_probs(pixels, 0.01)
    e20, e50 = math.exp(-20), math.exp(-50)
    np.testing.assert_allclose(p, [e50 / (1 + e20 + e50), e20 / (1 + e20 + e50), 1 / (1 + e20 + e50), 0.0],
                               rtol=1e-12)
    # an ineligible class (no image with enough pixels) is dropped, frequencies unchanged
    q = rcs_class_probs(pixels, 0.1, eligible=np.array([True, True, False, True]))
    np.testing.assert_allclose(q[:2], [z[0] / (z[0] + z[1]), z[1] / (z[0] + z[1])], rtol=1e-12)
    assert q[2] == 0 and q[3] == 0


def test_plan_images_per_class():
    counts = np.array([
        [5000, 0, 2999],
        [10, 3000, 0],
        [4000, 3500, 100],
    ])
    plan = RareClassPlan(counts, temperature=0.01, min_pixels=3000)
    # strictly more than 3000 (the reference's `pixels > rcs_min_pixels`): image 1's 3000 is not enough
    assert plan.images_per_class == [[0, 2], [2], []]
    assert plan.probs[2] == 0 and plan.probs[:2].sum() == pytest.approx(1.0)
    kw = plan.sampler_kwargs(min_crop_pixels=1500, crop_attempts=10)
    assert kw["classes"] == [0, 1] and kw["images"] == [[0, 2], [2]]
    with pytest.raises(ConfigError, match="rcs.min_pixels=6000.*largest count is 5000"):
        RareClassPlan(counts, min_pixels=6000)


def _sampler(seed=11, **kw):
    return RareClassSampler(6, seed, classes=[0, 5, 13], probs=[0.2, 0.3, 0.5], images=[[0, 1], [2], [3, 4, 5]],
                            min_crop_pixels=7, crop_attempts=10, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_determinism_resume_and_ranks():
    a = _take(iter(_sampler()), 40)
    assert a == _take(iter(_sampler()), 40)
    assert a != _take(iter(_sampler(seed=12)), 40)
    assert _take(iter(_sampler(start=25)), 15) == a[25:]  # resumed at draw 25
    r0 = _take(iter(_sampler(rank=0, world_size=2)), 10)
    r1 = _take(iter(_sampler(rank=1, world_size=2, start=3)), 5)
    assert r0 == a[0:20:2] and r1 == a[7:17:2]
    images = {0: {0, 1}, 5: {2}, 13: {3, 4, 5}}
    for index, seed, cls, min_pixels, attempts in a:
        assert index in images[cls] and (min_pixels, attempts) == (7, 10)
    # classes follow their probabilities
    draws = _take(iter(_sampler()), 3000)
    freq = np.bincount([d[2] for d in draws], minlength=14)[[0, 5, 13]] / 3000
    assert np.abs(freq - [0.2, 0.3, 0.5]).max() < 0.04


class _KeyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, key):
        index, seed, cls = key[:3]
        return {"index": index, "seed": torch.tensor(seed % 1000003), "cls": cls}


def test_data_stream_with_rare_class_sampler_resumes_exactly():
    kw = dict(classes=[0, 5, 13], probs=[0.2, 0.3, 0.5], images=[[0, 1], [2], [3, 4, 5]], min_crop_pixels=7)
    a = DataStream(_KeyDataset(), 2, seed=3, sampler_cls=RareClassSampler, sampler_kwargs=kw)
    batches = [next(a) for _ in range(5)]
    b = DataStream(_KeyDataset(), 2, seed=3, sampler_cls=RareClassSampler, sampler_kwargs=kw)
    b.load_state_dict({"batches_consumed": 2})
    for ref in batches[2:]:
        got = next(b)
        assert all(torch.equal(ref[k], got[k]) for k in ref)


# --------------------------------------------------------------------------- class-aware crops
def _gta(root, labels):
    """GTA5 layout; image pixel (y, x) = (x, y, 0) so a crop's position can be read back."""
    for i, lab in enumerate(labels):
        h, w = lab.shape
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = np.arange(w)[None, :]
        img[..., 1] = np.arange(h)[:, None]
        write_png(root / "images" / f"{i:05d}.png", img)
        write_png(root / "labels" / f"{i:05d}.png", lab.astype(np.uint8))
    return root


def _car_corner_label():
    lab = np.full((32, 64), ROAD_ID, np.uint8)
    lab[:12, 48:] = CAR_ID  # 192 car pixels in the top-right corner: 17% of 16x16 crops hold >= 20
    return lab


def test_crop_redraws_until_the_class_is_in(tmp_path):
    root = _gta(tmp_path / "gta", [_car_corner_label()])
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all", crop=[16, 16]))
    train_lab = ds.load_label_train_ids(0)
    hits_one = hits_ten = 0
    for seed in range(30):
        # attempts = 0 (no re-draw) is the plain random crop, draw for draw
        plain, one = ds[(0, seed)], ds[(0, seed, 13, 20, 0)]
        assert torch.equal(plain["image"], one["image"]) and torch.equal(plain["label"], one["label"])
        out = ds[(0, seed, 13, 20, 10)]
        # expected (DAFormer): a crop, then up to 10 re-draws while it holds <= 20 car pixels (11 at most)
        rng = np.random.default_rng(seed)
        for _ in range(11):
            top, left = int(rng.integers(0, 32 - 16 + 1)), int(rng.integers(0, 64 - 16 + 1))
            if (train_lab[top:top + 16, left:left + 16] == 13).sum() > 20:
                break
        got_left, got_top = (round(v * 255) for v in out["image"][:2, 0, 0].tolist())
        assert (got_top, got_left) == (top, left), seed
        assert torch.equal(out["label"], torch.from_numpy(train_lab[top:top + 16, left:left + 16].astype(np.int64)))
        hits_one += int((one["label"] == 13).sum() > 20)
        hits_ten += int((out["label"] == 13).sum() > 20)
    assert hits_ten >= 20 and hits_ten > 2 * hits_one  # expected 85% vs 17% of the seeds


def test_cat_max_ratio_crop_is_mmseg_random_crop(tmp_path):
    """cat_max_ratio 0.75: up to 10 checked windows, re-drawn while one class covers >= 75% of the
    labelled pixels or the window holds one class; the 11th window is kept unchecked."""
    lab = np.full((32, 64), ROAD_ID, np.uint8)
    lab[:12, 48:] = CAR_ID
    lab[20:, :8] = 0  # unlabelled (ignore) pixels do not count
    root = _gta(tmp_path / "gta", [lab])
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all", crop=[16, 16], cat_max_ratio=0.75))
    plain = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all", crop=[16, 16]))
    train_lab = ds.load_label_train_ids(0)
    redrawn = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        for k in range(11):
            top, left = int(rng.integers(0, 17)), int(rng.integers(0, 49))
            window = train_lab[top:top + 16, left:left + 16]
            valid = window[window != 255]
            counts = np.bincount(valid, minlength=19)
            if k < 10 and (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75:
                break
        redrawn += k > 0
        out = ds[(0, seed)]
        got_left, got_top = (round(v * 255) for v in out["image"][:2, 0, 0].tolist())
        assert (got_top, got_left) == (top, left), seed
        assert torch.equal(out["label"], torch.from_numpy(window.astype(np.int64)))
    assert redrawn > 20  # most first windows are all road here
    with pytest.raises(ConfigError, match="cat_max_ratio"):
        build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all", crop=[16, 16], cat_max_ratio=0.0))
    # unset (1.0): the first window, unchecked
    for seed in range(5):
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(0, 17)), int(rng.integers(0, 49))
        got_left, got_top = (round(v * 255) for v in plain[(0, seed)]["image"][:2, 0, 0].tolist())
        assert (got_top, got_left) == (top, left)


def test_class_counts_cache(tmp_path, monkeypatch):
    lab_a = _car_corner_label()
    lab_b = np.full((32, 64), SKY_ID, np.uint8)
    root = _gta(tmp_path / "gta", [lab_a, lab_b])
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all"))
    counts = dataset_class_counts(ds)
    assert counts.shape == (2, 19)
    assert (counts[0, 13], counts[0, 0], counts[1, 10]) == (192, 32 * 64 - 192, 32 * 64)
    cache = root / "segadapt_class_stats.json"
    data = json.loads(cache.read_text())
    assert data["images"]["labels/00000.png"]["counts"] == {"0": 1856, "13": 192}

    # current entries are read, not recomputed
    def no_compute(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(rcs, "compute_class_counts", no_compute)
    assert np.array_equal(dataset_class_counts(build_dataset(ds.cfg)), counts)
    monkeypatch.undo()

    # a changed label file (another byte size) is counted again
    lab_b[:, :10] = CAR_ID
    write_png(root / "labels" / "00001.png", lab_b)
    counts2 = dataset_class_counts(build_dataset(ds.cfg))
    assert counts2[1, 13] == 320 and counts2[1, 10] == 32 * 54 and np.array_equal(counts2[0], counts[0])


def test_unwritable_cache_is_named_with_a_remedy(tmp_path, monkeypatch):
    root = _gta(tmp_path / "gta", [_car_corner_label()])
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all"))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(DatasetError) as e:
        dataset_class_counts(ds)
    msg = str(e.value)
    assert str(root / "segadapt_class_stats.json") in msg and "segadapt prepare" in msg and "rcs.stats" in msg
    assert "\n" not in msg


def test_building_the_cache_leaves_the_global_rng_alone(tmp_path):
    """A fresh run draws the same augmentations whether the class statistics were cached or not."""
    root = _gta(tmp_path / "gta", [_car_corner_label()])
    ds = build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all"))
    torch.manual_seed(0)
    dataset_class_counts(ds)  # computed and cached
    after_build = torch.rand(3)
    torch.manual_seed(0)
    dataset_class_counts(ds)  # read from the cache
    assert torch.equal(torch.rand(3), after_build)
