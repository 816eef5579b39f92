"""Adverse-condition targets of the synthetic benchmark (fog, night, rain)."""
import hashlib
import json
import warnings

import numpy as np
import pytest

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.data import synthetic as S
from segadapt.data.synthetic_conditions import CONDITIONS, sample_pair, scene_depth
from segadapt.errors import ConfigError, DatasetError

from .conftest import TINY_SYNTH, tiny_overrides

P = dict(seed=5, size=(96, 48))

# make_sample's outputs as this code rendered them before conditions existed: the daytime
# benchmark must not change by a byte
DAYTIME = {("source", 0): ("b08de6b143782ed3", "24625020d123529e"),
           ("source", 3): ("2281d9e93294c782", "34ab62becc4e7145"),
           ("target_train", 0): ("a05349683e434ac4", "fd7854740710041a"),
           ("target_train", 3): ("39b5eccbb87a9c88", "bcba56183be38d41"),
           ("target_val", 0): ("df31b30091019796", "4f3917f75539a456"),
           ("target_val", 3): ("89464771308b857b", "4613b7f88d3bfaaf")}


def digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("condition", [None, "none", ""])
def test_daytime_images_and_marker_unchanged(condition, tmp_path):
    p = S.SynthParams(**P, condition=condition)
    for (domain, i), (img_hash, lab_hash) in DAYTIME.items():
        img, lab = S.make_sample(p, domain, i)
        assert (digest(img), digest(lab)) == (img_hash, lab_hash), (domain, i)
    assert "condition" not in p.identity()
    out = S.generate(tmp_path / "b", S.SynthParams(**P, num_source=1, num_source_val=0, num_target_train=1,
                                                     num_target_val=1, condition=condition))
    assert "condition" not in json.loads((out / S.MARKER_NAME).read_text())["params"]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_condition_changes_the_target_look_only(condition):
    p = S.SynthParams(**P, condition=condition)
    day = S.SynthParams(**P)
    for domain in ("target_train", "target_val"):
        img, lab = S.make_sample(p, domain, 1)
        day_img, day_lab = S.make_sample(day, domain, 1)
        assert np.array_equal(lab, day_lab) and not np.array_equal(img, day_img)
        again, _ = S.make_sample(p, domain, 1)
        assert np.array_equal(img, again)  # a pure function of (seed, domain, index, condition)
    assert np.array_equal(S.make_sample(p, "source", 1)[0], S.make_sample(day, "source", 1)[0])
    assert p.identity()["condition"] == condition


def _scene(params, domain, index):
    rng = S.image_rng(params.seed, domain, index)
    return S.sample_scene(rng, params.size, "target")


def test_fog_contrast_falls_with_depth():
    """Contrast kept by the fog (its spread over the daytime image's), near and far."""
    p = S.SynthParams(seed=1, size=(128, 64), condition="fog")
    kept_near, kept_far = [], []
    for i in range(4):
        day, fog = (a.astype(np.float32) for a in sample_pair(p, "target_val", i))
        depth = scene_depth(_scene(p, "target_val", i))
        near, far = depth < 10, (depth > 40) & np.isfinite(depth)
        kept_near.append(fog[near].std() / day[near].std())
        kept_far.append(fog[far].std() / day[far].std())
    assert np.mean(kept_far) < 0.3 and np.mean(kept_near) > 3 * np.mean(kept_far)


def test_night_is_dark_with_headlights():
    p = S.SynthParams(seed=2, size=(128, 64), condition="night")
    ratios, lit = [], []
    for i in range(6):
        day, night = (a.astype(np.float32) for a in sample_pair(p, "target_val", i))
        ratios.append(night.mean() / day.mean())
        scene = _scene(p, "target_val", i)
        depth = scene_depth(scene)
        W, H, yh, xv, f, hc = scene.cam
        lateral = np.abs(np.arange(W)[None, :] - xv) * depth / f
        ground = S._GROUND[scene.mat.astype(np.int64)[scene.inst]]
        ahead = ground & (depth < 10) & (lateral < 2)
        far = ground & (depth > 30) & np.isfinite(depth)
        kept = night.mean(-1) / np.maximum(day.mean(-1), 1.0)
        lit.append(kept[ahead].mean() / kept[far].mean())
    assert np.mean(ratios) < 0.65
    assert np.median(lit) > 1.5  # the road just ahead is lit by the headlights, the far road is not


