"""The dataset registry: built-in readers, unknown kinds, readers from outside the package (`imports:`)."""
import textwrap

import numpy as np
import pytest
from PIL import Image

from segadapt.config import PACKAGE_CONFIG_DIR, load_config
from segadapt.data.datasets import build_dataset
from segadapt.errors import ConfigError, DatasetError
from segadapt.registry import DATASETS


def test_builtin_readers_are_registered():
    assert DATASETS.registered()[:4] == ["gta5", "cityscapes", "synthia", "folder"]
    for kind in ("acdc", "dark_zurich", "custom"):
        assert kind in DATASETS


def test_unknown_kind_is_one_line_at_config_load_and_build(tmp_path):
    with pytest.raises(ConfigError, match=r"^target\.kind: unknown dataset kind 'acdcc' \(did you mean 'acdc'\?\)"
                       r"; known: .*dark_zurich") as e:
        load_config("synthetic/source_only", ["target.kind=acdcc"])
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="unknown dataset kind 'kitti'; valid kinds: gta5, cityscapes, synthia, "
                                           "folder, .*acdc"):
        build_dataset(load_config("synthetic/source_only").source.__class__(kind="kitti", root=str(tmp_path)))


PLUGIN = textwrap.dedent('''
    from segadapt.data.datasets import FolderDataset
    from segadapt.registry import DATASETS


    @DATASETS.register("test_plugin_folder")
    class PluginFolder(FolderDataset):
        """Every image under root, from a module outside the package."""
        display = "plugin folder"

        def __init__(self, cfg):
            self.tag = cfg.options.get("tag", "none")
            super().__init__(cfg)
''')


def test_imports_register_a_reader_from_a_file_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_reader.py").write_text(PLUGIN)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a.png")
    cfg_file = tmp_path / "plugins" / "run.yaml"
    cfg_file.write_text(textwrap.dedent(f'''
        _base_: {PACKAGE_CONFIG_DIR / "synthetic" / "source_only.yaml"}
        imports: [my_reader.py]
        target: {{kind: test_plugin_folder, root: {tmp_path}, labels: false, options: {{tag: x}}}}
    '''))
    monkeypatch.chdir("/")  # the file is found beside the config, not in the working folder
    cfg = load_config(str(cfg_file))
    assert cfg.imports == [str((tmp_path / "plugins" / "my_reader.py").resolve())]
    ds = build_dataset(cfg.target)
    assert ds.names == ["a.png"] and ds.tag == "x" and type(ds).__name__ == "PluginFolder"
    # a stored config (absolute path) loads again from anywhere
    assert load_config(None, base=cfg.to_dict()).target.kind == "test_plugin_folder"


def test_imports_that_fail_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^imports: .*nowhere\.py does not exist$"):
        load_config("synthetic/source_only", [f"imports=[{tmp_path / 'nowhere.py'}]"])
    with pytest.raises(ConfigError, match=r"^imports: cannot import no_such_module_xyz: ModuleNotFoundError"):
        load_config("synthetic/source_only", ["imports=[no_such_module_xyz]"])
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ConfigError, match=r"cannot import .*broken\.py: RuntimeError: boom second line") as e:
        load_config("synthetic/source_only", [f"imports=[{bad}]"])
    assert "\n" not in str(e.value)
