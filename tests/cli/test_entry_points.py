"""Every way to start a command runs the command table's entry (mesh_transformer/cli/commands.py): the
installed console scripts are the table's and answer ``--help`` (called as the installed script calls
them, with sys.argv set), and so do the scripts at the top of a checkout and the ``python -m`` modules."""

import importlib.metadata
import re
import runpy
import sys
from unittest import mock

import pytest

from mesh_transformer.cli.commands import COMMANDS, Command, command_named, console_scripts
from tests.helpers import REPO

SCRIPTS: dict[str, str] = dict(line.split(" = ") for line in console_scripts())
DOCS = [REPO / "README.md", REPO / "REPRODUCING.md", *(REPO / "docs").glob("*.md")]
SCRIPT_FILES = [command.script for command in COMMANDS if command.script]
PYTHON_M = [alias.removeprefix("python -m ") for command in COMMANDS for alias in command.aliases
            if alias.startswith("python -m ")]


def help_output(start, argv0: str, capsys) -> str:
    """What ``start()`` prints for ``argv0 --help``; fails unless it exits with status 0."""
    with mock.patch.object(sys, "argv", [argv0, "--help"]):
        try:
            status = start()
        except SystemExit as e:
            status = e.code
    out, err = capsys.readouterr()
    assert status in (0, None), err[-2000:]
    assert "usage:" in out
    return out


def test_the_installed_console_scripts_are_the_tables():
    installed = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="console_scripts")
                 if entry.value.startswith("mesh_transformer.")}
    assert installed == SCRIPTS, "the package was installed from another command table: pip install -e . again"


def test_every_mtj_command_the_docs_name_is_a_console_script():
    named = {name for page in DOCS for name in re.findall(r"\bmtj-[a-z][a-z-]*", page.read_text("utf-8"))}
    assert named - set(SCRIPTS) == set()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_answers_help(name, capsys):
    module, _, function = SCRIPTS[name].partition(":")
    help_output(getattr(importlib.import_module(module), function), name, capsys)


@pytest.mark.parametrize("script", SCRIPT_FILES)
def test_each_original_script_runs_its_command(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts/ puts the checkout on it
    shown = help_output(lambda: runpy.run_path(str(REPO / script), run_name="__main__"), script, capsys)
    assert shown == help_output(main_of(command_named(f"python {script}")), script, capsys)


# cli/data.py and cli/demo.py are their own python -m modules: run again as __main__ after their import.
@pytest.mark.filterwarnings("ignore:'mesh_transformer.cli.* found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", PYTHON_M)
def test_each_python_m_module_runs_its_command(module, capsys):
    shown = help_output(lambda: runpy.run_module(module, run_name="__main__"), module, capsys)
    assert shown == help_output(main_of(command_named(f"python -m {module}")), module, capsys)


def main_of(command: Command):
    return command.function(command.main)
