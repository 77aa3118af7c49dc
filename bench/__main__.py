"""``python -m bench``: run benchmark suites, print markdown, optionally save JSON / docs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import SUITES, load_suite
from ._harness import Config, SuiteReport, log, write_docs_section, write_json

DEFAULT_DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of ``python -m bench``."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run zeal_asgi's benchmark suites side by side with their peers.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"default: all ({', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="short smoke run (numbers indicative)")
    p.add_argument("--json", type=Path, metavar="PATH", help="save raw results (every rep)")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite each suite's section of docs/benchmarks.md",
    )
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, metavar="PATH", help="docs file")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other processes to go idle",
    )
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    args = p.parse_args(argv)
    for name in args.suites:
        if name not in SUITES:
            p.error(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    if args.quick and args.write_docs and args.docs.resolve() == DEFAULT_DOCS:
        p.error("--quick numbers are not publishable: --write-docs needs --docs PATH with --quick")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected suites; returns the exit status."""
    args = parse_args(argv)
    if args.list:
        for name in SUITES:
            print(f"{name}: {load_suite(name).TITLE}")
        return 0
    cfg = Config.smoke() if args.quick else Config.full()
    cfg = dataclasses.replace(cfg, wait_quiet=args.wait_quiet)
    reports: list[SuiteReport] = []
    for name in args.suites or list(SUITES):
        suite = load_suite(name)
        log(f"[{name}] {suite.TITLE}")
        t0 = time.monotonic()
        report: SuiteReport = suite.run(cfg)
        log(f"[{name}] done in {time.monotonic() - t0:.1f} s")
        reports.append(report)
        print(report.markdown(), flush=True)
        if args.write_docs:
            write_docs_section(args.docs, name, report.markdown())
            log(f"[{name}] wrote its section of {args.docs}")
    if args.json:
        write_json(args.json, reports)
        log(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
