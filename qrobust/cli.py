"""The ``qrobust`` command: run the gate without a checkout, and write a starter thresholds file.

    qrobust run [THRESHOLDS] [-- PYTEST ARGS]   gate with THRESHOLDS (default: the built-in gate)
    qrobust init [PATH] [--pair NAME ...]       write a commented starter thresholds file
    qrobust template                            print the built-in gate's thresholds file
    qrobust schema                              print the JSON Schema of thresholds files

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
    args = parser.parse_args(argv)
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
