"""Image folders (ImageNet layout) and the per-sample transforms, on tiny images made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightnets.data import (
    ImageFolderDataset,
    RandomResizedCrop,
    ResizeCenterCrop,
    load_dataset,
    pil_to_tensor,
)
from lightnets.errors import UserError


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def _make_tree(root, splits=("train", "val"), classes=("dog", "cat", "bird"), per_class=2):
    """root/<split>/<class>/img<i>.<ext>, images of different sizes and formats."""
    exts = [".png", ".jpg", ".bmp", ".webp", ".tiff"]
    k = 0
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                _image(20 + 3 * k, 14 + 2 * k, seed=k).save(d / f"img{i}{exts[k % len(exts)]}")
                k += 1
    (root / "train" / "notes.txt").write_text("not a class")  # files beside classes are ignored


def test_folder_layout_and_attributes(tmp_path):
    _make_tree(tmp_path)
    (tmp_path / "train" / "cat" / "readme.md").write_text("ignored: not an image")
    ds = load_dataset("folder", root=str(tmp_path), split="train", image_size=16)
    assert ds.classes == ["bird", "cat", "dog"]  # sorted
    assert len(ds) == 6 and ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.num_classes == 3 and ds.in_chans == 3 and ds.image_size == (16, 16)
    assert len(ds.mean) == len(ds.std) == 3
    assert isinstance(ds.transform, RandomResizedCrop)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == ds.targets[i]
    val = load_dataset("folder", root=tmp_path, split="val", image_size=16)
    assert isinstance(val.transform, ResizeCenterCrop) and val.transform.resize == 18
    assert val[0][0].shape == (3, 16, 16)
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16)


def test_folder_split_none_reads_root_directly(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    ds = load_dataset("folder", root=tmp_path / "train", split=None, image_size=8)
    assert ds.classes == ["bird", "cat", "dog"] and ds[0][0].shape == (3, 8, 8)


def test_folder_pixels_with_identity_transform(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    img = _image(7, 5, seed=3)
    img.save(d / "x.png")
    _image(4, 4, seed=4, mode="L").save(d / "y.png")  # grayscale comes back as RGB
    ds = ImageFolderDataset(tmp_path, transform=pil_to_tensor)
    x, _ = ds[0]
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(img))
    gray, _ = ds[1]
    assert gray.shape == (3, 4, 4) and torch.equal(gray[0], gray[2])
    assert ds.image_size is None


def test_missing_empty_and_unreadable(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    with pytest.raises(UserError, match=r"val does not exist.*\(train\)"):
        load_dataset("folder", root=tmp_path, split="val")
    with pytest.raises(UserError, match="needs root"):
        load_dataset("folder")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_dataset("folder", root=tmp_path)
    assert str(tmp_path / "train" / "empty") in str(err.value)
    (tmp_path / "train" / "empty").rmdir()
    bad = tmp_path / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = load_dataset("folder", root=tmp_path, split="train", image_size=8)
    index = [str(p) for p, _ in ds.samples].index(str(bad))
    with pytest.raises(UserError) as err:
        ds[index]
    assert str(bad) in str(err.value)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        load_dataset("folder", root=nothing, split=None)


def test_random_resized_crop_full_image_equals_resize():
    img = _image(30, 20, seed=1)
    ratio = 30 / 20
    t = RandomResizedCrop((10, 12), scale=(1.0, 1.0), ratio=(ratio, ratio))
    expected = np.asarray(img.resize((12, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(t(img).permute(1, 2, 0).numpy(), expected)


def test_random_resized_crop_params_follow_the_ranges():
    t = RandomResizedCrop(8, scale=(0.2, 0.5), ratio=(0.5, 2.0), generator=torch.Generator())
    t.generator.manual_seed(0)
    for _ in range(200):
        top, left, h, w = t.params(100, 80)
        assert 0 <= top <= 80 - h and 0 <= left <= 100 - w
        assert 0.2 * 8000 * 0.9 <= h * w <= 0.5 * 8000 * 1.1
        assert 0.5 * 0.85 <= w / h <= 2.0 * 1.15
    # impossible ratio: falls back to the central crop clamped to the ratio range
    tall = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(3.0, 3.0))
    assert tall.params(30, 30) == (10, 0, 10, 30)


def test_random_resized_crop_randomness_is_reproducible():
    img = _image(40, 30, seed=2)
    a = RandomResizedCrop(8, generator=torch.Generator().manual_seed(5))
    b = RandomResizedCrop(8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a(img), b(img)) for _ in range(5))
    g = RandomResizedCrop(8)  # global RNG
    torch.manual_seed(3)
    first = [g(img) for _ in range(3)]
    torch.manual_seed(3)
    assert all(torch.equal(x, g(img)) for x in first)
    assert not all(torch.equal(first[0], x) for x in first[1:])


def test_resize_center_crop_matches_manual_reference():
    img = _image(40, 20, seed=6)  # width 40, height 20
    out = ResizeCenterCrop(resize=16, crop=12)(img)
    resized = np.asarray(img.resize((32, 16), Image.Resampling.BILINEAR))  # shorter side 16
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), resized[2:14, 10:22])
    portrait = ResizeCenterCrop(resize=10, crop=(10, 6))(_image(15, 45))
    assert portrait.shape == (3, 10, 6)
    with pytest.raises(UserError, match="crop <= resize"):
        ResizeCenterCrop(resize=10, crop=12)


def test_default_transforms():
    from lightnets.data.folder import default_transform

    train = default_transform("train", 224)
    assert isinstance(train, RandomResizedCrop) and train.size == (224, 224)
    assert train.scale == (0.08, 1.0) and train.ratio == (3 / 4, 4 / 3)
    val = default_transform("val", 224)
    assert isinstance(val, ResizeCenterCrop) and (val.resize, val.size) == (256, (224, 224))
