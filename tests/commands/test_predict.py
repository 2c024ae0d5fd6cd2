"""`lightnets predict`: sliding-window segmentation of images of any size, mask + overlay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightnets.cli import main
from lightnets.commands.predict import sliding_window_logits, window_starts

TRAIN = [
    "model.args.widths=[4, 8, 16]",
    "data.args={size = 32, length = 4, seed = 0}",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.image_size=[24, 24]",
    "train.max_steps=2",
    "train.progress=false",
    "output.plot=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A res_unet run dir of 2 training steps on synthetic scenes (widths 4/8/16)."""
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config

    path = tmp_path_factory.mktemp("run") / "seg"
    Trainer(load_config("res_unet_synthetic", TRAIN), path).fit()
    return path


def _image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_window_starts_cover_and_align():
    assert window_starts(10, 10, 5) == [0]
    assert window_starts(8, 10, 5) == [0]
    assert window_starts(70, 24, 18) == [0, 18, 36, 46]
    for size, win, stride in [(53, 24, 18), (100, 7, 3), (25, 24, 1)]:
        starts = window_starts(size, win, stride)
        assert starts[0] == 0 and starts[-1] == size - win
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_sliding_window_equals_full_forward_when_one_window():
    import lightnets as ln

    torch.manual_seed(0)
    model = ln.create_model("res_unet", widths=[4, 8, 16]).eval()
    x = torch.randn(1, 3, 53, 70)
    full = model(x)
    for tile in (70, 100, (53, 70)):
        got = sliding_window_logits(model, x, tile, overlap=8)
        torch.testing.assert_close(got, full)
    tiled = sliding_window_logits(model, x, 24, overlap=6, batch_size=3)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()


class _Pixelwise(torch.nn.Module):
    """A 3-class per-pixel model with a little context (a 3x3 conv): window edges matter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "size, tile, overlap, batch",
    [((53, 70), 24, 6, 3), ((130, 41), (16, 20), 4, 2), ((9, 9), 24, 6, 8), ((200, 17), 10, 0, 5)],
)
def test_the_bounded_memory_mask_is_the_argmax_of_the_averaged_logits(size, tile, overlap, batch):
    """sliding_window_mask (uint8 windows, a band of logits) against the whole-image
    reference: the transform applied to the whole image, all logits kept, then the argmax."""
    from lightnets.commands.predict import sliding_window_mask
    from lightnets.data import build_batch_augment

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=g)
    transform = build_batch_augment(["normalize"], mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    model = _Pixelwise().eval()
    want = sliding_window_logits(model, transform(image), tile, overlap, batch).argmax(1)[0]
    got = sliding_window_mask(model, image, transform, tile, overlap, batch)
    assert got.dtype == torch.uint8 and got.shape == size
    assert torch.equal(got.long(), want)


def test_overlay_tints_buildings_cyan_and_outlines_them():
    from lightnets.commands.predict import OVERLAY_EDGE, overlay

    rgb = np.full((9, 9, 3), 100, dtype=np.uint8)
    building = np.zeros((9, 9), dtype=bool)
    building[2:7, 2:7] = True
    out = overlay(rgb, building)
    assert (out[~building] == 100).all()  # background untouched
    assert tuple(out[2, 4]) == OVERLAY_EDGE and tuple(out[6, 2]) == OVERLAY_EDGE  # the outline
    inside = out[4, 4]
    assert inside[2] > inside[0] and tuple(inside) != OVERLAY_EDGE  # tinted towards cyan
    # bands of rows give the same picture as one pass (the outline crosses band borders)
    import lightnets.commands.predict as predict

    big = np.zeros((50, 7), dtype=bool)
    big[10:40, 2:5] = True
    once = overlay(np.full((50, 7, 3), 90, np.uint8), big)
    saved, predict.OVERLAY_ROWS = predict.OVERLAY_ROWS, 7
    try:
        assert np.array_equal(overlay(np.full((50, 7, 3), 90, np.uint8), big), once)
    finally:
        predict.OVERLAY_ROWS = saved


def test_sliding_window_averages_overlaps():
    class Ones(torch.nn.Module):  # logits = [1 + window index, 0]: the average is checkable
        calls = 0

        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            for i in range(x.shape[0]):
                Ones.calls += 1
                out[i, 0] = Ones.calls
            return out

    x = torch.zeros(1, 3, 1, 10)
    got = sliding_window_logits(Ones(), x, (1, 6), overlap=2, batch_size=1)
    # width padded by 1 px of reflection on each side (12 px): windows [0, 6) -> 1,
    # [4, 10) -> 2, [6, 12) -> 3 on the padded row; no padding in height (it fits one window)
    assert got.shape == (1, 2, 1, 10)
    want = [1, 1, 1, 1.5, 1.5, 2.5, 2.5, 2.5, 2.5, 3]
    assert got[0, 0, 0].tolist() == pytest.approx(want)
    assert Ones.calls == 3


def test_predict_odd_size_writes_mask_and_overlay(run_dir, tmp_path, capsys):
    img = _image(tmp_path / "scene.png", 53, 70)
    assert main(["predict", str(run_dir), str(img)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["size"] == [53, 70] and report["tile"] == [24, 24] and report["overlap"] == 6
    mask = Image.open(tmp_path / "scene_mask.png")
    overlay = Image.open(tmp_path / "scene_overlay.png")
    assert mask.size == (70, 53) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert overlay.size == (70, 53) and overlay.mode == "RGB"
    # pixels predicted background are the original image in the overlay
    m, o = np.asarray(mask) == 0, np.asarray(overlay)
    assert np.array_equal(o[m], np.asarray(Image.open(img).convert("RGB"))[m])
    # refuses to overwrite, then overwrites
    assert main(["predict", str(run_dir), str(img)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(img), "--overwrite", "--tile", "80"]) == 0


def test_predict_single_window_matches_full_pass(run_dir, tmp_path):
    from lightnets.commands import load_checkpoint_model
    from lightnets.data.synthetic_buildings import SYNTHETIC_MEAN, SYNTHETIC_STD

    img = _image(tmp_path / "a.png", 31, 45, seed=1)
    out = tmp_path / "out" / "a"
    assert main(["predict", str(run_dir), str(img), "--tile", "64", "--out", str(out)]) == 0
    model, _ = load_checkpoint_model(run_dir / "last.pt")
    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(SYNTHETIC_MEAN)[:, None, None]) / torch.tensor(SYNTHETIC_STD)[
        :, None, None
    ]
    with torch.no_grad():
        want = (model.eval()(x).argmax(1)[0] == 1).numpy().astype(np.uint8) * 255
    assert np.array_equal(np.asarray(Image.open(f"{out}_mask.png")), want)


def test_predict_errors_exit_2(run_dir, tmp_path, capsys):
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config

    assert main(["predict", str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert main(["predict", str(run_dir), str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    deep = tmp_path / "deep.tif"  # 16-bit: Pillow would clip it to white, so it is refused
    Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 150).save(deep)
    assert main(["predict", str(run_dir), str(deep)]) == 2
    assert "more than 8 bits a channel" in capsys.readouterr().err
    img = _image(tmp_path / "x.png", 20, 20)
    assert main(["predict", str(tmp_path / "norun"), str(img)]) == 2
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(img), "--overlap", "40"]) == 2
    assert "--overlap" in capsys.readouterr().err
    cls = tmp_path / "cls"
    cfg = ["model.args.width=8", "train.max_steps=1", "schedule.warmup=0"]
    cfg += ["train.progress=false", "output.plot=false"]
    Trainer(load_config("mnist_cnn", cfg), cls).fit()
    assert main(["predict", str(cls), str(img)]) == 2
    assert "expected a segmentation run" in capsys.readouterr().err


def test_export_segmentation_run_onnx(run_dir, tmp_path, capsys):
    """`lightnets export` on a res_unet run: fused ONNX checked by onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "seg.onnx"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "any height and width" in capsys.readouterr().out
    # the file takes any image size (segmentation runs export with symbolic H and W)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((1, 3, 61, 45), dtype=np.float32)
    assert session.run(None, {"input": image})[0].shape == (1, 2, 61, 45)
    fixed = tmp_path / "fixed.onnx"
    assert main(["export", str(run_dir), "--out", str(fixed), "--static-size"]) == 0
    assert "fixed height and width" in capsys.readouterr().out
    shape = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert all(isinstance(n, int) for n in shape.shape[1:])


