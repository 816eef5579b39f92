import numpy as np
import pytest
import torch

from segadapt.data import transforms as T


def test_resize_label_nearest_hand_computed():
    lab = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    up = T.resize_label(lab, (4, 2))  # (W, H)
    np.testing.assert_array_equal(up, [[1, 1, 2, 2], [3, 3, 4, 4]])
    big = np.arange(16, dtype=np.uint8).reshape(4, 4)
    # output pixel centre (i + 0.5) * 2 -> source rows/cols 1 and 3
    np.testing.assert_array_equal(T.resize_label(big, (2, 2)), [[5, 7], [13, 15]])
    assert T.resize_label(lab, (2, 2)) is lab
    assert T.resize_label(np.zeros((3, 3), np.uint16), (5, 4)).dtype == np.uint16


def test_resize_image_bicubic_size_and_constant():
    img = np.full((6, 8, 3), 77, dtype=np.uint8)
    out = T.resize_image(img, (5, 3))
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8
    assert (out == 77).all()


def test_pad_and_crop_pads_with_0_and_255():
    img = np.full((2, 3, 3), 9, dtype=np.uint8)
    lab = np.full((2, 3), 4, dtype=np.uint8)
    ci, cl = T.random_crop(img, lab, (4, 3), np.random.default_rng(0))
    assert ci.shape == (3, 4, 3) and cl.shape == (3, 4)
    np.testing.assert_array_equal(cl, [[4, 4, 4, 255], [4, 4, 4, 255], [255, 255, 255, 255]])
    assert (ci[2] == 0).all() and (ci[:, 3] == 0).all() and (ci[:2, :3] == 9).all()


def test_crop_flip_keep_image_and_label_aligned_and_reproducible():
    h, w = 10, 12
    lab = (np.arange(h * w) % 250).reshape(h, w).astype(np.uint8)
    img = np.stack([lab, lab, lab], axis=2)

    def aug(seed):
        rng = np.random.default_rng(seed)
        i, l = T.random_crop(img, lab, (5, 4), rng)
        return T.random_hflip(i, l, rng)

    results = [aug(s) for s in range(8)]
    for i, l in results:
        assert i.shape == (4, 5, 3) and l.shape == (4, 5)
        np.testing.assert_array_equal(i[:, :, 0], l)
    a1, b1 = aug(3)
    a2, b2 = aug(3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert len({l.tobytes() for _, l in results}) > 1
    flipped = [not np.all(np.diff(l.astype(int), axis=1) > 0) for _, l in results]
    assert any(flipped) and not all(flipped)


def test_hflip():
    img = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    lab = np.array([[1, 2]], dtype=np.uint8)
    fi, fl = T.hflip(img, lab)
    np.testing.assert_array_equal(fl, [[2, 1]])
    np.testing.assert_array_equal(fi[0, 0], [3, 4, 5])


def test_to_tensor_and_label_to_tensor():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[0, 1] = [255, 51, 0]
    t = T.to_tensor(img)
    assert t.dtype == torch.float32 and t.shape == (3, 2, 3)
    assert torch.allclose(t[:, 0, 1], torch.tensor([1.0, 0.2, 0.0]))
    lt = T.label_to_tensor(np.array([[255, 3]], dtype=np.uint8))
    assert lt.dtype == torch.int64 and lt.tolist() == [[255, 3]]


def test_normalize_advent_hand_values_and_inverse():
    x = torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.5, 0.0])  # R, G, B
    y = T.normalize_advent(x)
    # -> x*255 = (255, 127.5, 0), BGR = (0, 127.5, 255), minus the BGR mean
    expected = torch.tensor([0 - 104.00698793, 127.5 - 116.66876762, 255 - 122.67891434], dtype=torch.float64)
    assert torch.allclose(y[0, :, 0, 0], expected)
    assert torch.allclose(y[1, :, 0, 1], -torch.tensor([104.00698793, 116.66876762, 122.67891434], dtype=torch.float64))
    assert torch.allclose(T.denormalize_advent(y), x)
    # unbatched (3, H, W) works too
    assert torch.allclose(T.normalize_advent(x[0]), y[0])


