"""ACDC and Dark Zurich readers on tiny files written in the layouts as downloaded."""
import numpy as np
import pytest
from PIL import Image

from segadapt.config import DatasetConfig, load_config
from segadapt.data.datasets import build_dataset
from segadapt.errors import ConfigError, DatasetError

TRAIN_IDS = np.array([[0, 1, 255], [13, 18, 10]], np.uint8)
LABEL_IDS = np.array([[7, 8, 0], [26, 33, 23]], np.uint8)  # the same classes as Cityscapes label ids


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (2, 3, 3), dtype=np.uint8)


def acdc_frame(root, cond, split, seq, frame, labels=True, seed=0):
    png(root / "rgb_anon" / cond / split / seq / f"{frame}_rgb_anon.png", rgb(seed))
    if labels:
        gt = root / "gt" / cond / split / seq
        png(gt / f"{frame}_gt_labelTrainIds.png", TRAIN_IDS)
        png(gt / f"{frame}_gt_labelIds.png", LABEL_IDS)
        png(gt / f"{frame}_gt_labelColor.png", rgb(9))  # present in the download, not read


@pytest.fixture
def acdc(tmp_path):
    root = tmp_path / "acdc"
    for i, cond in enumerate(("snow", "fog", "night", "rain")):
        acdc_frame(root, cond, "val", f"GOPR04{i}0", f"GOPR04{i}0_frame_000010", seed=i)
    acdc_frame(root, "fog", "train", "GOPR0475", "GOPR0475_frame_000041")
    acdc_frame(root, "fog", "train", "GOPR0475", "GOPR0475_frame_000042")
    acdc_frame(root, "night", "train", "GOPR0351", "GOPR0351_frame_000159")
    acdc_frame(root, "night", "test", "GOPR0355", "GOPR0355_frame_000001", labels=False)
    png(root / "rgb_anon" / "fog" / "train_ref" / "GOPR0475" / "GOPR0475_frame_000041_rgb_ref_anon.png", rgb(3))
    return root


def ds_cfg(kind, root, **kw):
    return DatasetConfig(kind=kind, root=str(root), **kw)


def test_acdc_all_conditions_and_one(acdc):
    ds = build_dataset(ds_cfg("acdc", acdc, split="val"))
    assert ds.names == ["fog/GOPR0410/GOPR0410_frame_000010", "night/GOPR0420/GOPR0420_frame_000010",
                        "rain/GOPR0430/GOPR0430_frame_000010", "snow/GOPR0400/GOPR0400_frame_000010"]
    assert ds.samples[0][1].name == "GOPR0410_frame_000010_gt_labelTrainIds.png"
    np.testing.assert_array_equal(ds[0]["label"].numpy(), TRAIN_IDS)
    np.testing.assert_array_equal(ds[2]["image"].numpy().transpose(1, 2, 0) * 255, rgb(3))
    night = build_dataset(ds_cfg("acdc", acdc, split="train", condition="night", labels=False))
    assert night.names == ["night/GOPR0351/GOPR0351_frame_000159"] and "label" not in night[0]
    fog = build_dataset(ds_cfg("acdc", acdc, split="train", condition="fog"))
    assert len(fog) == 2  # train_ref (the clear-weather references) is not the train split


def test_acdc_label_ids_fallback_and_list_file(acdc):
    gt = acdc / "gt" / "rain" / "val" / "GOPR0430"
    (gt / "GOPR0430_frame_000010_gt_labelTrainIds.png").unlink()
    ds = build_dataset(ds_cfg("acdc", acdc, split="val"))
    assert ds.samples[2][1].name.endswith("_gt_labelIds.png")
    np.testing.assert_array_equal(ds.load_label_train_ids(2), TRAIN_IDS)
    (acdc / "val.txt").write_text("snow/GOPR0400/GOPR0400_frame_000010\n"
                                  "rgb_anon/fog/val/GOPR0410/GOPR0410_frame_000010_rgb_anon.png\n")
    ds = build_dataset(ds_cfg("acdc", acdc, split="val", list_file="val.txt"))
    assert ds.names == ["snow/GOPR0400/GOPR0400_frame_000010", "fog/GOPR0410/GOPR0410_frame_000010"]
    with pytest.raises(DatasetError, match=r"names 'snow/GOPR0400/GOPR0400_frame_000010', not of condition fog"):
        build_dataset(ds_cfg("acdc", acdc, split="val", list_file="val.txt", condition="fog"))


