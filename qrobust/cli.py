"""The ``qrobust`` command: run the gate without a checkout, and write a starter thresholds file.

    qrobust run [THRESHOLDS] [PYTEST ARGS]      gate with THRESHOLDS (default: the built-in gate)
    qrobust run --help                          THRESHOLDS and the --qrobust-* options (--pytest-help: pytest's)
    qrobust init [PATH] [--pair NAME ...]       write a commented starter thresholds file
    qrobust template                            print the built-in gate's thresholds file
    qrobust schema                              print the JSON Schema of thresholds files
    qrobust propose THRESHOLDS [--seeds 0,1,2] [-- PYTEST ARGS]
    qrobust propose [THRESHOLDS] --from REPORT ...
                                                tolerances fitted to each pair's benign spread
    qrobust merge JOB... [--report DIR]        judge a gate run as N jobs (pytest --qrobust-shard K/N)
    qrobust export-inputs THRESHOLDS --pair P -o DIR
                                                the inputs the gate feeds P's twin, for a device to run

``run`` is ``pytest --pyargs qrobust.suites --qrobust-thresholds THRESHOLDS`` with the cache provider
off (the suites live in site-packages); THRESHOLDS may stand before or after pytest's arguments, which go
to pytest unchanged. A reader that stops early (``qrobust template | head -1``) ends the command quietly.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qrobust import _options as opts
from qrobust.errors import ConfigError, show
from qrobust.suites import BUILTIN_THRESHOLDS

YAML_SUFFIXES = (".yaml", ".yml")
# pytest's options whose value may stand apart from them (`--junitxml out.yml`): pytest's own, and those of
# the plugins qrobust installs (xdist, hypothesis, pytest-benchmark) that take a path or a name. Such a value
# is never the thresholds file; qrobust's own options with a value come from _options.OPTIONS.
PYTEST_VALUE_OPTIONS = frozenset({
    "-k", "-m", "-c", "--config-file", "-o", "--override-ini", "-p", "-W", "--pythonwarnings", "-r",
    "--report-chars", "--maxfail", "--rootdir", "--basetemp", "--confcutdir", "--ignore", "--ignore-glob",
    "--deselect", "--import-mode", "--junitxml", "--junit-xml", "--junitprefix", "--junit-prefix", "--tb",
    "--capture", "--durations", "--durations-min", "--color", "--verbosity", "--show-capture", "--doctest-glob",
    "--log-level", "--log-file", "--log-cli-level", "--log-file-level",
    "-n", "--numprocesses", "--dist", "--maxprocesses", "--hypothesis-profile", "--hypothesis-seed",
    "--benchmark-json", "--benchmark-save", "--benchmark-storage",
})


def split_run(args: list[str]) -> tuple[list[str], list[str], set[str]]:
    """``qrobust run``'s arguments as (thresholds files, pytest's arguments, the options standing alone).

    The thresholds file is the first argument when it is not an option (whatever its suffix), and any
    argument ending in .yaml or .yml that is neither an option nor an option's value, wherever it stands;
    after ``--`` every argument is pytest's."""
    end = args.index("--") if "--" in args else len(args)
    takes_value = PYTEST_VALUE_OPTIONS | {o.flag for o in opts.OPTIONS}
    files, options, value_next = [], set(), False
    for i, arg in enumerate(args[:end]):
        if value_next:
            value_next = False
        elif arg.startswith("-"):
            options.add(arg)
            value_next = arg in takes_value
        elif i == 0 or arg.lower().endswith(YAML_SUFFIXES):
            files.append(i)
    rest = [a for i, a in enumerate(args[:end]) if i not in files] + args[end + 1:]
    return [args[i] for i in files], rest, options