def test_normalize_imagenet_hand_values_and_inverse():
    x = torch.tensor([0.485 + 0.229, 0.456, 0.406 - 0.225]).view(1, 3, 1, 1)
    y = T.normalize_imagenet(x)
    assert torch.allclose(y.flatten(), torch.tensor([1.0, 0.0, -1.0]), atol=1e-6)
    x2 = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(T.denormalize_imagenet(T.normalize_imagenet(x2)), x2, atol=1e-6)
    assert torch.allclose(T.normalize(x2, "imagenet"), T.normalize_imagenet(x2))
    assert torch.allclose(T.denormalize(T.normalize(x2, "advent"), "advent"), x2, atol=1e-5)
    with pytest.raises(ValueError, match="advent"):
        T.normalize(x2, "caffe")


def test_dataset_resizes_before_the_random_crop(tmp_path):
    """CONFETI / DAFormer pipelines: resize the whole image, then crop from the resized one."""
    from segadapt.data.datasets import build_dataset

    from .test_datasets import cfg, save

    raw_ids = np.array([7, 8, 11, 12, 13, 17], dtype=np.uint8)  # Cityscapes ids of train ids 0..5
    lab = np.tile(raw_ids[np.arange(12) // 2], (8, 1))  # 8 x 12, train id = column // 2
    save(tmp_path / "images/00000.png", np.zeros((8, 12, 3), np.uint8))
    save(tmp_path / "labels/00000.png", lab)
    ds = build_dataset(cfg("gta5", tmp_path, resize=[6, 4], crop=[3, 2]))
    starts = set()
    for seed in range(20):
        item = ds[(0, seed)]
        assert item["image"].shape == (3, 2, 3)
        row = item["label"][0].tolist()
        # resized to 6 wide (nearest: train id = column), so a crop holds three consecutive ids;
        # cropping the 12-wide original first would repeat ids, e.g. [0, 0, 1]
        assert row == list(range(row[0], row[0] + 3)) and (item["label"] == item["label"][0]).all()
        starts.add(row[0])
    assert starts == {0, 1, 2, 3}


def test_keep_ratio_size_is_mmcv_rescale():
    """factor = min(long scale / long side, short scale / short side), sizes rounded half up."""
    assert T.keep_ratio_size((1914, 1052), (1280, 720)) == (1280, 704)  # GTA5: 1280/1914 < 720/1052
    assert T.keep_ratio_size((2048, 1024), (1024, 512)) == (1024, 512)
    assert T.keep_ratio_size((1280, 760), (1280, 760)) == (1280, 760)
    assert T.keep_ratio_size((100, 300), (60, 30)) == (20, 60)  # portrait: long side 300 -> 60
    assert T.keep_ratio_size((10, 10), (7, 3)) == (3, 3)


def test_dataset_keep_ratio_bilinear_resize(tmp_path):
    from PIL import Image

    from segadapt.data.datasets import build_dataset
    from segadapt.data.transforms import resize_cv2_linear

    from .test_datasets import cfg, save

    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    save(tmp_path / "images/00000.png", img)
    save(tmp_path / "labels/00000.png", np.full((20, 30), 7, np.uint8))
    ds = build_dataset(cfg("gta5", tmp_path, resize=[12, 12], resize_keep_ratio=True, resize_interpolation="bilinear"))
    item = ds[0]
    assert item["image"].shape == (3, 8, 12) and item["label"].shape == (8, 12)  # 30x20 -> 12x8
    # mmcv's resize: OpenCV's INTER_LINEAR, no antialiasing
    assert torch.equal(item["image"], T.to_tensor(resize_cv2_linear(img, 12, 8)))
    pil = build_dataset(cfg("gta5", tmp_path, resize=[12, 12], resize_keep_ratio=True,
                            resize_interpolation="pil_bilinear"))[0]
    expected = np.asarray(Image.fromarray(img).resize((12, 8), Image.BILINEAR))
    assert torch.equal(pil["image"], T.to_tensor(expected))
    with pytest.raises(Exception, match="resize_interpolation"):
        build_dataset(cfg("gta5", tmp_path, resize=[12, 12], resize_interpolation="lanczos"))
