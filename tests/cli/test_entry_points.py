"""pyproject.toml's console scripts: every command module has one, each names a function that exists, and
each starts and answers ``--help`` (called as the installed script calls it, with sys.argv set)."""

import importlib
import sys
import tomllib
from unittest import mock

import pytest

from tests.helpers import REPO

SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
CLI = "mesh_transformer.cli"
# The commands the docs name; removing one breaks users' scripts.
DOCUMENTED = {"mtj-train", "mtj-create-tfrecords", "mtj-data", "mtj-demo", "mtj-pod", "mtj-plan", "mtj-sample", "mtj-serve",
              "mtj-eval-harness", "mtj-lm-eval", "mtj-hf", "mtj-to-hf", "mtj-convert-legacy"}


def command_modules() -> set[str]:
    return {f"{CLI}.{p.stem}" for p in (REPO / "mesh_transformer" / "cli").glob("*.py") if p.stem != "__init__"}


def test_every_command_module_has_a_console_script():
    targets = {target.partition(":")[0] for target in SCRIPTS.values()}
    assert command_modules() - targets == set()
    assert targets - command_modules() == set(), "a console script points outside mesh_transformer.cli"


def test_every_documented_command_is_a_console_script():
    assert DOCUMENTED - set(SCRIPTS) == set()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_answers_help(name, capsys):
    module, _, function = SCRIPTS[name].partition(":")
    entry_point = getattr(importlib.import_module(module), function)
    with mock.patch.object(sys, "argv", [name, "--help"]):
        try:
            status = entry_point()
        except SystemExit as e:
            status = e.code
    assert status in (0, None), capsys.readouterr().err[-2000:]
    assert "usage:" in capsys.readouterr().out