def run_usage() -> str:
    """``qrobust run --help``: what THRESHOLDS is and qrobust's options, from the list the plugin registers
    (pytest's own help is 500 lines, qrobust's options past line 300)."""
    parser = argparse.ArgumentParser(
        prog="qrobust run", usage="%(prog)s [THRESHOLDS] [PYTEST ARGS]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Gate with a thresholds file: pytest --pyargs qrobust.suites --qrobust-thresholds THRESHOLDS\n"
                    "(cache provider off). Every other argument goes to pytest unchanged: -q, -x, -k EXPR,\n"
                    "-n N (pytest-xdist, installed with qrobust), --junitxml PATH; after --, all of them.",
        epilog="pytest's own options (qrobust's among them): qrobust run --pytest-help")
    parser.add_argument("thresholds", metavar="THRESHOLDS", nargs="?",
                        help="the thresholds YAML to gate with (default: the built-in gate; qrobust template prints "
                             "it, qrobust init writes a starter): the first argument when it is not an option, else "
                             "the one ending in .yaml or .yml, before or after pytest's arguments")
    parser.add_argument("--pytest-help", action="store_true", help="print pytest's help instead")
    group = parser.add_argument_group("qrobust options", "each also read from its environment variable QROBUST_<NAME>\n"
                                                         "and ini key qrobust_<name> (README: Options)")
    for option in opts.OPTIONS:
        if option.name != "thresholds":  # THRESHOLDS
            group.add_argument(option.flag, metavar=option.metavar, help=option.help.replace("%", "%%"))
    for name, help_text in opts.FLAGS.items():
        group.add_argument(f"--qrobust-{name}", action="store_true", help=help_text.replace("%", "%%"))
    return parser.format_help()


def run_command(args: list[str]) -> int:
    """``qrobust run``: its own usage, or pytest on the thresholds file found among the arguments."""
    files, pytest_args, options = split_run(args)
    if options & {"-h", "--help"}:
        sys.stdout.write(run_usage())
        return 0
    if "--pytest-help" in options:
        pytest_args = ["--help" if a == "--pytest-help" else a for a in pytest_args]
    if len(files) > 1:
        print(f"qrobust run: {len(files)} thresholds files given ({', '.join(map(show, files))}); gate one at a time "
              "(or pass the others to pytest after --)", file=sys.stderr)
        return 4
    problem = bad_option(pytest_args)
    if problem:
        print(f"qrobust run: {problem}", file=sys.stderr)
        return 4
    return run(files[0] if files else None, pytest_args)


def bad_option(args: list[str]) -> str | None:
    """The first ``--qrobust-*`` option value its parser refuses, as one line (pytest would print its usage,
    the error, the ini file and the rootdir: four lines); None when every one parses."""
    flags = {o.flag: o for o in opts.OPTIONS}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        spec = flags.get(name)
        if spec is None:
            continue
        if not eq:
            if i + 1 >= len(args):
                return f"argument {name}: expected one argument"
            value = args[i + 1]
        try:
            spec.parse(value)
        except argparse.ArgumentTypeError as exc:
            return f"argument {name}: {exc}"
    return None


def run(thresholds: str | None, pytest_args: list[str]) -> int:
    import pytest

    path = Path(thresholds).resolve() if thresholds else BUILTIN_THRESHOLDS
    if not path.is_file():
        print(f"qrobust run: thresholds file {show(thresholds)} {'is a folder' if path.is_dir() else 'does not exist'} "
              "(qrobust init writes a starter)", file=sys.stderr)
        return 4
    args = ["--pyargs", "qrobust.suites", "-p", "no:cacheprovider", f"--qrobust-thresholds={path}",
            f"--rootdir={Path.cwd()}", *pytest_args]
    return int(pytest.main(args))


def merge_command(args) -> int:
    """``qrobust merge``: exit 0 when the merged gate passes, 1 when it fails, 4 on a usage error."""
    from qrobust.errors import QrobustError
    from qrobust.merge import merge

    try:
        outcome = merge(args.jobs, args.report, args.thresholds)
    except QrobustError as exc:
        print(str(exc) if str(exc).startswith("qrobust merge") else f"qrobust merge: {exc}", file=sys.stderr)
        return 4
    for line in outcome.lines:
        print(line)
    for line in outcome.failures:
        print(f"qrobust: FAILED: {line}", file=sys.stderr)
    return 0 if outcome.report and outcome.report["passed"] and not outcome.failures else 1


