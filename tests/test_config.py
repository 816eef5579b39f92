import pytest

from segadapt.config import load_config, packaged_config_names, parse_overrides, resolve_config_path
from segadapt.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_packaged_config_loads_with_interpolation():
    cfg = load_config("synthetic/source_only")
    assert cfg.name == "synthetic_source_only"
    assert cfg.source.root == "data/synthetic/source"
    assert cfg.out_dir == "runs/synthetic_source_only/seed0"
    assert type(cfg.method).__name__ == "SourceOnlyConfig" and cfg.method.name == "source_only"


def test_overrides_typed_and_nested():
    cfg = load_config("synthetic/source_only", ["train.iters=7", "optim.lr=1e-3", "source.crop=[64,32]",
                                                "synthetic.out=/tmp/x"])
    assert cfg.train.iters == 7
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.source.crop == [64, 32]
    assert cfg.source.root == "/tmp/x/source"  # references resolved after overrides


def test_unknown_key_names_key_and_file(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {iters: 10}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert "optim.lrr" in msg and "child.yaml" in msg and "did you mean 'optim.lr'" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="command line"):
        load_config(base, ["train.itres=3"])


def test_typo_in_base_file_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "model: {backbon: resnet18}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nname: x\n")
    with pytest.raises(ConfigError, match=r"model.backbon.*base.yaml"):
        load_config(child)


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(ConfigError, match="train.iters: expected an integer"):
        load_config("synthetic/source_only", ["train.iters=abc"])
    with pytest.raises(ConfigError, match="optim.name.*did you mean 'sgd'"):
        load_config("synthetic/source_only", ["optim.name=sdg"])
    with pytest.raises(ConfigError, match="unknown method 'minnet'"):
        load_config("synthetic/source_only", ["method.name=minnet"])
    with pytest.raises(ConfigError, match="method.weight"):
        load_config("synthetic/source_only", ["method.weight=1"])  # source_only has no such parameter


def test_bad_yaml_and_missing_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train: {iters: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML in .*bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path("synthetic/sorce_only")


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=null"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": None}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_packaged_config_list_is_complete():
    names = packaged_config_names()
    for n in ("gta5_cityscapes/cfcontra", "synthia_cityscapes/advent", "synthetic/source_only",
              "synthetic/cfcontra_adain_restyled_target", "synthetic/confeti_stage2"):
        assert n in names
    assert "synthetic/base" not in names and "synthetic/base" in packaged_config_names(runnable_only=False)


@pytest.mark.parametrize("name", packaged_config_names())
def test_all_packaged_configs_valid(name):
    from segadapt.methods import get_method_class

    cfg = load_config(name)
    assert cfg.model.num_classes == 19 and cfg.name
    # the method section is built as the method's own typed config, from YAML to the method
    assert type(cfg.method) is get_method_class(cfg.method.name).Config
    # a loaded model section holds the preset's concrete values, nothing left unset
    assert None not in (cfg.model.arch, cfg.model.normalization, cfg.model.aux)


def test_reference_defaults_gta5():
    cfg = load_config("gta5_cityscapes/source_only")
    assert cfg.optim.lr == 2.5e-4 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.optim.poly_iters == 250000 and cfg.train.iters == 120000 and cfg.optim.head_lr_mult == 10
    assert cfg.source.resize == [1280, 720] and cfg.target.resize == [1024, 512]
    assert cfg.model.backbone == "resnet101" and cfg.model.normalization == "advent_bgr"


@pytest.mark.parametrize("track", ["synthetic_mnv2", "synthetic_mit"])
def test_backbone_tracks_change_only_the_network(track):
    """A track of the synthetic benchmark is the same data, method, optimizer, schedule and
    evaluation with another network (the pretrained track also trains channels-last)."""
    names = [n for n in packaged_config_names() if n.startswith(track + "/")]
    assert len(names) >= 6
    for name in names:
        ours = load_config(name).to_dict()
        base = load_config("synthetic/" + name.split("/")[1]).to_dict()
        assert ours["name"] == base["name"].replace("synthetic_", track + "_", 1)
        assert ours["model"]["arch"] == "encoder_decoder"
        for key in set(ours) | set(base):
            if key in ("name", "out_dir", "model"):
                continue
            if key == "train":
                ours[key].pop("channels_last")
                base[key].pop("channels_last")
            assert ours[key] == base[key], (name, key)
        if track == "synthetic_mnv2":
            m = ours["model"]
            assert (m["backbone"], m["output_stride"], m["decode_head"], m["aux"], m["pretrained"]) == (
                "mobilenetv2", 8, "aspp", True, "installed")
