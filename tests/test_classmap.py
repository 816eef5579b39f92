"""Class maps: the YAML format, its mistakes (one line each), and a dataset of its own classes
through the whole path: kind `custom`, training, evaluation tables, test, predict, export."""
import json
import shutil
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.data.classmap import class_map_from_dict, cityscapes_classes, load_class_map
from segadapt.data.datasets import build_dataset
from segadapt.data.io import read_label
from segadapt.data.labels import cityscapes_lut
from segadapt.errors import ConfigError, DatasetError

from .conftest import tiny_overrides

# six coarse classes of the synthetic benchmark's 19: label ids 1..6 in the files, 0 = unlabelled
COARSE_OF_TRAIN_ID = {0: 1, 1: 1, 9: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 10: 5,
                      **{t: 6 for t in range(11, 19)}}
CLASS_MAP = {
    "names": ["flat", "construction", "object", "nature", "sky", "dynamic"],
    "ids": {1: "flat", 2: "construction", 3: 2, 4: "nature", 5: "sky", 6: "dynamic"},
    "ignore": [0],
    "palette": [[128, 64, 128], [70, 70, 70], [250, 170, 30], [107, 142, 35], [70, 130, 180], [220, 20, 60]],
}


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the format


def test_class_map_file(tmp_path):
    cm = load_class_map(write_yaml(tmp_path / "c.yaml", CLASS_MAP))
    assert cm.names == tuple(CLASS_MAP["names"]) and cm.num_classes == 6 and not cm.is_cityscapes
    lut = cm.lut()
    assert [int(lut[i]) for i in range(7)] == [255, 0, 1, 2, 3, 4, 5]
    assert cm.palette[4].tolist() == [70, 130, 180] and cm.ignore_ids == [0]
    assert cm.colorize(np.array([[0, 5, 255]]))[0].tolist() == [[128, 64, 128], [220, 20, 60], [0, 0, 0]]
    assert load_class_map(cm.to_dict()) == cm  # the stored form reads back the same
    # files holding train ids: no `ids`; default palette (Cityscapes colours first)
    plain = class_map_from_dict({"names": ["a", "b"]})
    assert [int(plain.lut()[i]) for i in (0, 1, 255)] == [0, 1, 255] and plain.palette[1].tolist() == [244, 35, 232]
    assert cityscapes_classes().num_classes == 19 and cityscapes_classes().is_cityscapes


BAD_MAPS = [
    ("7: road\n  7: car", r"key 7 appears twice \(line \d+\)"),
    ("{ids: {7: road}, ignore: [7]}", r"label id 7 is both class 'road' \(in 'ids'\) and ignored"),
    ("{names: [road, road]}", r"class name 'road' appears twice \(train ids 0 and 1\)"),
    ("{ids: {7: 5}}", r"label id 7 maps to train id 5, but there are only 2 classes"),
    ("{palette: [[1, 2, 3]]}", r"'palette' has only 1 colours for 2 classes"),
    ("{palette: [[1, 2, 3], [4, 5]]}", r"palette entry 1 \(car\) must be \[R, G, B\]"),
    ("{ids: {7: road, 26: cra}}", r"label id 26 maps to unknown class 'cra' \(did you mean 'car'\?\)"),
    ("{ids: {7: road}}", r"no label id maps to class 'car'"),
    ("{colours: []}", r"unknown key 'colours'"),
]


@pytest.mark.parametrize("text, message", BAD_MAPS)
def test_class_map_mistakes_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    if text.startswith("{"):
        extra = yaml.safe_load(text)
        path.write_text(yaml.safe_dump({"names": ["road", "car"], "ids": {7: "road", 26: "car"}, **extra}))
    else:
        path.write_text(f"names: [road, car]\nids:\n  {text}\n")
    with pytest.raises(ConfigError, match=f"^class map {path}: {message}") as e:
        load_class_map(path)
    assert "\n" not in str(e.value)


def test_missing_class_map_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval\.data\.class_map: class map .*nope\.yaml does not exist$"):
        load_class_map(tmp_path / "nope.yaml", "eval.data.class_map")
    (tmp_path / "b.yaml").write_text("names: [a\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in class map .*b\.yaml"):
        load_class_map(tmp_path / "b.yaml")


# ----------------------------------------------------------------------------- a dataset of its own


