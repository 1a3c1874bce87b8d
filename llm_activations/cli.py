"""`python -m llm_activations <command>`: one subcommand per module, imported only when used.

Exit statuses (docs/FORMAT.md, "Exit statuses"): 0 success; 2 usage or configuration error (errors.UsageError);
1 a data or environment fault (errors.Fault: corrupt data, storage unavailable, accelerator busy) and anything
unforeseen; 130 interrupted (Ctrl-C). Every one but the unforeseen is one line with no traceback.
Options are never abbreviated (allow_abbrev=False everywhere): `--ov` must not mean `--overwrite`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from llm_activations.errors import Fault, UsageError, fault_line

# command -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "extract": ("llm_activations.pipeline", "extract activations into per-layer TFRecord shards (Beam pipeline)"),
    "validate": ("llm_activations.commands.validate", "check every shard of a dataset against its metadata.json"),
    "inspect": ("llm_activations.commands.inspect", "summarise a dataset (and optionally plot norm histograms)"),
    "plan": ("llm_activations.commands.plan", "estimate memory, batch size, storage and throughput for a model on a chip"),
    "merge": ("llm_activations.commands.merge", "merge per-host datasets into one dataset with exact statistics"),
    "export": ("llm_activations.commands.export", "write one hook of one layer as a SAELens activation cache (datasets folder)"),
}


def _quiet_beam_import_warning(record: logging.LogRecord) -> bool:
    # Beam logs these on import when the optional GCP extras are absent; they are noise to a CLI
    # user and would break the "one clear line" of an error message (a gs:// path gets its own
    # one-line error from fileio.check_url_support).
    message = record.getMessage()
    return "apitools not found" not in message and "Failed to import GCSFileSystem" not in message


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (docs/FORMAT.md: exit 2, no usage dump, no traceback)."""

    def error(self, message: str):
        raise UsageError(message)


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False,
        prog="python -m llm_activations",
        description="LLM activations at scale: extract, validate, inspect, plan and merge activation datasets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == command:  # import only the module that runs: --help stays fast
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("", "apache_beam.io.filesystems"):  # a logger's filter does not see its children's records
        logging.getLogger(name).addFilter(_quiet_beam_import_warning)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = _parser(command if command in COMMANDS else None)
        if command is None:
            parser.print_help()
            return 0 if not argv or argv[0] in ("-h", "--help") else 2
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
        module = importlib.import_module(COMMANDS[command][0])
        args, extra = parser.parse_known_args(argv)
        if extra and command != "extract":
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        args.beam_args = extra  # only `extract` takes them: Beam pipeline options
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"llm_activations{' ' + command if command in COMMANDS else ''}: error: {e}", file=sys.stderr)
        return 2
    except Fault as e:  # fault_line: a Beam runner re-raises a worker's Fault with the step's name appended
        print(f"llm_activations {command}: error: {fault_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Whatever was running cleaned up on its way out (extract: partial files, its lock); Beam's
        # and other threads' log lines would bury this one, so they are silenced first.
        logging.disable(logging.CRITICAL)
        print(f"llm_activations{' ' + command if command in COMMANDS else ''}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A Beam runner re-raises a worker's Fault wrapped in its own exception, with the worker's
        # traceback as text: the fault's one line is all the user needs (exit 1, as for any fault).
        line = fault_line(e)
        if line is None:
            raise
        logging.disable(logging.CRITICAL)
        print(f"llm_activations {command}: error: {line}", file=sys.stderr)
        return 1
