import textwrap

import pytest

from segadapt.cli import main
from segadapt.errors import ConfigError
from segadapt.config import load_config


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_config_show_names_where_each_value_came_from(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "base.yaml", """
        _base_: %s
        optim: {lr: 0.002}
        """ % "synthetic_base.yaml")
    _write(tmp_path / "synthetic_base.yaml", """
        name: mine
        model: {backbone: resnet18, base_width: 8}
        """)
    _write(tmp_path / "child.yaml", """
        _base_: base.yaml
        method: {name: minent}
        """)
    assert main(["config", "show", "-c", "child.yaml", "train.iters=7", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    find = lambda key: next(ln.strip() for ln in lines if ln.strip().startswith(key + ":"))
    assert find("lr") == "lr: 0.002  # base.yaml"
    assert find("base_width") == "base_width: 8  # synthetic_base.yaml"
    assert find("iters") == "iters: 7  # command line"
    assert find("seed") == "seed: 3  # command line"
    assert find("name").startswith("name: mine  # synthetic_base.yaml")
    # a reference is shown resolved, with its text; untouched keys are defaults
    assert find("out_dir") == "out_dir: runs/mine/seed3  # default, from runs/${name}/seed${train.seed}"
    assert find("weight_decay").endswith("# default")

    assert main(["config", "show", "-c", "child.yaml", "--changed"]) == 0
    changed = capsys.readouterr().out
    assert "lr: 0.002" in changed and "weight_decay" not in changed and "iters" not in changed


def test_config_show_refuses_an_unknown_key_in_one_line(capsys):
    assert main(["config", "show", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lrr" in err[0] and "did you mean 'optim.lr'" in err[0]


def test_replace_marker_replaces_an_inherited_section(tmp_path):
    _write(tmp_path / "parent.yaml", """
        method: {name: daformer, mic: {enabled: true, block_size: 16}, rcs: {enabled: true}}
        """)
    _write(tmp_path / "merged.yaml", """
        _base_: parent.yaml
        method: {mic: {mask_ratio: 0.5}}
        """)
    _write(tmp_path / "replaced.yaml", """
        _base_: parent.yaml
        method: {_replace_: true, name: source_only}
        """)
    merged = load_config(str(tmp_path / "merged.yaml")).method
    assert (merged.name, merged.mic.enabled, merged.mic.block_size, merged.mic.mask_ratio) == ("daformer", True, 16, 0.5)
    replaced = load_config(str(tmp_path / "replaced.yaml")).method
    assert replaced.name == "source_only" and replaced.mic.enabled is False  # nothing of daformer's left
    # without the marker, daformer's sections reach source_only, which has no rcs
    _write(tmp_path / "not_replaced.yaml", """
        _base_: parent.yaml
        method: {name: source_only}
        """)
    with pytest.raises(ConfigError, match="method source_only has no 'rcs'"):
        load_config(str(tmp_path / "not_replaced.yaml"))