@pytest.fixture(scope="module")
def coarse(tiny_synth, tmp_path_factory):
    """The tiny synthetic target in the `custom` layout with six coarse classes (label ids 1..6)."""
    root = tmp_path_factory.mktemp("coarse") / "data"
    lut = np.zeros(256, np.uint8)
    for t, c in COARSE_OF_TRAIN_ID.items():
        lut[t] = c
    for split in ("train", "val"):
        for img in sorted((tiny_synth / "target" / "leftImg8bit" / split).rglob("*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            lbl = img.parents[2].parent / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, root / "images" / split / f"{stem}.png")
            train = cityscapes_lut()[read_label(lbl)]
            Image.fromarray(lut[train.astype(np.uint8)]).save(root / "labels" / split / f"{stem}.png")
    write_yaml(root / "classes.yaml", CLASS_MAP)
    return root


def coarse_overrides(tiny_synth, coarse, out, **extra):
    o = {"synthetic.auto": "false", "model.num_classes": 6,
         "source.kind": "custom", "source.root": str(coarse), "source.split": "train", "source.list_file": "null",
         "source.class_map": str(coarse / "classes.yaml"),
         "target.kind": "custom", "target.root": str(coarse), "target.split": "train",
         "eval.data.kind": "custom", "eval.data.root": str(coarse), "eval.data.split": "val",
         "eval.data.class_map": str(coarse / "classes.yaml"), "train.iters": 2, "train.ckpt_every": 2}
    o.update(extra)
    return tiny_overrides(tiny_synth, out, **o)


def test_custom_reader_matches_names_and_maps_ids(coarse):
    cfg = load_config("synthetic/source_only", coarse_overrides(coarse, coarse, coarse / "unused"))
    ds = build_dataset(cfg.eval.data)
    assert ds.has_class_map and ds.classes.names == tuple(CLASS_MAP["names"])
    assert len(ds) == 4 and ds.names[0] == sorted(p.stem for p in (coarse / "images" / "val").iterdir())[0]
    label = ds[0]["label"].numpy()
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 5, 255} and (label != 255).any()
    # a list file of "image label" pairs relative to root
    names = ds.names[:2]
    (coarse / "pairs.txt").write_text("".join(f"images/val/{n}.png labels/val/{n}.png\n" for n in names))
    pairs = build_dataset(cfg.eval.data.__class__(**{**vars(cfg.eval.data), "list_file": "pairs.txt"}))
    assert pairs.names == [f"images/val/{n}" for n in names]
    assert np.array_equal(pairs[0]["label"].numpy(), ds[0]["label"].numpy())


def test_label_id_missing_from_the_map_names_the_file(coarse, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(coarse / "images" / "val", root / "images" / "val")
    shutil.copytree(coarse / "labels" / "val", root / "labels" / "val")
    first = sorted((root / "labels" / "val").iterdir())[0]
    lab = read_label(first).copy()
    lab[0, :3] = 9
    Image.fromarray(lab).save(first)
    ds = build_dataset(load_config(None, [f"eval.data.kind=custom", f"eval.data.root={root}", "eval.data.split=val",
                                          "model.num_classes=6",
                                          f"eval.data.class_map={coarse / 'classes.yaml'}"]).eval.data)
    with pytest.raises(DatasetError, match=rf"^label .*{first.name} contains ids not in the label map: 9 "
                                           rf"\(valid ids: 0\.\.6\)$"):
        ds[0]


def test_class_counts_must_agree_at_config_load(coarse):
    with pytest.raises(ConfigError, match=r"^eval\.data\.class_map .*classes\.yaml has 6 classes but "
                                          r"model\.num_classes is 19: set model\.num_classes=6$"):
        load_config("synthetic/source_only", [f"eval.data.class_map={coarse / 'classes.yaml'}"])
    with pytest.raises(ConfigError, match=r"^source: kind 'custom' reads its labels through a class map"):
        load_config("synthetic/source_only", ["source.kind=custom"])
    with pytest.raises(ConfigError, match=r"^target\.condition: dataset kind 'cityscapes' has no conditions"):
        load_config("synthetic/source_only", ["target.condition=fog"])


def test_own_classes_through_train_test_predict_export(tiny_synth, coarse, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config("synthetic/source_only", coarse_overrides(tiny_synth, coarse, out))
    from segadapt.engine.trainer import train_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_from_config(cfg, progress=False)
    names = CLASS_MAP["names"]
    results = json.loads((out / "results.json").read_text())
    assert results["class_names"] == names and len(results["per_class_iou"]) == 6
    assert results["subset_mious"] == {}
    assert (out / "results.csv").read_text().splitlines()[0].split(",")[:6] == names
    assert "| dynamic |" in (out / "results.md").read_text()

    # `segadapt test`: per-class table with the dataset's names
    assert main(["test", str(out), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "construction" in table and "road" not in table
    # data of another class count than the checkpoint: one line (the stored config's own check, or the
    # checkpoint's against a config given with -c)
    assert main(["test", str(out), "--out", str(tmp_path / "t2"), "--no-progress", "model.num_classes=19"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"segadapt test: error: source.class_map {coarse / 'classes.yaml'} has 6 classes but "
                   "model.num_classes is 19: set model.num_classes=6"]
    assert main(["test", str(out), "-c", "synthetic/source_only", "--out", str(tmp_path / "t3"), "--no-progress",
                 "synthetic.auto=false", f"synthetic.out={tiny_synth}", "model.base_width=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segadapt test: error: checkpoint ")
    assert err[0].endswith("predicts 6 classes, the config has model.num_classes=19: evaluate it on data with 6 "
                           "classes")

    # the class map file gone (another machine): predict and export use the classes the checkpoint carries
    moved = coarse / "classes.yaml"
    kept = moved.read_bytes()
    moved.unlink()
    try:
        pred = tmp_path / "pred"
        image = sorted((coarse / "images" / "val").iterdir())[0]
        assert main(["predict", str(image), "--checkpoint", str(out), "--out", str(pred), "--no-progress"]) == 0
        ids = read_label(pred / f"{image.stem}_trainid.png")
        colour = np.asarray(Image.open(pred / f"{image.stem}_color.png").convert("RGB"))
        assert ids.max() < 6 and np.array_equal(colour, np.array(CLASS_MAP["palette"], np.uint8)[ids])
        exported = tmp_path / "m.pt"
        assert main(["export", str(out), "--format", "torchscript", "--out", str(exported),
                     "--size", "64", "32"]) == 0
        import torch

        extra = {"segadapt.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(exported), _extra_files=extra)
        meta = json.loads(extra["segadapt.json"])
        assert meta["num_classes"] == 6 and meta["class_names"] == names and meta["palette"] == CLASS_MAP["palette"]
    finally:
        moved.write_bytes(kept)
