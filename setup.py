"""The console scripts come from the command table, mesh_transformer/cli/commands.py (pyproject.toml's
``dynamic = ["scripts"]``); everything else about the package is in pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import setup

# Read as a file, not imported: the package's own dependencies may not be installed yet.
TABLE = runpy.run_path(str(Path(__file__).parent / "mesh_transformer" / "cli" / "commands.py"))

setup(entry_points={"console_scripts": TABLE["console_scripts"]()})
