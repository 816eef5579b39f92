import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.engine.evaluator import subsets_for
from segadapt.engine.metrics import (
    CITYSCAPES_CLASS_NAMES,
    SYNTHIA13_IDS,
    SYNTHIA16_IDS,
    ConfusionMatrix,
    EvalResult,
    compute_iou,
    mean_iou,
    pixel_accuracy,
)


def _tiny_pair():
    # 4 classes; 255 and 7 (>= num_classes) in the target are ignored.
    target = torch.tensor(
        [[0, 0, 1, 255],
         [1, 2, 2, 7],
         [0, 0, 0, 0]]
    )
    pred = torch.tensor(
        [[0, 1, 1, 3],
         [2, 2, 0, 0],
         [0, 0, 0, 0]]
    )
    return pred, target


def test_confusion_matrix_hand_computed():
    pred, target = _tiny_pair()
    cm = ConfusionMatrix(4, "cpu")
    cm.update(pred, target)
    expected = torch.tensor(
        [[5, 1, 0, 0],   # gt 0: 5 x pred 0, 1 x pred 1
         [0, 1, 1, 0],   # gt 1
         [1, 0, 1, 0],   # gt 2
         [0, 0, 0, 0]],  # gt 3: never in gt; pred 3 only on an ignored pixel
        dtype=torch.int64,
    )
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)

    iou = compute_iou(cm.matrix)
    # class 0: TP 5, FP 1 (gt 2), FN 1 -> 5/7; classes 1, 2: 1/3; class 3: NaN
    np.testing.assert_allclose(iou[:3], [5 / 7, 1 / 3, 1 / 3])
    assert math.isnan(iou[3])
    assert mean_iou(iou) == pytest.approx((5 / 7 + 2 / 3) / 3)
    assert pixel_accuracy(cm.matrix) == pytest.approx(7 / 10)

    # accumulation over several updates, then reset
    cm.update(pred.unsqueeze(0), target.unsqueeze(0))
    assert torch.equal(cm.matrix, 2 * expected)
    cm.all_reduce()  # no process group: no-op
    assert torch.equal(cm.matrix, 2 * expected)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    # a prediction outside [0, C) on a counted pixel is reported when read
    cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        _ = cm.matrix
    cm.reset()
    # ... but not on an ignored pixel
    cm.update(torch.tensor([0, 5]), torch.tensor([0, 255]))
    assert int(cm.matrix.sum()) == 1


def test_all_nan_mean_is_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(mean_iou([float("nan")] * 3))
        assert math.isnan(pixel_accuracy(np.zeros((2, 2))))


def _subset_matrix():
    m = np.zeros((19, 19), dtype=np.int64)
    np.fill_diagonal(m, 1)
    m[3, 0] = 1   # wall predicted as road: IoU(road) = IoU(wall) = 1/2
    m[9, 9] = 0
    m[9, 10] = 1  # terrain predicted as sky: IoU(terrain) = 0, IoU(sky) = 1/2
    return m


