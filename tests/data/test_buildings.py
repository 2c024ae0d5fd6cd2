"""Massachusetts Buildings: both raw layouts, the errors, and `lightnets data tile`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightnets.cli import main
from lightnets.data import buildings as buildings_module
from lightnets.data import load_dataset, tile_buildings
from lightnets.data.folder import IMAGENET_MEAN, IMAGENET_STD
from lightnets.errors import UserError

SPLIT_COUNTS = {"train": 3, "val": 1, "test": 2}


def _scene(rng: np.random.Generator, size: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, 3-channel label with building = 255) with a few rectangles."""
    image = rng.integers(0, 250, (size, size, 3), dtype=np.uint8)  # never pure white
    label = np.zeros((size, size, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size - 10, 2)
        h, w = rng.integers(3, 10, 2)
        label[y : y + h, x : x + w] = 255
    return image, label


def write_buildings(
    root: Path, layout: str = "labels", size: int = 60, seed: int = 0
) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Small dataset in the `{split}` + `{split}_labels` layout or the `{split}/{sat,map}` one
    (with `valid`); returns {split: [(stem, image, building mask bool)]} sorted by stem."""
    rng = np.random.default_rng(seed)
    written: dict[str, list] = {}
    for split, count in SPLIT_COUNTS.items():
        if layout == "labels":
            image_dir, label_dir = root / split, root / f"{split}_labels"
        else:
            folder = "valid" if split == "val" else split
            image_dir, label_dir = root / folder / "sat", root / folder / "map"
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        written[split] = []
        for i in range(count):
            stem = f"{22678915 + 7 * i}_15"
            image, label = _scene(rng, size)
            Image.fromarray(image).save(image_dir / f"{stem}.tiff", format="TIFF")
            Image.fromarray(label).save(label_dir / f"{stem}.tif", format="TIFF")
            written[split].append((stem, image, label[:, :, 0] == 255))
    return written


@pytest.mark.parametrize("layout", ["labels", "sat_map"])
def test_reads_both_layouts(tmp_path, layout):
    written = write_buildings(tmp_path, layout)
    for split in ("train", "val", "test"):
        ds = load_dataset("buildings", root=tmp_path, split=split)
        assert len(ds) == SPLIT_COUNTS[split] and ds.layout == layout
        assert ds.num_classes == 2 and ds.in_chans == 3 and ds.classes == ["background", "building"]
        assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD
        assert ds.image_size == (60, 60) and ds.targets is None
        for (_, image, building), (x, mask) in zip(written[split], ds):
            assert x.dtype == torch.uint8 and x.shape == (3, 60, 60)
            assert mask.dtype == torch.int64 and mask.shape == (60, 60)
            assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1))
            assert torch.equal(mask, torch.from_numpy(building.astype(np.int64)))
    assert len(load_dataset("buildings", root=tmp_path, split="valid")) == 1


def test_label_rule_first_channel_over_127(tmp_path):
    write_buildings(tmp_path)
    label = np.zeros((60, 60, 3), dtype=np.uint8)
    label[:, :10, 0] = 128  # building: first channel > 127
    label[:, 10:20, 0] = 127  # background
    label[:, 20:30, 1:] = 255  # background: only the other channels are set
    stem = sorted(p.stem for p in (tmp_path / "test_labels").iterdir())[0]
    Image.fromarray(label).save(tmp_path / "test_labels" / f"{stem}.tif", format="TIFF")
    _, mask = load_dataset("buildings", root=tmp_path, split="test")[0]
    assert mask[:, :10].eq(1).all() and mask[:, 10:].eq(0).all()


def test_single_channel_and_zero_one_labels(tmp_path):
    write_buildings(tmp_path)
    stem = sorted(p.stem for p in (tmp_path / "test_labels").iterdir())[0]
    path = tmp_path / "test_labels" / f"{stem}.tif"
    gray = np.zeros((60, 60), dtype=np.uint8)
    gray[5:9, 5:9] = 255
    Image.fromarray(gray).save(path, format="TIFF")
    _, mask = load_dataset("buildings", root=tmp_path, split="test")[0]
    assert int(mask.sum()) == 16
    Image.fromarray((gray > 0).astype(np.uint8)).save(path, format="TIFF")  # 0/1 labels
    ds = load_dataset("buildings", root=tmp_path, split="test")
    with pytest.raises(UserError, match=f"{stem}.tif has values 0-1: expected building = 255"):
        ds[0]


def test_missing_partner_files_are_named(tmp_path):
    write_buildings(tmp_path)
    label = sorted((tmp_path / "train_labels").iterdir())[1]
    label.unlink()
    with pytest.raises(UserError) as err:
        load_dataset("buildings", root=tmp_path, split="train")
    msg = str(err.value)
    assert f"image {tmp_path / 'train' / label.stem}.tiff has no label" in msg
    assert f"expected {label}" in msg
    image = sorted((tmp_path / "test").iterdir())[0]
    image.unlink()
    with pytest.raises(UserError, match=f"label .*{image.stem}.tif has no image"):
        load_dataset("buildings", root=tmp_path, split="test")


def test_size_mismatch(tmp_path):
    write_buildings(tmp_path, "sat_map")
    label = sorted((tmp_path / "valid" / "map").iterdir())[0]
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(label, format="TIFF")
    with pytest.raises(UserError) as err:
        load_dataset("buildings", root=tmp_path, split="val")
    msg = str(err.value)
    assert "is 60x60 but its label" in msg and str(label) in msg and "is 60x50" in msg


def test_corrupt_and_truncated_tiff_name_the_file(tmp_path):
    write_buildings(tmp_path)
    image = sorted((tmp_path / "train").iterdir())[0]
    data = image.read_bytes()
    image.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(UserError, match=f"cannot read image {image}"):
        load_dataset("buildings", root=tmp_path, split="train")
    image.write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    ds = load_dataset("buildings", root=tmp_path, split="train")
    with pytest.raises(UserError, match=f"cannot read image {image}"):
        ds[0]


def test_missing_root_split_and_half_layouts(tmp_path):
    with pytest.raises(UserError, match="dataset 'buildings' needs root="):
        load_dataset("buildings")
    with pytest.raises(UserError, match="no train split under"):
        load_dataset("buildings", root=tmp_path)
    with pytest.raises(UserError, match="has no split 'validation'"):
        load_dataset("buildings", root=tmp_path, split="validation")
    (tmp_path / "train" / "sat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"sat exists but .*map does not"):
        load_dataset("buildings", root=tmp_path)


# ---------------------------------------------------------------------------- tiling
def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_tile_cuts_nine_tiles_per_image_and_reads_back(tmp_path):
    written = write_buildings(tmp_path / "raw")
    out = tmp_path / "tiles"
    manifest = tile_buildings(tmp_path / "raw", out, size=20, log=None)
    assert manifest["complete"] and manifest["tile_size"] == 20
    assert manifest["summary"] == {"written": 54, "dropped": 0, "skipped_images": 0, "images": 6}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["complete"] and "summary" not in on_disk
    for split, items in written.items():
        ds = load_dataset("buildings", root=out, split=split)
        assert ds.layout == "tiles" and len(ds) == 9 * len(items) and ds.image_size == (20, 20)
        by_name = {p.stem: i for i, (p, _) in enumerate(ds.samples)}
        for stem, image, building in items:
            for r in range(3):
                for c in range(3):
                    x, mask = ds[by_name[f"{stem}_r{r:02d}_c{c:02d}"]]
                    ys, xs = slice(20 * r, 20 * r + 20), slice(20 * c, 20 * c + 20)
                    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(image[ys, xs]))
                    assert torch.equal(mask, torch.from_numpy(building[ys, xs].astype(np.int64)))
    # the cache reports the mean / std of its training tiles (= of the training images here)
    train = np.stack([image for _, image, _ in written["train"]]).reshape(-1, 3) / 255.0
    ds = load_dataset("buildings", root=out, split="test")
    np.testing.assert_allclose(ds.mean, train.mean(0), atol=1e-4)
    np.testing.assert_allclose(ds.std, train.std(0), atol=1e-4)
    mask_png = _read_png(out / "train" / "masks" / f"{written['train'][0][0]}_r00_c00.png")
    assert mask_png.ndim == 2 and set(np.unique(mask_png)) <= {0, 255}


def test_tile_drops_remainder_and_nodata(tmp_path):
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    (raw / "train_labels").mkdir()
    image = np.full((50, 45, 3), 100, dtype=np.uint8)
    image[:20, :20] = 255  # tile r00_c00 entirely no-data
    image[20:32, :20] = 255  # tile r01_c00: 12 of 20 rows white = 0.6
    image[20:25, 20:40] = 255  # tile r01_c01: 0.25
    image[0, 20:40] = (255, 255, 254)  # not white: not no-data
    Image.fromarray(image).save(raw / "train" / "a.tiff", format="TIFF")
    Image.fromarray(np.zeros((50, 45, 3), np.uint8)).save(raw / "train_labels" / "a.tif")
    kept = tile_buildings(raw, tmp_path / "all", size=20, log=None)
    assert kept["images"]["train"]["a"]["tiles"] == [
        "a_r00_c00",
        "a_r00_c01",
        "a_r01_c00",
        "a_r01_c01",
    ]
    manifest = tile_buildings(raw, tmp_path / "out", size=20, max_nodata=0.5, log=None)
    record = manifest["images"]["train"]["a"]
    assert record["tiles"] == ["a_r00_c01", "a_r01_c01"]
    assert record["dropped"] == {"a_r00_c00": 1.0, "a_r01_c00": 0.6}
    assert manifest["summary"]["dropped"] == 2 and manifest["splits"] == ["train"]
    names = sorted(p.name for p in (tmp_path / "out" / "train" / "images").iterdir())
    assert names == ["a_r00_c01.png", "a_r01_c01.png"]
    assert not (tmp_path / "out" / "val").exists()


def test_tile_refuses_non_empty_out_continues_and_overwrites(tmp_path, monkeypatch):
    write_buildings(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty: .*--overwrite"):
        tile_buildings(tmp_path / "raw", out, size=20, log=None)
    (out / "notes.txt").unlink()

    # interrupted after 12 tiles: the cache is refused until the run is finished
    real_png, calls = buildings_module._atomic_png, []

    def failing_png(array, path, mode):
        calls.append(path)
        if len(calls) > 24:
            raise KeyboardInterrupt
        real_png(array, path, mode)

    monkeypatch.setattr(buildings_module, "_atomic_png", failing_png)
    with pytest.raises(KeyboardInterrupt):
        tile_buildings(tmp_path / "raw", out, size=20, log=None)
    monkeypatch.setattr(buildings_module, "_atomic_png", real_png)
    with pytest.raises(UserError, match="is incomplete"):
        load_dataset("buildings", root=out)
    with pytest.raises(UserError, match=r"other settings: tile_size=20 \(now 30\)"):
        tile_buildings(tmp_path / "raw", out, size=30, log=None)
    lines: list[str] = []
    manifest = tile_buildings(tmp_path / "raw", out, size=20, log=lines.append)
    assert manifest["complete"] and manifest["summary"]["skipped_images"] == 1
    assert manifest["summary"]["written"] == 45  # the other 5 images, 9 tiles each
    assert "1 images done before" in lines[0]
    reference = tile_buildings(tmp_path / "raw", tmp_path / "clean", size=20, log=None)
    for split in ("train", "val", "test"):
        for sub in ("images", "masks"):
            ours = sorted((out / split / sub).iterdir())
            theirs = sorted((tmp_path / "clean" / split / sub).iterdir())
            assert [p.name for p in ours] == [p.name for p in theirs]
            assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))
    assert manifest["mean"] == reference["mean"] and manifest["std"] == reference["std"]

    # finished: running again does nothing; other settings need --overwrite
    again = tile_buildings(tmp_path / "raw", out, size=20, log=None)
    assert again["summary"]["written"] == 0
    with pytest.raises(UserError, match="other settings"):
        tile_buildings(tmp_path / "raw", out, size=30, log=None)
    manifest = tile_buildings(tmp_path / "raw", out, size=30, overwrite=True, log=None)
    assert manifest["summary"]["written"] == 6 * 4
    assert len(list((out / "train" / "images").iterdir())) == 3 * 4
    with pytest.raises(UserError, match="already holds tiles"):
        tile_buildings(out, tmp_path / "again", size=10, log=None)


def test_cli_data_tile(tmp_path, capsys):
    write_buildings(tmp_path / "raw", "sat_map")
    out = tmp_path / "out"
    argv = ["data", "tile", str(tmp_path / "raw"), str(out), "--size", "20"]
    assert main([*argv, "--splits", "train,valid"]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 images -> 27 tiles written, 0 dropped" in printed
    assert "val: 1 images -> 9 tiles written" in printed and "36 tiles of 20x20" in printed
    assert len(load_dataset("buildings", root=out, split="val")) == 9

    def error(args):
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert "other settings" in error(argv)  # splits differ
    assert "max_nodata=2.0" in error([*argv, "--overwrite", "--max-nodata", "2"])
    assert "is not a directory" in error(["data", "tile", str(tmp_path / "nope"), str(out)])
    assert "no action given" in error(["data"])
    label = sorted((tmp_path / "raw" / "test" / "map").iterdir())[0]
    label.unlink()
    assert f"has no label: expected {label}" in error([*argv, "--overwrite"])


def test_cli_data_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "tile", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--max-nodata" in out and "--overwrite" in out
