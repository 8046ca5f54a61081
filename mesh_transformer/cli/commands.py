"""The command table: every command of the package, declared once.

Whatever lists commands reads it: setup.py installs a console script for each command named by one
word (``mtj-train``...); the scripts at the top of a checkout (``device_train.py``...) and the
``python -m`` entry modules run the command their spelling names; ``mtj-hf`` runs its subcommands from
here; and tests/test_docs.py parses every command the docs show with the parser named here.

This module imports only the standard library: setup.py reads it before the package's dependencies
are installed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

PACKAGE = "mesh_transformer.cli"


@dataclass(frozen=True)
class Command:
    """One command and every way it is typed.

    ``name`` is how it is installed: a console script, or ``GROUP SUB`` for a subcommand of the command
    GROUP. ``module`` is its module in cli/, with the functions ``main(argv)`` and ``parser(argv)`` (which
    parses as ``main`` does, checks between options included; None where the parser is not ours).
    ``script`` is the original script's path in a checkout, run as ``python SCRIPT``; ``aliases`` are
    the other spellings (``python -m ...``, another command's subcommand), which install nothing.
    """

    name: str
    module: str
    main: str = "main"
    parser: str | None = "parse_args"
    script: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def entry_point(self) -> str:
        return f"{PACKAGE}.{self.module}:{self.main}"

    def function(self, attribute: str) -> Callable:
        return getattr(importlib.import_module(f"{PACKAGE}.{self.module}"), attribute)


COMMANDS: tuple[Command, ...] = (
    Command("mtj-train", "train", script="device_train.py"),
    Command("mtj-pod", "pod", script="train.py"),
    Command("mtj-create-tfrecords", "create_tfrecords", script="scripts/create_finetune_tfrecords.py"),
    Command("mtj-data", "data", aliases=("python -m mesh_transformer.cli.data",)),
    Command("mtj-demo", "demo", aliases=("python -m mesh_transformer.cli.demo",)),
    Command("mtj-plan", "plan", aliases=("python -m mesh_transformer.plan",)),
    Command("mtj-sample", "sample", script="device_sample.py"),
    Command("mtj-serve", "serve", script="device_serve.py"),
    Command("mtj-eval-harness", "eval_harness", script="eval_harness.py"),
    # The harness's own command line (lm-eval) with our model registered: the parser is the harness's.
    Command("mtj-lm-eval", "eval_harness", main="lm_eval_main", parser=None),
    # A group: `mtj-hf SUB ...` runs the command spelled "mtj-hf SUB" below.
    Command("mtj-hf", "hf", parser=None, aliases=("python -m mesh_transformer.hf",)),
    Command("mtj-hf import", "hf", main="import_main", parser="parse_import_args"),
    Command("mtj-to-hf", "to_hf", script="to_hf_weights.py", aliases=("mtj-hf export",)),
    Command("mtj-convert-legacy", "legacy", aliases=("python -m mesh_transformer.legacy",)),
)
_BY_NAME = {command.name: command for command in COMMANDS}


def spellings(command: Command) -> tuple[str, ...]:
    """Every way to type ``command``: its name, its aliases, ``python SCRIPT``, and for a subcommand
    (``GROUP SUB``) each alias of its group followed by SUB (``python -m mesh_transformer.hf import``)."""
    own = [command.name, *command.aliases, *([f"python {command.script}"] if command.script else [])]
    through_group = []
    for spelling in own:
        group, _, sub = spelling.partition(" ")
        if sub and group in _BY_NAME:
            through_group += [f"{alias} {sub}" for alias in _BY_NAME[group].aliases]
    return (*own, *through_group)


def command_named(spelling: str) -> Command:
    for command in COMMANDS:
        if spelling in spellings(command):
            return command
    raise KeyError(f"{spelling!r} is no command of {__name__}")


def console_scripts() -> list[str]:
    """setup.py's ``console_scripts``: ``NAME = module:function`` for each command named by one word."""
    return [f"{command.name} = {command.entry_point}" for command in COMMANDS if " " not in command.name]


def run(spelling: str, argv: list[str] | None = None) -> int:
    """Run the command ``spelling`` names on ``argv`` (default: this process's arguments)."""
    command = command_named(spelling)
    return command.function(command.main)(argv)


def subcommands(group: str) -> dict[str, str]:
    """SUB -> its spelling ``GROUP SUB``, for each subcommand of ``group`` in the table's order."""
    found = {}
    for command in COMMANDS:
        for spelling in (command.name, *command.aliases):
            first, _, sub = spelling.partition(" ")
            if first == group and sub:
                found[sub] = spelling
    return found


def run_subcommand(group: str, argv: list[str] | None = None) -> int:
    """``GROUP SUB ARGS...``: run the subcommand SUB on ARGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    choices = subcommands(group)
    usage = f"usage: {group} {{{','.join(choices)}}} ...  (--help after the command for options)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in choices:
        print(usage, file=sys.stderr)
        return 2
    return run(choices[argv[0]], argv[1:])