def test_acdc_restructured_copy(tmp_path):
    """DAFormer/HRDA/MIC's rsync: rgb_anon/<split>/*_rgb_anon.png, gt/<split>/*_gt_labelTrainIds.png."""
    root = tmp_path / "flat"
    png(root / "rgb_anon" / "val" / "GOPR0400_frame_000010_rgb_anon.png", rgb(1))
    png(root / "gt" / "val" / "GOPR0400_frame_000010_gt_labelTrainIds.png", TRAIN_IDS)
    ds = build_dataset(ds_cfg("acdc", root, split="val"))
    assert ds.names == ["GOPR0400_frame_000010"]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), TRAIN_IDS)
    with pytest.raises(DatasetError, match=r"restructured copy without condition folders; condition 'night'"):
        build_dataset(ds_cfg("acdc", root, split="val", condition="night"))


def test_acdc_bad_inputs_are_one_line(acdc, tmp_path):
    with pytest.raises(ConfigError, match=r"^target\.condition: 'fgo' is not a condition of ACDC \(did you mean "
                                          r"'fog'\?\); conditions: fog, night, rain, snow, all$"):
        load_config("cityscapes_acdc/daformer_mitb5", ["target.condition=fgo"])
    with pytest.raises(ConfigError, match=r"^eval\.data: ACDC's test split has no public labels: set "
                                          r"eval\.data\.labels=false"):
        load_config("cityscapes_acdc/daformer_mitb5", ["eval.data.split=test"])
    with pytest.raises(ConfigError, match=r"^source\.split: ACDC has no split 'all'"):
        load_config("cityscapes_acdc/daformer_mitb5", ["source.kind=acdc", "source.split=all"])
    assert len(build_dataset(ds_cfg("acdc", acdc, split="test", labels=False))) == 1
    with pytest.raises(DatasetError, match=r"^ACDC: condition folder .*rgb_anon/snow/train does not exist$"):
        build_dataset(ds_cfg("acdc", acdc, split="train", condition="snow"))
    (acdc / "gt" / "fog" / "train" / "GOPR0475" / "GOPR0475_frame_000042_gt_labelTrainIds.png").unlink()
    (acdc / "gt" / "fog" / "train" / "GOPR0475" / "GOPR0475_frame_000042_gt_labelIds.png").unlink()
    with pytest.raises(DatasetError, match=r"GOPR0475_frame_000042_rgb_anon\.png has no label "
                                           r".*gt/fog/train/GOPR0475/GOPR0475_frame_000042_gt_labelTrainIds\.png"):
        build_dataset(ds_cfg("acdc", acdc, split="train", condition="fog"))
    with pytest.raises(DatasetError, match=r"ACDC root .*nowhere does not exist"):
        build_dataset(ds_cfg("acdc", tmp_path / "nowhere", split="val"))


@pytest.fixture
def dark_zurich(tmp_path):
    root = tmp_path / "dz"
    for cond, seq in (("night", "GOPR0351"), ("day", "GOPR0348"), ("twilight", "GOPR0349")):
        for k in (1, 2):
            png(root / "rgb_anon" / "train" / cond / seq / f"{seq}_frame_00000{k}_rgb_anon.png", rgb(k))
    png(root / "rgb_anon" / "val" / "night" / "GOPR0356" / "GOPR0356_frame_000321_rgb_anon.png", rgb(5))
    png(root / "gt" / "val" / "night" / "GOPR0356" / "GOPR0356_frame_000321_gt_labelTrainIds.png", TRAIN_IDS)
    png(root / "gt" / "val" / "night" / "GOPR0356" / "GOPR0356_frame_000321_gt_labelIds.png", LABEL_IDS)
    png(root / "rgb_anon" / "test" / "night" / "GOPR0364" / "GOPR0364_frame_000001_rgb_anon.png", rgb(6))
    return root


def test_dark_zurich_night_train_and_val(dark_zurich):
    train = build_dataset(ds_cfg("dark_zurich", dark_zurich, split="train", labels=False))
    assert train.names == ["night/GOPR0351/GOPR0351_frame_000001", "night/GOPR0351/GOPR0351_frame_000002"]
    every = build_dataset(ds_cfg("dark_zurich", dark_zurich, split="train", labels=False, condition="all"))
    assert len(every) == 6 and every.names[0].startswith("day/")
    val = build_dataset(ds_cfg("dark_zurich", dark_zurich, split="val"))
    assert val.names == ["night/GOPR0356/GOPR0356_frame_000321"]
    np.testing.assert_array_equal(val[0]["label"].numpy(), TRAIN_IDS)
    assert len(build_dataset(ds_cfg("dark_zurich", dark_zurich, split="test", labels=False))) == 1


