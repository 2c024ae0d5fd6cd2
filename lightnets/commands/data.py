"""`lightnets data ACTION`: prepare datasets on disk.

`lightnets data tile ROOT OUT` cuts the 1500x1500 Massachusetts Buildings images into tiles
(250x250 by default: 36 per image) that dataset `buildings` reads with root=OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightnets.data.buildings import tile_buildings
from lightnets.errors import UserError

__all__ = ["add_data_arguments", "data_command"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-parser per data action to `parser`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", title="action")
    p = sub.add_parser(
        "tile",
        help="cut Massachusetts Buildings images into tiles cached as PNG",
        description=(
            "Cut the images (and labels) of a Massachusetts Buildings directory into SIZE x SIZE "
            "tiles from the top-left corner (a remainder smaller than a tile is dropped), written "
            "as PNG to OUT/<split>/images and OUT/<split>/masks with OUT/manifest.json; dataset "
            "'buildings' reads them with root=OUT. An interrupted run continues when started "
            "again with the same arguments."
        ),
    )
    p.add_argument("root", type=Path, help="the dataset directory (either common layout)")
    p.add_argument("out", type=Path, help="output directory (new or empty)")
    p.add_argument("--size", type=int, default=250, help="tile side in pixels (default 250)")
    p.add_argument(
        "--max-nodata",
        type=float,
        default=None,
        metavar="FRACTION",
        help="drop tiles whose no-data area (white 255,255,255 image pixels) is above this "
        "fraction, e.g. 0.5 (default: keep every tile)",
    )
    p.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to tile, e.g. train,val (default: all that exist)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the manifest and <split>/{images,masks} folders already in OUT",
    )


def data_command(args: argparse.Namespace) -> int:
    """Run the data action in `args.action`; returns the exit code."""
    action = getattr(args, "action", None)
    if action is None:
        raise UserError("no action given: expected `lightnets data tile ROOT OUT` (see --help)")

    splits = None
    if args.splits is not None:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        if not splits:
            raise UserError(f"--splits {args.splits!r}: expected names like train,val,test")
    tile_buildings(
        args.root,
        args.out,
        size=args.size,
        max_nodata=args.max_nodata,
        splits=splits,
        overwrite=args.overwrite,
    )
    return 0