def export_command(args) -> int:
    """``qrobust export-inputs``: exit 0 with the export written, 4 on a usage error."""
    from qrobust.errors import QrobustError
    from qrobust.exchange import export_inputs

    try:
        manifest = export_inputs(args.thresholds, args.pair, args.output, seed=args.seed, max_samples=args.max_samples)
    except QrobustError as exc:
        print(str(exc) if str(exc).startswith("qrobust export-inputs") else f"qrobust export-inputs: {exc}",
              file=sys.stderr)
        return 4
    batches = sum(len(case["batches"]) for case in manifest["cases"])
    print(f"qrobust export-inputs: {len(manifest['cases'])} cases, {batches} batches of {args.pair}'s inputs in "
          f"{args.output} (content sha256 {manifest['content_sha256'][:12]}); run them on the device, write "
          f"<case>/batch-NNNNN.npy logits and copy manifest.json beside them, then gate with outputs: FOLDER")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one seed >= 0, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    """The entry point. A reader that stopped early (``qrobust template | head -1``) ends the command
    quietly, as Python's docs recommend (the signal module's note on SIGPIPE): stdout goes to devnull, exit 1."""
    try:
        try:
            return command(sys.argv[1:] if argv is None else list(argv))
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" when Python exits
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def command(argv: list[str]) -> int:
    if argv[:1] == ["run"]:  # pytest's arguments are not ours to parse
        return run_command(argv[1:])
    parser = argparse.ArgumentParser(prog="qrobust", description="A pytest-native robustness gate for quantized "
                                                                 "vision models.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the gate: qrobust run [THRESHOLDS] [PYTEST ARGS] (default: the built-in "
                                    "gate); qrobust run --help lists its options")
    init_parser = commands.add_parser("init", help="write a commented starter thresholds file")
    init_parser.add_argument("path", nargs="?", default="thresholds.yaml")
    init_parser.add_argument("--force", action="store_true", help="replace an existing file")
    commands.add_parser("template", help="print the built-in gate's thresholds file")
    commands.add_parser("schema", help="print the JSON Schema of thresholds files (for editors and CI)")
    propose = commands.add_parser("propose", help="print the thresholds file with tolerances fitted to each pair's "
                                                  "benign spread (README: Tolerances fitted to your pair)")
    propose.add_argument("thresholds", nargs="?", help="the thresholds file to gate at each seed, or that the --from "
                                                       "reports were gated with (default with --from: the built-in gate)")
    propose.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="gate once per seed (default: 0,1,2)")
    propose.add_argument("--from", dest="reports", nargs="+", metavar="REPORT",
                         help="report.json files of benign runs instead of gating here")
    propose.add_argument("--pair", help="fit only this pair")
    propose.add_argument("--benign", action="append", default=[], metavar="PAIR",
                         help="a pair in the reports that is a benign variant of --pair (recalibrated, other engine)")
    propose.add_argument("--headroom", type=float, default=3.0, help="noise multiples above the worst benign value")
    propose.add_argument("-o", "--output", help="write here instead of standard output")
    merge = commands.add_parser("merge", help="judge a gate run as N CI jobs (--qrobust-shard K/N) from their "
                                              "states: the verdicts and report.json of one job")
    merge.add_argument("jobs", nargs="+", metavar="JOB", help="each job's state folder (REPORT/qrobust-shard-K-of-N) "
                                                              "or report folder")
    merge.add_argument("--report", default="qrobust-report", metavar="DIR", help="where report.json and report.html "
                                                                                  "go (default: qrobust-report)")
    merge.add_argument("--thresholds", metavar="PATH", help="the thresholds file the jobs ran with, where it is "
                                                            "elsewhere here (its sha256 must match)")
    export = commands.add_parser("export-inputs", help="write every input the gate feeds a pair's twin, for a device "
                                                        "to run (README: Gate what runs on the device)")
    export.add_argument("thresholds", help="the thresholds file that gates the pair")
    export.add_argument("--pair", required=True, help="the pair whose twin's inputs to write")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) folder")
    export.add_argument("--seed", type=int, help="the gate's seed (default: the thresholds')")
    export.add_argument("--max-samples", type=int, help="the gate's sample cap, as --qrobust-max-samples")
    pytest_args: list[str] = []
    if "--" in argv:
        argv, pytest_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if args.command == "propose":
        if args.benign and not args.pair:
            parser.error("--benign needs --pair (the pair they are variants of)")
        if args.thresholds is None and not args.reports:  # gating the built-in gate three times takes hours
            print("qrobust propose: nothing to fit: give a thresholds file to gate at each seed (qrobust propose "
                  "my-gate.yaml; for the built-in gate, qrobust template > gate.yaml first) or --from REPORT ...",
                  file=sys.stderr)
            return 4
        from qrobust.gate.propose import main as propose_main

        args.thresholds = args.thresholds or str(BUILTIN_THRESHOLDS)
        args.pytest_args = pytest_args
        try:
            return propose_main(args)
        except ConfigError as exc:
            print(f"qrobust propose: {exc}", file=sys.stderr)
            return 4
    if args.command == "merge":
        return merge_command(args)
    if args.command == "export-inputs":
        return export_command(args)
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
