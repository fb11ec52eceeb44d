"""The ``qrobust`` command: run the gate without a checkout, and write a starter thresholds file.

    qrobust run [THRESHOLDS] [-- PYTEST ARGS]   gate with THRESHOLDS (default: the built-in gate)
    qrobust init [PATH] [--pair NAME ...]       write a commented starter thresholds file
    qrobust template                            print the built-in gate's thresholds file
    qrobust schema                              print the JSON Schema of thresholds files
    qrobust propose [THRESHOLDS] [--seeds 0,1,2 | --from REPORT ...] [-- PYTEST ARGS]
                                                tolerances fitted to each pair's benign spread

``run`` is ``pytest --pyargs qrobust.suites --qrobust-thresholds THRESHOLDS`` with the cache provider
off (the suites live in site-packages); any further arguments go to pytest unchanged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BUILTIN_THRESHOLDS = Path(__file__).parent / "thresholds.yaml"


def run(thresholds: str | None, pytest_args: list[str]) -> int:
    import pytest

    path = Path(thresholds).resolve() if thresholds else BUILTIN_THRESHOLDS
    if not path.is_file():
        print(f"qrobust run: thresholds file {path} does not exist (qrobust init writes a starter)", file=sys.stderr)
        return 4
    args = ["--pyargs", "qrobust.suites", "-p", "no:cacheprovider", f"--qrobust-thresholds={path}",
            f"--rootdir={Path.cwd()}", *pytest_args]
    return int(pytest.main(args))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one seed >= 0, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # everything after the thresholds path belongs to pytest, options included
        rest = argv[1:]
        thresholds = rest.pop(0) if rest and not rest[0].startswith("-") else None
        return run(thresholds, rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(prog="qrobust", description="A pytest-native robustness gate for quantized "
                                                                 "vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the gate: qrobust run [THRESHOLDS] [PYTEST ARGS] (default: the built-in gate)")
    init_parser = commands.add_parser("init", help="write a commented starter thresholds file")
    init_parser.add_argument("path", nargs="?", default="thresholds.yaml")
    init_parser.add_argument("--force", action="store_true", help="replace an existing file")
    commands.add_parser("template", help="print the built-in gate's thresholds file")
    commands.add_parser("schema", help="print the JSON Schema of thresholds files (for editors and CI)")
    propose = commands.add_parser("propose", help="print the thresholds file with tolerances fitted to each pair's "
                                                  "benign spread (README: Tolerances fitted to your pair)")
    propose.add_argument("thresholds", nargs="?", default=str(BUILTIN_THRESHOLDS))
    propose.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="gate once per seed (default: 0,1,2)")
    propose.add_argument("--from", dest="reports", nargs="+", metavar="REPORT",
                         help="report.json files of benign runs instead of gating here")
    propose.add_argument("--pair", help="fit only this pair")
    propose.add_argument("--benign", action="append", default=[], metavar="PAIR",
                         help="a pair in the reports that is a benign variant of --pair (recalibrated, other engine)")
    propose.add_argument("--headroom", type=float, default=3.0, help="noise multiples above the worst benign value")
    propose.add_argument("-o", "--output", help="write here instead of standard output")
    pytest_args: list[str] = []
    if "--" in argv:
        argv, pytest_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if args.command == "propose":
        from qrobust.errors import ConfigError
        from qrobust.gate.propose import main as propose_main

        if args.benign and not args.pair:
            parser.error("--benign needs --pair (the pair they are variants of)")
        args.pytest_args = pytest_args
        try:
            return propose_main(args)
        except ConfigError as exc:
            print(f"qrobust propose: {exc}", file=sys.stderr)
            return 4
    if args.command == "template":
        sys.stdout.write(BUILTIN_THRESHOLDS.read_text(encoding="utf-8"))
        return 0
    if args.command == "schema":
        from qrobust.gate.schema import schema_text

        sys.stdout.write(schema_text())
        return 0
    from qrobust.starter import write_starter

    return write_starter(Path(args.path), force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
