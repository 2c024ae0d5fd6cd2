"""The synthetic building scenes: deterministic, balanced like the real tiles, masks on roofs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightnets.data import load_dataset, render_scene
from lightnets.data.synthetic_buildings import SYNTHETIC_MEAN, SYNTHETIC_STD, scene_rng
from lightnets.engine.metrics import correct_predictions
from lightnets.errors import UserError


def test_items_shapes_and_attributes():
    ds = load_dataset("synthetic_buildings", split="val", size=64, length=3)
    assert len(ds) == 3 and ds.image_size == (64, 64) and ds.targets is None
    assert ds.num_classes == 2 and ds.in_chans == 3 and ds.classes == ["background", "building"]
    assert ds.mean == SYNTHETIC_MEAN and ds.std == SYNTHETIC_STD
    x, mask = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
    assert mask.dtype == torch.int64 and mask.shape == (64, 64)
    assert set(mask.unique().tolist()) == {0, 1}
    assert torch.equal(ds[-1][0], ds[2][0])
    with pytest.raises(IndexError):
        ds[3]
    lengths = {
        s: len(load_dataset("synthetic_buildings", split=s)) for s in ("train", "val", "test")
    }
    assert lengths == {"train": 200, "val": 50, "test": 50}
    assert len(load_dataset("synthetic_buildings", split="valid", length=2)) == 2


def test_deterministic_in_seed_split_and_index():
    a = load_dataset("synthetic_buildings", split="train", size=96, length=4, seed=3)
    b = load_dataset("synthetic_buildings", split="train", size=96, length=4, seed=3)
    for i in (3, 1):  # any order, any instance: same bytes
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], a[1][0])
    other_seed = load_dataset("synthetic_buildings", split="train", size=96, length=4, seed=4)
    other_split = load_dataset("synthetic_buildings", split="test", size=96, length=4, seed=3)
    assert not torch.equal(a[0][0], other_seed[0][0])
    assert not torch.equal(a[0][0], other_split[0][0])
    image, mask = render_scene(scene_rng(3, "train", 1), 96)
    assert np.array_equal(image, a[1][0].numpy()) and np.array_equal(mask, a[1][1].numpy() == 1)
    cached = load_dataset("synthetic_buildings", size=96, length=4, seed=3, cache=True)
    assert cached[2][0] is cached[2][0] and torch.equal(cached[2][1], a[2][1])


def test_building_fraction_like_massachusetts():
    fractions = [render_scene(scene_rng(0, "train", i), 250)[1].mean() for i in range(16)]
    assert all(0.09 <= f <= 0.27 for f in fractions), fractions
    assert 0.12 <= float(np.mean(fractions)) <= 0.22


def _edge_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean colour difference of neighbours across the mask's edge over that of neighbours
    both inside the mask: high when the mask's edges are the image's edges."""
    img = image.astype(np.float64)
    across, within = [], []
    for axis in (1, 2):
        diff = np.abs(np.diff(img, axis=axis)).sum(0)
        m0, m1 = (mask[:-1], mask[1:]) if axis == 1 else (mask[:, :-1], mask[:, 1:])
        across.append(diff[m0 != m1])
        within.append(diff[m0 & m1])
    return float(np.concatenate(across).mean() / np.concatenate(within).mean())


def test_mask_is_the_roofs_not_the_shadows():
    for i in range(4):
        image, mask, layers = render_scene(scene_rng(0, "test", i), 250, layers=True)
        shadow = layers["shadow"]
        assert shadow.any() and not (shadow & mask).any()
        ground = ~(mask | shadow | layers["road"] | layers["tree"])
        luma = image.astype(np.float64).mean(0)
        assert luma[shadow].mean() < 0.7 * luma[ground].mean()
        # the mask fits the roofs' colour edges better than the mask moved by one pixel, or
        # the mask with the shadows added
        others = [np.roll(mask, d, axis=a) for a in (0, 1) for d in (1, -1)] + [mask | shadow]
        best_other = max(_edge_contrast(image, m) for m in others)
        assert _edge_contrast(image, mask) > 1.05 * best_other


def test_mean_and_std_constants():
    images = np.stack([render_scene(scene_rng(0, "train", i), 250)[0] for i in range(40)])
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(pixels.mean(1), SYNTHETIC_MEAN, atol=0.02)
    np.testing.assert_allclose(pixels.std(1), SYNTHETIC_STD, atol=0.02)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"root": "/data"}, "reads no files"),
        ({"split": "holdout"}, "has no split 'holdout'"),
        ({"size": 8}, "size=8: expected an int >= 16"),
        ({"length": 0}, "length=0"),
        ({"seed": -1}, "seed=-1"),
        ({"sise": 64}, "did you mean 'size'"),
    ],
)
def test_bad_options(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        load_dataset("synthetic_buildings", **kwargs)


class _TinySegNet(torch.nn.Module):
    """Two convs: enough to show the data path end to end without the U-Net."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)
        )

    def forward(self, x):
        return self.body(x)


def test_two_segmentation_steps_on_synthetic_buildings(tmp_path):
    """Trainer(task="segmentation") on synthetic_buildings with the paper's augmentation
    (scale, crop to 32x32 from 64x64 scenes, flip) and whole-scene evaluation."""
    from lightnets.engine import Trainer, load_config

    config = load_config(
        {
            "model": {"name": "mnist_cnn"},  # replaced by the model passed below
            "data": {
                "name": "synthetic_buildings",
                "val_split": "val",
                "batch_size": 4,
                "image_size": [32, 32],
                "augment": ["random_scale", "random_crop", "hflip", "normalize"],
                "eval_augment": ["normalize"],
                "args": {"size": 64, "length": 8},
            },
            "optim": {"name": "sgd", "lr": 0.01},
            "train": {"task": "segmentation", "max_steps": 2, "progress": False},
            "output": {"plot": False},
        }
    )
    trainer = Trainer(config, tmp_path / "run", model=_TinySegNet())
    seen = []
    real_step = trainer.train_step

    def spy(x, y):
        seen.append((tuple(x.shape), tuple(y.shape), y.dtype))
        return real_step(x, y)

    trainer.train_step = spy
    row = trainer.fit()
    assert seen == [((4, 3, 32, 32), (4, 32, 32), torch.int64)] * 2
    assert row["step"] == 2 and np.isfinite(row["train_loss"])
    assert {"val_miou", "val_pixel_acc", "val_mean_acc"} <= set(row)
    assert 0.0 <= row["val_pixel_acc"] <= 100.0
    assert 0.0 < row["train_pixel_acc"] <= 100.0  # the progress bar's acc, not a constant 0
    # by hand: image 0 has 3 of 4 pixels right, image 1 its one labelled pixel; the others
    # are padding (-100, what augmentation fills in when ignore_index is unset)
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])  # class 1
    output = torch.stack([logits, logits])
    target = torch.tensor([[[1, 1], [1, 0]], [[-100, -100], [1, -100]]])
    assert trainer.config.train.ignore_index is None
    correct, counted = correct_predictions(output, target, "segmentation", None)
    assert (float(correct), float(counted)) == (4.0, 5.0)  # 4 of 5 labelled pixels
    padded = target.where(target >= 0, 255)
    correct, counted = correct_predictions(output, padded, "segmentation", 255)
    assert (float(correct), float(counted)) == (4.0, 5.0)
