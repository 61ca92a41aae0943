#!/usr/bin/env python
"""Write the markdown report of a world grid (``scripts/world_grid.py``): tables, Welch's t-tests, PNGs.

    python scripts/world_report.py --root runs/grid --output docs/world_results.md
    python scripts/world_report.py --root runs/grid --archive docs/world_results_data   # what the report reads, small
    python scripts/world_report.py --root runs/grid --output docs/world_results.md \
        --start ode_init=runs/world/eval/ode_init.json   # the CM-GRPO gain tables: each start's own evaluation
"""

from __future__ import annotations

import argparse
import os

from raven_video.world.grid import STATE_FILE
from raven_video.world.report import archive_results, write_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the grid folder (with grid.json)")
    p.add_argument("--output", default=None, help="markdown file to write; PNGs go to <stem>_figures/ beside it")
    p.add_argument("--archive", default=None,
                   help="also (or only) copy what the report reads into this folder: grid.json, evaluation JSONs and "
                        "training curves, no checkpoints; --root it later to rebuild the report")
    p.add_argument("--title", default=None, help="the report's heading (default: 'World grid results (<root>)')")
    p.add_argument("--note", default=None, help="markdown file whose text goes under the title (what ran, what is missing)")
    p.add_argument("--start", action="append", default=[], metavar="NAME=EVAL_JSON",
                   help="evaluation JSON (scripts/evaluate_world.py) of a checkpoint CM-GRPO runs start from: ode_init "
                        "or best_raven (default for best_raven: the evaluation of the grid run it came from); repeatable")
    args = p.parse_args(argv)
    args.starts = {}
    for item in args.start:
        name, sep, path = item.partition("=")
        if not sep or name not in ("ode_init", "best_raven"):
            p.error(f"--start {item!r}: expected ode_init=EVAL_JSON or best_raven=EVAL_JSON.")
        if not os.path.isfile(path):
            p.error(f"--start {item!r}: {path!r} is not a file (write it with scripts/evaluate_world.py --output).")
        args.starts[name] = path
    if args.note is not None and not os.path.isfile(args.note):
        p.error(f"--note {args.note!r} is not a file.")
    if args.output is None and args.archive is None:
        p.error("give --output (the report), --archive (a copy of its data), or both.")
    if args.archive is not None and os.path.abspath(args.archive) == os.path.abspath(args.root):
        p.error(f"--archive {args.archive!r} is the --root itself; give another folder.")
    if not os.path.isfile(os.path.join(args.root, STATE_FILE)):
        p.error(f"--root {args.root!r} has no {STATE_FILE}: run scripts/world_grid.py there first.")
    return args


def main(argv=None) -> str | None:
    args = parse_args(argv)
    if args.archive is not None:
        count = archive_results(args.root, args.archive, starts=args.starts)
        print(f"archived {count} runs' results in {args.archive}")
    if args.output is None:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    note = None
    if args.note is not None:
        with open(args.note, encoding="utf-8") as handle:
            note = handle.read()
    return write_report(args.root, args.output, note=note, title=args.title, starts=args.starts)


if __name__ == "__main__":
    main()
