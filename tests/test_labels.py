import numpy as np
import pytest

from segadapt.data import labels as L
from segadapt.errors import DatasetError

# The GTA5/Cityscapes and SYNTHIA mappings as written in specs/baselines.md.
SPEC_CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                   24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPEC_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
                8: 13, 19: 15, 12: 17, 11: 18}


def test_table_equals_official_cityscapesscripts():
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    ours = [(lab.name, lab.id, lab.train_id, tuple(lab.color)) for lab in L.CITYSCAPES_LABELS]
    theirs = [(lab.name, lab.id, lab.trainId, tuple(lab.color)) for lab in official.labels]
    assert ours == theirs
    # class names and palette in train-id order
    by_train = {lab.trainId: lab for lab in official.labels if 0 <= lab.trainId < 255}
    assert list(L.CLASS_NAMES) == [by_train[t].name for t in range(19)]
    assert L.PALETTE.dtype == np.uint8 and L.PALETTE.shape == (19, 3)
    assert [tuple(c) for c in L.PALETTE.tolist()] == [tuple(by_train[t].color) for t in range(19)]
    assert L.CITYSCAPES_ID_TO_TRAIN == {lab.id: lab.trainId for lab in official.labels if lab.id >= 0}


def test_constants():
    assert L.NUM_CLASSES == 19 and L.IGNORE_INDEX == 255 and len(L.CLASS_NAMES) == 19
    assert L.THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    assert L.SYNTHIA_16 == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert L.SYNTHIA_13 == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def test_cityscapes_lut_matches_spec_and_rejects_unknown_ids():
    lut = L.cityscapes_lut()
    assert lut.shape == (65536,)
    for raw in range(34):
        assert lut[raw] == SPEC_CITYSCAPES.get(raw, 255), raw
    assert lut[255] == 255  # license plate (-1) stored in 8 bits
    assert lut[34] == L.INVALID and lut[200] == L.INVALID and lut[65535] == L.INVALID
    assert not lut.flags.writeable  # shared cached table


def test_synthia_lut_matches_spec():
    lut = L.synthia_lut()
    for raw in range(23):
        assert lut[raw] == SPEC_SYNTHIA.get(raw, 255), raw
    assert lut[23] == L.INVALID and lut[255] == L.INVALID
    # no terrain, truck or train in SYNTHIA
    assert not {9, 14, 16} & set(SPEC_SYNTHIA.values())


def test_map_labels_values_and_dtype():
    raw = np.array([[7, 8, 0], [33, 26, 255]], dtype=np.uint8)
    out = L.map_labels(raw, L.cityscapes_lut(), "x.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 255], [18, 13, 255]])
    raw16 = np.array([[3, 22], [1, 19]], dtype=np.uint16)
    np.testing.assert_array_equal(L.map_labels(raw16, L.synthia_lut()), [[0, 255], [10, 15]])
    tid = np.array([[0, 18, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(L.map_labels(tid, L.train_id_lut()), tid)


def test_map_labels_invalid_ids_name_file_and_ids():
    raw = np.array([[7, 200], [201, 7]], dtype=np.uint8)
    with pytest.raises(DatasetError) as e:
        L.map_labels(raw, L.cityscapes_lut(), "/data/gta/labels/00001.png")
    msg = str(e.value)
    assert "/data/gta/labels/00001.png" in msg and "200, 201" in msg and "0..33" in msg
    assert "\n" not in msg
    with pytest.raises(DatasetError, match=r"lab\.png.*23"):
        L.map_labels(np.array([[23]], dtype=np.uint16), L.synthia_lut(), "lab.png")
    with pytest.raises(DatasetError, match="40000"):
        L.map_labels(np.array([[40000]], dtype=np.uint16), L.synthia_lut(), "lab.png")
    with pytest.raises(DatasetError, match="70000"):
        L.map_labels(np.array([[70000, 1]], dtype=np.int32), L.synthia_lut(), "lab.png")
    with pytest.raises(DatasetError, match="19"):
        L.map_labels(np.array([[19]], dtype=np.uint8), L.train_id_lut(), "t.png")


def test_colorize():
    ids = np.array([[0, 13], [255, 18]], dtype=np.uint8)
    rgb = L.colorize(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[0, 0], [128, 64, 128])
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 142])
    np.testing.assert_array_equal(rgb[1, 0], [0, 0, 0])
    np.testing.assert_array_equal(rgb[1, 1], [119, 11, 32])
    # int64 input with out-of-range values -> black
    np.testing.assert_array_equal(L.colorize(np.array([[-1, 300, 10]])), [[[0, 0, 0], [0, 0, 0], [70, 130, 180]]])