def test_subset_mious_hand_made_matrix():
    subsets = subsets_for("synthia")
    assert subsets == {"mIoU16": list(SYNTHIA16_IDS), "mIoU13": list(SYNTHIA13_IDS)}
    assert subsets["mIoU16"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert subsets["mIoU13"] == [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert subsets_for("gta5") == {} and subsets_for("cityscapes") == {}

    r = EvalResult.from_matrix(_subset_matrix(), subsets=subsets)
    assert r.class_names == list(CITYSCAPES_CLASS_NAMES)
    assert r.per_class_iou[0] == 0.5 and r.per_class_iou[3] == 0.5 and r.per_class_iou[9] == 0.0 and r.per_class_iou[10] == 0.5
    assert r.miou == pytest.approx(16.5 / 19)
    assert r.subset_mious["mIoU16"] == pytest.approx(14.5 / 16)
    assert r.subset_mious["mIoU13"] == pytest.approx(12 / 13)
    assert r.pixel_accuracy == pytest.approx(18 / 20)


def test_eval_result_reports_and_round_trip(tmp_path):
    pred, target = _tiny_pair()
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    names = ["road", "sidewalk", "building", "wall"]
    r = EvalResult.from_matrix(
        cm.matrix, class_names=names, subsets={"first2": [0, 1]},
        meta={"checkpoint": "ckpt/iter_2000.pth", "dataset": "cityscapes val",
              "notes": "val split restyled"},
    )
    assert r.subset_mious["first2"] == pytest.approx((5 / 7 + 1 / 3) / 2)

    table = r.table()
    assert "road" in table and "71.43" in table and "n/a" in table
    assert "first2" in table and "pixel accuracy" in table

    md = r.to_markdown()
    assert "| road | 71.43 |" in md
    assert "| sidewalk | 33.33 |" in md
    assert "| wall | n/a |" in md
    assert "| mIoU (4 classes) | 46.03 |" in md  # (5/7 + 2/3) / 3
    assert "val split restyled" in md

    lines = r.to_csv().strip().split("\n")
    assert lines[0] == "road,sidewalk,building,wall,mIoU,first2,pixel_acc"
    assert lines[1] == "71.43,33.33,33.33,,46.03,52.38,70.00"

    paths = r.save(tmp_path / "out", stem="val")
    assert {p.name for p in paths.values()} == {"val.md", "val.csv", "val.json"}
    assert all(p.is_file() for p in paths.values())
    raw = json.loads(paths["json"].read_text())
    assert raw["per_class_iou"][3] is None  # NaN written as null
    assert "NaN" not in paths["json"].read_text()
    assert raw["confusion"][0] == [5, 1, 0, 0]

    back = EvalResult.from_json(paths["json"])
    assert back.class_names == names
    np.testing.assert_allclose(back.per_class_iou, r.per_class_iou, equal_nan=True)
    assert back.miou == pytest.approx(r.miou)
    assert back.pixel_accuracy == pytest.approx(r.pixel_accuracy)
    assert back.subset_mious == pytest.approx(r.subset_mious)
    assert back.subsets == {"first2": [0, 1]}
    assert back.meta == r.meta
    assert back.to_markdown() == md


# --------------------------------------------------------------------------- #
# Agreement with the official Cityscapes evaluation script
# --------------------------------------------------------------------------- #
def test_iou_matches_cityscapesscripts(tmp_path):
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    from cityscapesscripts.helpers.labels import labels as cs_labels, trainId2label

    # official label id -> train id table (ignored ids -> 255)
    lut = np.full(256, 255, dtype=np.int64)
    for lab in cs_labels:
        if lab.id >= 0 and 0 <= lab.trainId < 255:
            lut[lab.id] = lab.trainId
    assert [trainId2label[t].name for t in range(19)] == list(CITYSCAPES_CLASS_NAMES)

    rng = np.random.default_rng(0)
    label_ids = [lab.id for lab in cs_labels if lab.id >= 0 and lab.id != 31]  # no 'train'
    allowed_train = [t for t in range(19) if t != 16]  # 'train' never predicted either
    gt_dir = tmp_path / "gtFine" / "val" / "testcity"
    pred_dir = tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()

    ours = ConfusionMatrix(19)
    for i in range(3):
        h, w = 24, 40
        gt = rng.choice(label_ids, size=(h, w)).astype(np.uint8)
        gt_train = lut[gt]
        pred_train = rng.choice(allowed_train, size=(h, w))
        keep = (rng.random((h, w)) < 0.6) & (gt_train != 255)
        pred_train[keep] = gt_train[keep]
        # cityscapesscripts evaluates predictions given in label ids
        pred_ids = np.vectorize(lambda t: trainId2label[int(t)].id)(pred_train).astype(np.uint8)
        stem = f"testcity_000000_{i:06d}"
        Image.fromarray(gt).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(pred_ids).save(pred_dir / f"{stem}_leftImg8bit.png")
        ours.update(torch.from_numpy(pred_train), torch.from_numpy(gt_train))

    # Drive the script programmatically with our own args object: no instance
    # (nIoU) scores, no JSON export, quiet, predictions searched in tmp_path.
    args = cs_eval.CArgs()
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.evalLabels = []
    args.printRow = 5
    args.normalized = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "cs_result.json")
    args.quiet = True
    args.avgClassSize = {}
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    gts = sorted(str(p) for p in gt_dir.glob("*_gtFine_labelIds.png"))
    preds = [cs_eval.getPrediction(args, g) for g in gts]
    theirs = cs_eval.evaluateImgLists(preds, gts, args)

    iou = compute_iou(ours.matrix)
    for t, name in enumerate(CITYSCAPES_CLASS_NAMES):
        ref = theirs["classScores"][name]
        if math.isnan(ref):
            assert math.isnan(iou[t]), name
        else:
            assert iou[t] == pytest.approx(ref, abs=1e-12), name
    assert math.isnan(iou[16])  # the class absent from both sides
    assert int(np.isnan(iou).sum()) == 1
    assert mean_iou(iou) == pytest.approx(theirs["averageScoreClasses"], abs=1e-12)
    assert not (tmp_path / "cs_result.json").exists()
