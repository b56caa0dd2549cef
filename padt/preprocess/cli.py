"""What the scripts in ``src/preprocess/`` share: their option groups (defaults = the authors' values) and their
skeleton (`script_parser`, `run_script`), so that each script says only its own options and what it converts."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Callable, Iterable
from fractions import Fraction

from padt.geometry.grids import GRID_MODES
from padt.geometry.masks import FOREGROUND_RULES, ForegroundRule
from padt.io import write_json, write_jsonl
from padt.preprocess.common import GridSpec
from padt.preprocess.skips import SkipReport


def parse_fraction(text: str) -> Fraction:
    """'1/28' or '0.05' -> Fraction (exact for 'p/q', so 1/28 gives exactly the released 255/28 limit)."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a coverage fraction must be in [0, 1], got {text}")
    return value


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("merged grid")
    g.add_argument("--patch-size", type=int, default=14, help="ViT patch size in px (default 14)")
    g.add_argument("--merge-size", type=int, default=2, help="spatial merge size (default 2: 28-px cells)")
    g.add_argument("--grid", choices=GRID_MODES, default="round",
                   help="'round': round(side / cell), the released data's grid (default); "
                        "'processor': the image processor's smart_resize grid with --min/--max-pixels")
    g.add_argument("--min-pixels", type=int, default=3136, help="processor min_pixels (with --grid processor)")
    g.add_argument("--max-pixels", type=int, default=12845056, help="processor max_pixels (with --grid processor)")


def grid_from_args(args: argparse.Namespace) -> GridSpec:
    return GridSpec(args.patch_size, args.merge_size, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                    mode=args.grid)


def add_rule_args(parser: argparse.ArgumentParser, task: str) -> None:
    rule = FOREGROUND_RULES[task]
    g = parser.add_argument_group("foreground cells")
    g.add_argument("--fg-threshold", type=parse_fraction, default=rule.threshold,
                   help=f"minimum mean coverage of a cell (default {rule.threshold})")
    g.add_argument("--fg-inclusive", action=argparse.BooleanOptionalAction, default=rule.inclusive,
                   help=f"keep cells whose coverage equals the threshold (default {rule.inclusive})")
    g.add_argument("--resize-dtype", choices=("uint8", "float32"), default=rule.resize_dtype,
                   help=f"dtype of the mask x 255 for the bilinear resize (default {rule.resize_dtype})")


def rule_from_args(args: argparse.Namespace) -> ForegroundRule:
    return ForegroundRule(args.fg_threshold, args.fg_inclusive, args.resize_dtype)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-root", default=None,
                        help="image folder: when given, records whose image file is missing are skipped (and "
                             "counted), and missing height/width are read from the files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--report-json", default=None, help="also write the counts of every run to this JSON file")


def add_ovd_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("OVD prompt and limits (the authors' defaults)")
    g.add_argument("--seed", type=int, default=0, help="seed of the training prompt order and drops (default 0)")
    g.add_argument("--drop-rate", type=float, default=None,
                   help="probability, per image, of dropping absent categories from a shuffled prompt "
                        "(default 0.5 with --prompt-order shuffle, 0 with id)")
    g.add_argument("--max-absent-dropped", type=int, default=None,
                   help="how many absent categories a drop removes (default: half of the categories, 40 for COCO)")
    g.add_argument("--max-per-class", type=int, default=50,
                   help="a category with more instances in an image leaves its prompt and answer (default 50)")
    g.add_argument("--max-classes-in-prompt", type=int, default=100, help="prompt length limit (default 100)")
    g.add_argument("--max-side", type=int, default=1288,
                   help="skip images whose longer side is over this many px; 0 disables (default 1288)")
    g.add_argument("--drop-crowd", action="store_true", help="drop crowd regions (default: kept, as the authors)")


def ovd_options_from_args(args: argparse.Namespace, shuffle: bool):
    from padt.preprocess.coco import OVDOptions

    drop_rate = args.drop_rate if args.drop_rate is not None else (0.5 if shuffle else 0.0)
    return OVDOptions(
        shuffle=shuffle, drop_rate=drop_rate, max_absent_dropped=args.max_absent_dropped,
        max_per_class=args.max_per_class, max_classes_in_prompt=args.max_classes_in_prompt,
        max_side=args.max_side or None, keep_crowd=not args.drop_crowd,
    )


# --------------------------------------------------------------------------- the script skeleton
# a missing file, malformed JSON / pickle, or a bad option value: exit status 2 with the message, no traceback
INPUT_ERRORS = (FileNotFoundError, ValueError, TypeError, OSError, pickle.UnpicklingError)

Convert = Callable[[argparse.Namespace, GridSpec, ForegroundRule, dict[str, SkipReport]], None]


def script_parser(doc: str | None, add_own_args: Callable[[argparse.ArgumentParser], None], rule_task: str, *,
                  ovd: bool = False) -> argparse.ArgumentParser:
    """The parser of a preprocessing script: ``doc`` (its module docstring) as the description, shown as written;
    the script's own options (``add_own_args``) first, then the shared groups: the OVD prompt options (``ovd``),
    the merged grid, the foreground rule of ``rule_task`` (a key of `FOREGROUND_RULES`) and the run options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_own_args(parser)
    if ovd:
        add_ovd_args(parser)
    add_grid_args(parser)
    add_rule_args(parser, rule_task)
    add_run_args(parser)
    return parser


def write_split(records: Iterable[dict], output: str | os.PathLike, report: SkipReport, title: str) -> None:
    """Write one output file and print its report to stderr."""
    write_jsonl(records, output)
    print(report.format(f"{title} -> {output}"), file=sys.stderr)


def finish(reports: dict[str, SkipReport], args: argparse.Namespace) -> int:
    """Optional JSON report; exit status 1 (with a message) if nothing at all was written."""
    if args.report_json:
        write_json({name: r.to_dict() for name, r in reports.items()}, args.report_json, indent=2)
    if reports and all(r.written == 0 for r in reports.values()):
        print("error: no record was written; see the skip counts above", file=sys.stderr)
        return 1
    return 0


def run_script(parser: argparse.ArgumentParser, convert: Convert, argv: list[str] | None = None) -> int:
    """The ``main`` of a preprocessing script: parse ``argv``, build the grid and the foreground rule, call
    ``convert(args, grid, rule, reports)`` (it writes its files with `write_split` and puts one `SkipReport` per
    file into ``reports``), then `finish`.

    Returns the exit status: 0; 1 when no record at all was written; 2 for an input error (`INPUT_ERRORS`), printed
    as ``error: <message>`` without a traceback.
    """
    args = parser.parse_args(argv)
    reports: dict[str, SkipReport] = {}
    try:
        convert(args, grid_from_args(args), rule_from_args(args), reports)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return finish(reports, args)
