import json

import numpy as np

from segadapt.cli import main
from segadapt.config import DatasetConfig
from segadapt.data.datasets import build_dataset
from segadapt.data.io import write_png
from segadapt.data.rcs import STATS_FILE, dataset_class_counts

ROAD, CAR = 7, 26  # label ids -> train ids 0, 13


def _img(h, w):
    return np.full((h, w, 3), 100, np.uint8)


def _label(h, w, car_cols=0):
    lab = np.full((h, w), ROAD, np.uint8)
    lab[:, :car_cols] = CAR
    return lab


def _prepare(*args):
    return main(["prepare", "--workers", "0", "--no-progress", *map(str, args)])


def test_check_names_every_problem_and_exits_2(tmp_path, capsys):
    root = tmp_path / "gta"
    for i in range(4):
        write_png(root / "images" / f"{i:05d}.png", _img(8, 16))
    write_png(root / "labels" / "00000.png", _label(8, 16, 3))
    # 00001: no label
    write_png(root / "labels" / "00002.png", _label(4, 8))  # half the image size
    bad = _label(8, 16)
    bad[0, 0] = 40  # no such GTA5 / Cityscapes label id
    write_png(root / "labels" / "00003.png", bad)
    write_png(root / "labels" / "00009.png", _label(8, 16))  # no image

    assert _prepare("--kind", "gta5", "--root", root, "--check") == 2
    out = capsys.readouterr().out
    assert "4 images, 3 with a label" in out and "problems: 4" in out
    assert "image images/00001.png has no label labels/00001.png" in out
    assert "label labels/00009.png has no image images/00009.png" in out
    assert "label labels/00002.png is 8x4 but image images/00002.png is 16x8" in out
    assert "label labels/00003.png holds ids 40" in out
    assert "road" in out and "car" in out  # the histogram
    assert not (root / STATS_FILE).exists()  # --check writes nothing

    # without --check the same problems refuse to write a cache
    assert _prepare("--kind", "gta5", "--root", root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 problem(s)" in err[0] and err[0].endswith("class statistics not written")
    assert not (root / STATS_FILE).exists()


def test_clean_layout_writes_the_cache(tmp_path, capsys):
    root = tmp_path / "gta"
    for i, cars in enumerate((3, 0)):
        write_png(root / "images" / f"{i:05d}.png", _img(8, 16))
        write_png(root / "labels" / f"{i:05d}.png", _label(8, 16, cars))
    assert _prepare("--kind", "gta5", "--root", root, "--check") == 0
    assert "problems: none" in capsys.readouterr().out
    assert _prepare("--kind", "gta5", "--root", root) == 0
    assert str(root / STATS_FILE) in capsys.readouterr().out
    data = json.loads((root / STATS_FILE).read_text())
    assert data["images"] == {"labels/00000.png": {"bytes": (root / "labels/00000.png").stat().st_size,
                                                   "counts": {"0": 104, "13": 24}},
                              "labels/00001.png": {"bytes": (root / "labels/00001.png").stat().st_size,
                                                   "counts": {"0": 128}}}
    # rare class sampling reads it as it is
    counts = dataset_class_counts(build_dataset(DatasetConfig(kind="gta5", root=str(root), split="all")))
    assert counts[0, 13] == 24 and counts[1, 0] == 128

    # --out: elsewhere (read-only dataset roots)
    other = tmp_path / "stats" / "gta.json"
    assert _prepare("--kind", "gta5", "--root", root, "--out", other) == 0
    assert json.loads(other.read_text())["images"] == data["images"]


def test_cityscapes_layout(tiny_synth, capsys):
    assert _prepare("--kind", "cityscapes", "--root", tiny_synth / "target", "--split", "val", "--check") == 0
    assert "4 images, 4 with a label" in capsys.readouterr().out