def test_dark_zurich_bad_inputs_are_one_line(dark_zurich):
    with pytest.raises(ConfigError, match=r"^target\.condition: 'dawn' is not a condition of Dark Zurich; conditions: "
                                          r"day, night, twilight, all$"):
        load_config("cityscapes_darkzurich/daformer_mitb5", ["target.condition=dawn"])
    with pytest.raises(ConfigError, match=r"^target: Dark Zurich's train split has no labels here \(val is the "
                                          r"labelled split"):
        load_config("cityscapes_darkzurich/daformer_mitb5", ["target.labels=true"])
    with pytest.raises(ConfigError, match=r"^eval\.data: Dark Zurich's test split has no labels here"):
        load_config("cityscapes_darkzurich/daformer_mitb5", ["eval.data.split=test"])
    with pytest.raises(DatasetError, match=r"^Dark Zurich: condition folder .*rgb_anon/val/day does not exist$"):
        build_dataset(ds_cfg("dark_zurich", dark_zurich, split="val", condition="day"))


# ----------------------------------------------------------------------------- the benchmark configs run


@pytest.fixture(scope="module")
def tiny_benchmarks(tiny_synth, tmp_path_factory):
    """The tiny synthetic target, at 128x64 (rare class sampling needs 3000-pixel classes), as
    Cityscapes (the labelled source), ACDC (fog and night) and Dark Zurich (night)."""
    work = tmp_path_factory.mktemp("adverse")

    def put(src, dst, nearest):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im.resize((128, 64), Image.NEAREST if nearest else Image.BILINEAR).save(dst)

    for split in ("train", "val"):
        for k, img in enumerate(sorted((tiny_synth / "target" / "leftImg8bit" / split).rglob("*.png"))):
            stem = img.name[: -len("_leftImg8bit.png")]
            lbl = tiny_synth / "target" / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
            put(img, work / "cityscapes" / "leftImg8bit" / split / img.parent.name / img.name, False)
            put(lbl, work / "cityscapes" / "gtFine" / split / img.parent.name / lbl.name, True)
            cond = ("fog", "night")[k % 2]
            for root, folder in ((work / "acdc", f"{cond}/{split}"), (work / "dz", f"{split}/night")):
                put(img, root / "rgb_anon" / folder / "GOPR0001" / f"{stem}_rgb_anon.png", False)
                if split == "val" or root.name == "acdc":
                    put(lbl, root / "gt" / folder / "GOPR0001" / f"{stem}_gt_labelIds.png", True)
    return work


@pytest.mark.parametrize("name", ["cityscapes_acdc/source_only", "cityscapes_acdc/daformer_mitb5",
                                  "cityscapes_acdc/mic_daformer_mitb5", "cityscapes_acdc/confeti_mitb5",
                                  "cityscapes_darkzurich/daformer_mitb5"])
def test_benchmark_configs_train_on_tiny_copies(name, tiny_benchmarks, tmp_path):
    import json
    import warnings

    from segadapt.engine.trainer import train_from_config

    from .golden_steps import cut_folder

    target = tiny_benchmarks / ("acdc" if "acdc" in name else "dz")
    o = [f"out_dir={tmp_path / 'run'}", f"source.root={tiny_benchmarks / 'cityscapes'}", f"target.root={target}",
         f"eval.data.root={target}", "source.resize=[128,64]", "target.resize=[128,64]", "eval.data.resize=[128,64]",
         "source.crop=[64,64]", "target.crop=[64,64]", "train.iters=2", "train.batch_source=2",
         "train.batch_target=2", "train.num_workers=0", "train.eval_every=0", "train.ckpt_every=2",
         "optim.warmup_iters=1", "model.pretrained=null", "model.backbone=mit_b0", "model.embed_dims=[8,16,40,64]",
         "model.head_channels=16"]
    cfg = load_config(name)
    if cfg.method.name == "confeti":
        o.append(f"method.cut.init={cut_folder(tmp_path, vars(cfg.method.cut))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_from_config(load_config(name, o), progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["meta"]["num_images"] == 4 and len(results["class_names"]) == 19
