"""`python -m llm_activations <command>`: one subcommand per module, imported only when used.

Exit statuses (SPEC): 0 success; 2 usage or configuration error, printed as one line with no
traceback; 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError

# command -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "extract": ("llm_activations.pipeline", "extract activations into per-layer TFRecord shards (Beam pipeline)"),
    "validate": ("llm_activations.validate", "check every shard of a dataset against its metadata.json"),
    "inspect": ("llm_activations.inspect_dataset", "summarise a dataset (and optionally plot norm histograms)"),
    "plan": ("llm_activations.plan", "estimate memory, batch size, storage and throughput for a model on a chip"),
    "merge": ("llm_activations.merge", "merge per-host datasets into one dataset with exact statistics"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llm_activations",
        description="LLM activations at scale: extract, validate, inspect, plan and merge activation datasets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # import only the module that runs: --help stays fast
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command if command in COMMANDS else None)
    if command is None or command not in COMMANDS:
        parser.print_help() if command is None else parser.error(f"unknown command {command!r}")
        return 2 if command else 0
    module = importlib.import_module(COMMANDS[command][0])
    args, extra = parser.parse_known_args(argv)
    args.beam_args = extra  # only `extract` accepts them (Beam pipeline options)
    if extra and command != "extract":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"llm_activations {command}: error: {e}", file=sys.stderr)
        return 2
