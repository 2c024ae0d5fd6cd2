"""Hostile and unusual input files: a gzip bomb, an IDX header with absurd dimensions, 16-bit
images (never clipped silently), an image over Pillow's decompression-bomb limit. Each is one
clear line, with bounded memory."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightnets.cli import main
from lightnets.data import load_dataset
from lightnets.data.images import open_image
from lightnets.data.mnist import read_idx
from lightnets.errors import UserError
from tests.conftest import REPO, run_cli
from tests.data.test_buildings import write_buildings


def _idx_header(*dims: int, type_byte: int = 0x08) -> bytes:
    return bytes([0, 0, type_byte, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _peak_mb_reading(path: Path) -> tuple[int, str]:
    """Peak resident memory (MB) of a fresh process that reads `path`, and its error line."""
    code = textwrap.dedent(
        f"""
        import resource
        from lightnets.data.mnist import read_idx
        from lightnets.errors import UserError
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_idx({str(path)!r})
            message = "read"
        except UserError as err:
            message = str(err)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) // 1024)
        print(message)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    grown, message = done.stdout.splitlines()[:2]
    return int(grown), message


def test_a_gzip_bomb_claiming_4_gib_is_refused_before_decompressing(tmp_path):
    """The header claims 65536 x 65536 bytes; the data behind it would expand without end."""
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(_idx_header(65536, 65536))
        zeros = bytes(1 << 20)
        for _ in range(64):  # 64 MB of zeros behind the header, a few kB compressed
            f.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    grown, message = _peak_mb_reading(bomb)
    assert "4,294,967,296 bytes: expected at most 1,073,741,824" in message
    assert "nothing was decompressed" in message
    assert grown < 200  # MB over the interpreter's own


def test_a_gzip_bomb_with_a_plausible_header_stops_at_the_declared_size(tmp_path):
    """The header claims 1000 images of 28x28 (784 kB); the payload expands to 64 MB."""
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(_idx_header(1000, 28, 28))
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    grown, message = _peak_mb_reading(bomb)
    assert "more than 784,016 bytes" in message and "expected exactly 784,016" in message
    assert grown < 200


def test_absurd_dimensions_report_the_true_byte_count(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(_idx_header(4294967295, 4294967295, 4294967295, type_byte=0x0D))
    with pytest.raises(UserError) as err:
        read_idx(path)
    count = 4294967295**3 * 4  # float32: no int64 overflow, no negative count
    assert f"{count:,} bytes" in str(err.value)


# ----------------------------------------------------------------------------- images
def _uint16_png(path: Path, value: int = 4000) -> Path:
    Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(path)
    return path


def test_16_bit_images_are_refused_everywhere_not_clipped(tmp_path, capsys):
    # Pillow itself would make this 4000-valued image all 255
    img = _uint16_png(tmp_path / "deep.png")
    assert Image.open(img).convert("L").getextrema() == (255, 255)
    with pytest.raises(UserError, match=r"'I;16' pixels \(more than 8 bits a channel\)"):
        open_image(img)
    # the folder dataset
    for split in ("train", "val"):
        (tmp_path / "folder" / split / "roofs").mkdir(parents=True)
        _uint16_png(tmp_path / "folder" / split / "roofs" / "a.png")
    ds = load_dataset("folder", root=tmp_path / "folder", split="val")
    with pytest.raises(UserError, match="would be clipped at 255"):
        ds[0]
    # the building tiles and `lightnets data tile`
    root = tmp_path / "mass"
    write_buildings(root, size=30)
    first = sorted((root / "train").glob("*.tiff"))[0]
    Image.fromarray(np.full((30, 30), 3000, dtype=np.uint16)).save(first, format="TIFF")
    with pytest.raises(UserError, match="more than 8 bits a channel"):
        load_dataset("buildings", root=root, split="train")[0]
    assert main(["data", "tile", str(root), str(tmp_path / "tiles"), "--size", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than 8 bits a channel" in err[0] and first.name in err[0]


def test_an_image_over_the_pixel_limit_is_one_line_naming_the_option(tmp_path):
    img = tmp_path / "scene.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img)
    with pytest.raises(UserError) as err:
        open_image(img, max_pixels=500)  # 1600 pixels > 2 x 500: Pillow's bomb error
    message = str(err.value)
    assert "more than the limit of 500" in message and "--max-pixels" in message
    assert open_image(img, max_pixels=10_000).size == (40, 40)


def test_max_pixels_is_exact_where_pillow_only_warns(tmp_path):
    """Pillow refuses only images over twice its limit and warns between once and twice it:
    max_pixels=N reads up to N pixels, and refuses N + 1 (here 1600 pixels, N = 1000)."""
    img = tmp_path / "scene.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img)
    with pytest.raises(UserError) as err:
        open_image(img, max_pixels=1000)
    assert "40 x 40 = 1,600 pixels, more than the limit of 1,000" in str(err.value)
    assert open_image(img, max_pixels=1600).size == (40, 40)
    with pytest.raises(UserError, match="more than the limit of 1,599"):
        open_image(img, max_pixels=1599)
    done = run_cli("predict", str(tmp_path / "no-run"), str(img), "--max-pixels", "0")
    assert done.returncode == 2 and "--max-pixels 0: expected at least 1" in done.stderr
