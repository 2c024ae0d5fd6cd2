"""Batch augmentation: shapes, exact op semantics, masks, reproducibility, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightnets.data import AUGMENT_OPS, build_batch_augment
from lightnets.errors import UserError
from tests.data.conftest import crop_offsets

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _batch(n=6, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def test_eval_normalize_matches_formula():
    x = _batch()
    aug = build_batch_augment(["normalize"], mean=MEAN, std=STD)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    out = aug(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(aug(x.float() / 255), expected)  # float input: already [0, 1]


def test_scale_pm1_and_none():
    x = _batch()
    torch.testing.assert_close(build_batch_augment("scale_pm1")(x), x.float() / 127.5 - 1)
    torch.testing.assert_close(build_batch_augment(["none"])(x), x.float() / 255)
    torch.testing.assert_close(build_batch_augment([])(x), x.float() / 255)


def test_pad_crop_is_a_window_of_the_zero_padded_batch():
    x = _batch(n=8)
    torch.manual_seed(0)
    out = build_batch_augment(["pad_crop"], image_size=(12, 10), padding=2)(x)
    assert out.shape == (8, 3, 12, 10)
    assert len(crop_offsets(out, x, pad=2)) > 1  # offsets are drawn per sample


def test_pad_crop_uses_batch_size_without_image_size():
    out = build_batch_augment("pad_crop,hflip,normalize", mean=MEAN, std=STD)(_batch(h=9, w=7))
    assert out.shape == (6, 3, 9, 7)


def test_hflip_forced_and_never():
    x = _batch()
    torch.testing.assert_close(build_batch_augment(["hflip"], flip_p=1.0)(x), x.flip(-1) / 255)
    torch.testing.assert_close(build_batch_augment(["hflip"], flip_p=0.0)(x), x.float() / 255)
    torch.manual_seed(1)
    out = build_batch_augment(["hflip"])(_batch(n=64))
    ref = _batch(n=64).float() / 255
    flipped = [torch.equal(o, r.flip(-1)) for o, r in zip(out, ref)]
    kept = [torch.equal(o, r) for o, r in zip(out, ref)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_random_resized_crop_output_size():
    out = build_batch_augment(["random_resized_crop"], image_size=8, scale=(0.5, 1.0))(_batch())
    assert out.shape == (6, 3, 8, 8)
    full = build_batch_augment(
        ["random_resized_crop"], image_size=(12, 10), scale=(1, 1), ratio=(10 / 12, 10 / 12)
    )(_batch())
    torch.testing.assert_close(full, _batch().float() / 255, atol=1e-5, rtol=0)


def test_same_seed_same_output_and_rng_restore():
    x = _batch(n=16)
    aug = build_batch_augment(
        ["random_resized_crop", "pad_crop", "hflip", "normalize"],
        mean=MEAN,
        std=STD,
        image_size=(12, 10),
    )
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    assert torch.equal(a, b)
    state = torch.get_rng_state()  # what the trainer checkpoints
    c = aug(x)
    torch.set_rng_state(state)
    assert torch.equal(aug(x), c)
    assert not torch.equal(a, c)


def test_train_false_keeps_only_value_ops():
    aug = build_batch_augment(["pad_crop", "hflip", "normalize"], mean=MEAN, std=STD, train=False)
    assert aug.ops == ["normalize"]
    x = _batch()
    torch.testing.assert_close(aug(x), build_batch_augment("normalize", mean=MEAN, std=STD)(x))


def test_mask_gets_the_same_geometry():
    n, h, w = 12, 12, 10
    mask = torch.randint(0, 5, (n, h, w))
    x = (mask[:, None] * 50).repeat(1, 3, 1, 1).to(torch.uint8)  # image pixels = 50 * mask
    # pad_crop + hflip move whole pixels: image and mask must agree exactly
    aug = build_batch_augment(["pad_crop", "hflip"], padding=3, mask_fill=255)
    torch.manual_seed(0)
    out, m = aug(x, mask[:, None])
    assert m.shape == (n, 1, h, w) and m.dtype == torch.long
    inside = m[:, 0] != 255
    assert (~inside).any() and inside.any()
    assert torch.equal((out[:, 0] * 255 / 50).round().long()[inside], m[:, 0][inside])
    assert (out[:, 0][~inside] == 0).all()


@pytest.mark.parametrize("axis", [-1, -2])
def test_mask_follows_random_resized_crop(axis):
    """Stripes along one axis: the nearest-resampled mask stays within one stripe of the
    bilinear image everywhere, which fails if the two were cropped or flipped differently."""
    n, h, w = 16, 12, 12
    stripes = torch.arange(w if axis == -1 else h) // 2  # values 0..5
    mask = (stripes.view(1, -1) if axis == -1 else stripes.view(-1, 1)).expand(h, w)
    mask = mask.repeat(n, 1, 1)
    x = (mask[:, None] * 40).repeat(1, 3, 1, 1).to(torch.uint8)
    aug = build_batch_augment(
        ["hflip", "random_resized_crop"], image_size=(8, 10), scale=(0.2, 0.6)
    )
    torch.manual_seed(0)
    out, m = aug(x, mask)
    assert m.shape == (n, 8, 10) and m.dtype == torch.long
    assert set(m.unique().tolist()) <= set(range(6))
    img = out[:, 0] * 255 / 40
    assert ((img - m).abs() <= 1 + 1e-4).all()
    assert ((img - m).abs() < 1e-4).float().mean() > 0.5  # mostly inside a stripe: equal


def test_mask_passes_through_value_ops():
    mask = torch.randint(0, 3, (6, 12, 10), dtype=torch.uint8)
    out, m = build_batch_augment(["normalize"], mean=MEAN, std=STD)(_batch(), mask)
    assert m is mask and out.shape == (6, 3, 12, 10)


def test_unknown_op_and_option():
    with pytest.raises(UserError) as err:
        build_batch_augment(["pad_crop", "hfilp"])
    msg = str(err.value)
    assert "'hfilp'" in msg and "did you mean 'hflip'" in msg
    assert all(op in msg for op in AUGMENT_OPS)
    with pytest.raises(UserError, match="unknown augmentation option 'pading'"):
        build_batch_augment(["pad_crop"], pading=4)
    with pytest.raises(UserError, match="padding >= 0"):
        build_batch_augment(["pad_crop"], padding=-1)


def test_normalize_needs_stats_matching_channels():
    with pytest.raises(UserError, match="needs the per-channel mean and std"):
        build_batch_augment(["normalize"])
    aug = build_batch_augment(["normalize"], mean=(0.1307,), std=(0.3081,))
    with pytest.raises(UserError, match="1 mean/std values but the batch has 3 channels"):
        aug(_batch())


# ---------------------------------------------------------------------------- random_scale/crop
def _windows(t: torch.Tensor, size: int):
    """Every (dy, dx) window of size x size of the last two dims."""
    for dy in range(t.shape[-2] - size + 1):
        for dx in range(t.shape[-1] - size + 1):
            yield dy, dx, t[..., dy : dy + size, dx : dx + size]


@pytest.mark.parametrize("scale, crop", [(2.0, 12), (1.3, 16), (0.7, 10), (0.5, 8), (0.35, 12)])
def test_random_scale_crop_is_interpolate_then_a_window(scale, crop):
    """Independent reference: F.interpolate (bilinear image, nearest-exact mask) to
    round(20 * scale), padded with fill / mask_fill where smaller than the crop; each output
    is one window of it, the mask's window at the same place as the image's."""
    n, size = 6, 20
    x = _batch(n=n, h=size, w=size, seed=3)
    mask = torch.randint(0, 3, (n, size, size), generator=torch.Generator().manual_seed(4))
    aug = build_batch_augment(
        ["random_scale", "random_crop"],
        image_size=crop,
        scale_range=(scale, scale),
        fill=0.25,
        mask_fill=255,
    )
    torch.manual_seed(0)
    out, m = aug(x, mask)
    assert out.shape == (n, 3, crop, crop) and m.shape == (n, crop, crop) and m.dtype == torch.long
    side = round(size * scale)
    ref = F.interpolate(x.float() / 255, size=(side, side), mode="bilinear", align_corners=False)
    ref_m = F.interpolate(mask[:, None].float(), size=(side, side), mode="nearest-exact")[:, 0]
    pad = max(0, crop - side)
    ref = F.pad(ref, (pad,) * 4, value=0.25)
    ref_m = F.pad(ref_m, (pad,) * 4, value=255).long()
    for i in range(n):
        found = [
            (dy, dx)
            for dy, dx, win in _windows(ref[i], crop)
            if torch.allclose(out[i], win, atol=1e-5, rtol=0)
        ]
        assert len(found) == 1, f"sample {i}: not one window of the scaled image"
        dy, dx = found[0]
        assert torch.equal(m[i], ref_m[i, dy : dy + crop, dx : dx + crop])
    if pad:
        assert (m == 255).any() and ((m == 255) == (out == 0.25).all(1)).all()


def test_random_crop_alone_copies_pixels_and_pads_with_ignore_index():
    x = _batch(n=8, h=12, w=10)
    mask = torch.randint(0, 2, (8, 12, 10))
    torch.manual_seed(0)
    out, m = build_batch_augment(["random_crop"], image_size=(7, 6))(x, mask)
    offsets = set()
    for i in range(8):
        found = [
            (dy, dx)
            for dy in range(6)
            for dx in range(5)
            if torch.equal(out[i], x[i, :, dy : dy + 7, dx : dx + 6].float() / 255)
        ]
        assert found and torch.equal(
            m[i], mask[i, found[0][0] : found[0][0] + 7, found[0][1] :][:, :6]
        )
        offsets.add(found[0])
    assert len(offsets) > 1
    # a crop larger than the image: the image lands somewhere inside, the rest is padding
    out, m = build_batch_augment(["random_crop"], image_size=16)(x, mask)
    assert out.shape == (8, 3, 16, 16) and m.shape == (8, 16, 16)
    assert ((m == -100).sum((1, 2)) == 16 * 16 - 12 * 10).all()
    assert (out.sum(1)[m == -100] == 0).all()


def test_paper_recipe_on_tiles_keeps_image_and_mask_aligned():
    """250x250 tiles -> scale in [0.5, 2] -> 125x125 crop -> flip: the image painted from the
    mask agrees with the mask wherever the mask is locally constant (bilinear is exact there),
    no padding is needed (250 * 0.5 >= 125), and about half of the samples are flipped."""
    n = 64
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 3, (n, 25, 25), generator=g)
    mask = blocks.repeat_interleave(10, 1).repeat_interleave(10, 2)  # 10x10 px blocks
    x = torch.empty(n, 3, 250, 250, dtype=torch.uint8)
    x[:, 0] = mask * 100  # channel 0: painted from the mask
    x[:, 1] = torch.arange(250).view(1, 1, 250)  # channel 1: column ramp, shows flips
    x[:, 2] = 0
    aug = build_batch_augment(["random_scale", "random_crop", "hflip"], image_size=125)
    torch.manual_seed(1)
    out, m = aug(x, mask)
    assert out.shape == (n, 3, 125, 125) and m.shape == (n, 125, 125)
    assert set(m.unique().tolist()) <= {0, 1, 2}  # nothing padded
    # 3x3 neighbourhoods inside the crop (the crop's border pixels have no full one)
    mf = m[:, None].float()
    constant = F.max_pool2d(mf, 3, 1) == -F.max_pool2d(-mf, 3, 1)  # (n, 1, 123, 123)
    img = (out[:, :1] * 255 / 100)[:, :, 1:-1, 1:-1]
    assert constant.float().mean() > 0.5
    assert torch.allclose(img[constant], mf[:, :, 1:-1, 1:-1][constant], atol=1e-4)
    flipped = out[:, 1, :, 0].mean(1) > out[:, 1, :, -1].mean(1)
    assert 16 <= int(flipped.sum()) <= 48  # flip_p = 0.5 of 64 samples
    # evaluation: no random op is left, whole tiles pass through unchanged
    ev = build_batch_augment(["random_scale", "random_crop", "hflip"], image_size=125, train=False)
    full, fm = ev(x[:2], mask[:2])
    assert full.shape == (2, 3, 250, 250) and torch.equal(fm, mask[:2])


def test_random_scale_needs_random_crop_and_valid_range():
    with pytest.raises(UserError, match="'random_scale' is followed by 'hflip': expected"):
        build_batch_augment(["random_scale", "hflip", "random_crop"])
    with pytest.raises(UserError, match="followed by 'nothing'"):
        build_batch_augment(["random_scale"])
    with pytest.raises(UserError, match="scale_range"):
        build_batch_augment(["random_scale", "random_crop"], scale_range=(2.0, 0.5))
    aug = build_batch_augment(["random_scale", "random_crop", "normalize"], MEAN, STD, train=False)
    assert aug.ops == ["normalize"]


def test_random_scale_crop_reproducible():
    x = _batch(n=8, h=20, w=20)
    aug = build_batch_augment(["random_scale", "random_crop", "hflip"], image_size=10)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert torch.equal(a, aug(x)) and a.shape == (8, 3, 10, 10)


# ---------------------------------------------------------------------------- per-op parameters
def test_per_op_parameters_are_used_and_described():
    """{pad_crop = {padding = 2}}: a window of the 2-pixel padded image (offsets 0..4), where
    the default pads 4; hflip's p per op; describe_augment writes every parameter out."""
    from lightnets.data import describe_augment

    x = _batch(n=64)
    torch.manual_seed(0)
    out = build_batch_augment([{"pad_crop": {"padding": 2}}, {"hflip": {"p": 0.0}}])(x)
    assert len(crop_offsets(out, x, pad=2)) > 5  # drawn per sample among the 25
    assert describe_augment([{"pad_crop": {"padding": 2}}, "hflip", "normalize"]) == [
        {"pad_crop": {"padding": 2, "fill": 0.0}},
        {"hflip": {"p": 0.5}},
        "normalize",
    ]
    assert describe_augment("random_scale,random_crop") == [
        {"random_scale": {"scale_range": [0.5, 2.0]}},
        {"random_crop": {"fill": 0.0}},
    ]
    # a keyword option is a default for every op that has the parameter; per op wins
    aug = build_batch_augment([{"pad_crop": {"padding": 1}}, "pad_crop"], padding=3)
    assert [op.params["padding"] for op in aug.op_list] == [1, 3]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ([{"pad_crop": {"pading": 2}}], "'pad_crop' has no parameter 'pading' (did you mean"),
        ([{"hflip": {"p": 2}}], "p=2 is invalid: expected 0 <= p <= 1"),
        ([{"pad_crop": {"padding": 1.5}}], "padding=1.5 is invalid"),
        ([{"normalize": {"x": 1}}], "'normalize' has no parameter 'x': it takes none"),
        ([{"pad_crop": {}, "hflip": {}}], "expected one op per table"),
        ([{"pad_crop": 2}], "parameters 2 are invalid: expected a table"),
        ([{"hflp": {}}], "unknown augmentation 'hflp' (did you mean 'hflip'?)"),
        ([{"random_resized_crop": {"scale": [0.5]}}], "scale=[0.5] is invalid"),
    ],
)
def test_per_op_parameter_errors(spec, fragment):
    with pytest.raises(UserError) as err:
        build_batch_augment(spec)
    assert fragment in str(err.value)


def test_recipe_and_command_line_take_per_op_parameters():
    from lightnets.engine.config import load_config

    config = load_config(
        "mnist_cnn", ['data.augment=[{pad_crop = {padding = 2}}, "hflip", "normalize"]']
    )
    assert config.data.augment == [{"pad_crop": {"padding": 2}}, "hflip", "normalize"]
    with pytest.raises(UserError, match=r"config value data.augment: .*no parameter 'pading'"):
        load_config("mnist_cnn", ["data.augment=[{pad_crop = {pading = 2}}]"])


def test_per_op_parameters_survive_the_saved_config(tmp_path):
    from lightnets.engine.config import load_config, save_config

    config = load_config("mnist_cnn", ['data.augment=[{pad_crop = {padding = 2}}, "normalize"]'])
    save_config(config, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again.data.augment == config.data.augment