def test_the_transform_runs_where_its_buffers_are_the_model_where_its_weights_are():
    """With the model on CUDA, windows went to the GPU before the transform, whose mean / std
    stay on the CPU: a device mismatch. The meta device stands in for the GPU here."""
    from lightnets.commands.predict import sliding_window_mask

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen: set[str] = set()

        def forward(self, x):
            self.seen.add(x.device.type)
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    class Normalize(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))

        def forward(self, x):
            assert x.device == self.mean.device, f"the transform got its input on {x.device}"
            return x.float() / 255 - self.mean

    image = torch.randint(0, 256, (1, 3, 20, 30), dtype=torch.uint8)
    model = Model()
    mask = sliding_window_mask(model, image, Normalize(), 12, 4, batch_size=3)
    assert model.seen == {"meta"} and mask.shape == (20, 30)


def test_the_image_is_read_into_one_copy_shared_by_model_input_and_overlay(tmp_path):
    from lightnets.commands.predict import _read_image

    img = _image(tmp_path / "a.png", 21, 34, seed=2)
    x, rgb = _read_image(img, 3)
    want = np.asarray(Image.open(img).convert("RGB"))
    assert x.shape == (1, 3, 21, 34) and x.dtype == torch.uint8
    assert np.array_equal(rgb, want) and np.array_equal(x[0].permute(1, 2, 0).numpy(), want)
    assert np.shares_memory(x.numpy(), rgb)  # no second copy of the pixels
    gray, _ = _read_image(img, 1)
    assert gray.shape == (1, 1, 21, 34)
    assert np.array_equal(gray[0, 0].numpy(), np.asarray(Image.open(img).convert("L")))


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_half_file(
    run_dir, tmp_path, capsys, monkeypatch
):
    import errno

    img = _image(tmp_path / "scene.png", 30, 30)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "overlay" in str(fp):
            real_save(self, fp, *args, **kwargs)  # written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert main(["predict", str(run_dir), str(img)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "scene_overlay.png" in err[0]
    assert "No space left" in err[0]
    assert (tmp_path / "scene_mask.png").is_file()  # written before, whole
    assert not (tmp_path / "scene_overlay.png").exists()
    assert not list(tmp_path.glob(".*.tmp"))
