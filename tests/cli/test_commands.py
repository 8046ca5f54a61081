"""The command table (mesh_transformer/cli/commands.py) and what the commands share from cli/__init__.py:
every command module is in the table, each spelling names one command, ``mtj-hf`` runs its
subcommands from it, and bad input ends a command with one line."""

import runpy

import pytest

from mesh_transformer.cli import one_line_errors
from mesh_transformer.cli.commands import COMMANDS, command_named, console_scripts, run_subcommand, spellings
from mesh_transformer.errors import ConfigError
from tests.helpers import REPO

CLI_DIR = REPO / "mesh_transformer" / "cli"
SHARED = {"__init__", "commands"}  # what the commands share, not commands


def test_every_command_module_is_in_the_table_and_every_function_exists():
    modules = {path.stem for path in CLI_DIR.glob("*.py")} - SHARED
    assert {command.module for command in COMMANDS} == modules
    for command in COMMANDS:
        assert callable(command.function(command.main)), command.name
        if command.parser:
            assert callable(command.function(command.parser)), command.name


def test_each_spelling_names_one_command():
    every = [spelling for command in COMMANDS for spelling in spellings(command)]
    assert len(every) == len(set(every))


def test_overlapping_commands_are_one_implementation():
    assert command_named("mtj-hf export") is command_named("mtj-to-hf") is command_named("python to_hf_weights.py")
    assert command_named("python -m mesh_transformer.hf import") is command_named("mtj-hf import")


def test_the_table_reads_without_the_package():
    """setup.py runs the file by itself, before the package's dependencies are installed."""
    table = runpy.run_path(str(CLI_DIR / "commands.py"))
    assert table["console_scripts"]() == console_scripts()
    assert "mtj-train = mesh_transformer.cli.train:main" in console_scripts()
    assert not any(line.startswith("mtj-hf import") for line in console_scripts())


def test_a_group_lists_its_subcommands_and_runs_them(capsys):
    assert run_subcommand("mtj-hf", ["--help"]) == 0
    assert capsys.readouterr().out == "usage: mtj-hf {import,export} ...  (--help after the command for options)\n"
    assert run_subcommand("mtj-hf", ["convert"]) == 2
    assert capsys.readouterr().err.startswith("usage: mtj-hf {import,export}")
    with pytest.raises(SystemExit) as exit_info:
        run_subcommand("mtj-hf", ["export", "--help"])
    assert exit_info.value.code == 0 and "--input-ckpt" in capsys.readouterr().out


@one_line_errors(KeyError)
@one_line_errors(ConfigError, hint="see docs/config.md")
def failing_command(error: Exception) -> int:
    raise error


def test_bad_input_ends_a_command_with_one_line(capsys):
    assert failing_command(ConfigError("'seq' must be positive")) == 2
    assert capsys.readouterr().err == "error: 'seq' must be positive (see docs/config.md)\n"
    assert failing_command(KeyError("prompt")) == 2
    assert capsys.readouterr().err == "error: 'prompt'\n"
    with pytest.raises(RuntimeError):  # not bad input: the traceback stays
        failing_command(RuntimeError("bug"))


def test_a_command_may_exit_instead_of_returning(capsys):
    @one_line_errors(ValueError, status=1, exits=True)
    def data_command() -> int:
        raise ValueError("pile.index: no manifest")

    with pytest.raises(SystemExit) as exit_info:
        data_command()
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: pile.index: no manifest\n"