def test_rain_darkens_and_streaks():
    p = S.SynthParams(seed=3, size=(128, 64), condition="rain")
    day, rain = (a.astype(np.float32) for a in sample_pair(p, "target_val", 0))
    assert rain.mean() < day.mean() + 20
    # streaks: thin bright lines make vertical neighbours more alike than horizontal ones
    diff = rain - day
    v = np.abs(np.diff(diff.mean(-1), axis=0)).mean()
    h = np.abs(np.diff(diff.mean(-1), axis=1)).mean()
    assert h > v


def test_bad_conditions_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^synthetic condition must be one of fog, night, rain \(or none\), "
                                          r"got 'snow'$"):
        S.SynthParams(condition="snow").validate()
    cfg = load_config("synthetic/source_only", tiny_overrides(tmp_path / "b", tmp_path / "r",
                                                             **{"synthetic.condition": "fgo"}))
    from segadapt.engine.trainer import ensure_data

    with pytest.raises(ConfigError, match="got 'fgo'"):
        ensure_data(cfg)
    with pytest.raises(SystemExit):
        main(["synth", "--condition", "snow", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'snow'" in capsys.readouterr().err


def test_cli_and_marker_keep_the_condition(tmp_path, capsys):
    out = tmp_path / "fog"
    args = ["synth", "--out", str(out), "--size", "64", "32", "--num-source", "1", "--num-source-val", "0",
            "--num-target-train", "1", "--num-target-val", "1", "--condition", "fog"]
    assert main(args) == 0
    assert json.loads((out / S.MARKER_NAME).read_text())["params"]["condition"] == "fog"
    same = S.SynthParams(size=(64, 32), num_source=1, num_source_val=0, num_target_train=1, num_target_val=1)
    with pytest.raises(DatasetError, match=r"different synthetic parameters \(condition: 'fog' on disk vs None "
                                           r"requested\)"):
        S.ensure_synthetic(out, same)
    assert S.ensure_synthetic(out, S.SynthParams(**{**vars(same), "condition": "fog"})) == out


# ----------------------------------------------------------------------------- the configs run


@pytest.fixture(scope="module")
def tiny_conditions(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditions")
    for c in ("fog", "night"):
        S.generate(root / c, S.SynthParams(**TINY_SYNTH, condition=c, workers=1))
    return root


@pytest.mark.parametrize("name", [f"synthetic_{c}/{m}" for c in ("fog", "night")
                                  for m in ("source_only", "daformer", "cut", "confeti_stage1")])
def test_condition_configs_train_two_steps(name, tiny_conditions, tmp_path):
    from segadapt.engine.trainer import train_from_config

    from .golden_steps import cut_folder

    cond = name.split("/")[0].split("_")[1]
    cfg = load_config(name)
    assert cfg.synthetic.condition == cond and cfg.synthetic.out == f"data/synthetic_{cond}"
    extra = {"train.iters": 2, "train.ckpt_every": 2}
    if "confeti" in name:
        assert cfg.method.cut.init == f"runs/synthetic_{cond}_cut/seed0"
        extra["method.cut.init"] = str(cut_folder(tmp_path, vars(cfg.method.cut)))
    cfg = load_config(name, tiny_overrides(tiny_conditions / cond, tmp_path / "run", **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_from_config(cfg, progress=False)
    assert (tmp_path / "run" / "final.pth").is_file()
