#!/usr/bin/env python
"""Write the markdown report of a world grid (``scripts/world_grid.py``): tables, Welch's t-tests, PNGs.

    python scripts/world_report.py --root runs/grid --output docs/world_results.md
"""

from __future__ import annotations

import argparse
import os

from raven_video.world.grid import STATE_FILE
from raven_video.world.report import write_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the grid folder (with grid.json)")
    p.add_argument("--output", required=True, help="markdown file to write; PNGs go to <stem>_figures/ beside it")
    p.add_argument("--title", default=None, help="the report's heading (default: 'World grid results (<root>)')")
    p.add_argument("--note", default=None, help="markdown file whose text goes under the title (what ran, what is missing)")
    args = p.parse_args(argv)
    if args.note is not None and not os.path.isfile(args.note):
        p.error(f"--note {args.note!r} is not a file.")
    if not os.path.isfile(os.path.join(args.root, STATE_FILE)):
        p.error(f"--root {args.root!r} has no {STATE_FILE}: run scripts/world_grid.py there first.")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    note = None
    if args.note is not None:
        with open(args.note, encoding="utf-8") as handle:
            note = handle.read()
    return write_report(args.root, args.output, note=note, title=args.title)


if __name__ == "__main__":
    main()
