"""The documentation stays true to the code: every command shown in a shell block of README.md,
REPRODUCING.md or docs/*.md parses with the real command-line parser of that command, and every
relative link points at a file (and heading) that exists.

Nothing here builds a model: each parser is imported lazily and only asked to parse.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from mesh_transformer.cli.commands import COMMANDS, Command, spellings
from tests.helpers import REPO

DOC_FILES = sorted([REPO / "README.md", REPO / "REPRODUCING.md", *(REPO / "docs").glob("*.md")])

ParseFn = Callable[[list[str]], object]


# ----- how each command parses its arguments -----

def parse_args_of(command: Command) -> ParseFn:
    """The command's own parser (``parse_args(argv)`` by default), which also runs its checks between options."""
    def parse(argv: list[str]) -> object:
        return command.function(command.parser)(argv)
    return parse


def parse_lm_eval_args(argv: list[str]) -> object:
    """The harness's command line, which reads sys.argv (mtj-lm-eval is the harness's lm-eval plus our model)."""
    from lm_eval._cli.harness import HarnessCLI

    with mock.patch.object(sys, "argv", ["lm-eval", *argv]):
        return HarnessCLI().parse_args()


# Every command the docs may show, and how it parses its arguments: each spelling of each command in the
# command table (mesh_transformer/cli/commands.py; a new command goes there), and the harness's lm-eval.
PARSERS: dict[str, ParseFn] = {spelling: parse_args_of(command)
                               for command in COMMANDS if command.parser for spelling in spellings(command)}
PARSERS.update({"mtj-lm-eval": parse_lm_eval_args, "lm-eval": parse_lm_eval_args})

# First words of commands that are not ours (shell, cloud and packaging tools): not checked.
EXEMPT_COMMANDS = frozenset({
    "pip", "cd", "export", "curl", "gcloud", "gsutil", "wget", "tar", "git", "kill", "cat", "echo", "ls",
    "mkdir", "cp", "mv", "rm", "head", "tail", "tee", "jq", "source", "ray", "openssl", "sudo", "apt-get",
})
# tpu_setup/*.sh are shell scripts (linted by shellcheck in test_tpu_setup), not Python command lines; nor is
# .ci/tests, the test tiers.
EXEMPT_PREFIXES = ("tpu_setup/", ".ci/")
# `python -m X` for these X, and `python -c ...`, are not ours either.
EXEMPT_PYTHON_MODULES = frozenset({"pytest", "pip", "venv"})
PYTHONS = frozenset({"python", "python3"})
SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console"})
OPERATORS = frozenset({"|", "||", "&&", ";", "&", "(", ")"})
REDIRECTIONS = frozenset({">", ">>", "<", ">&", "&>", "<<<"})
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ----- finding the commands in the docs -----

@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int
    words: tuple[str, ...]

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {shlex.join(self.words)}"


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) for each fenced block in a shell language."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, language = fence.group(1), fence.group(2).lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(marker):
            end += 1
        if language in SHELL_LANGUAGES:
            body = lines[i + 1:end]
            if language == "console":  # only the prompt lines are commands; the rest is output
                body = [line if line.lstrip().startswith("$ ") else "" for line in body]
            blocks.append((i + 2, body))
        i = end + 1
    return blocks


def logical_lines(first_line: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join backslash continuations: (line number where each command starts, its text)."""
    joined, start, parts = [], None, []
    for number, line in enumerate(lines, first_line):
        if start is None:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        joined.append((start, " ".join(parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


def replace_substitutions(text: str, placeholder: str = "SUBSTITUTED") -> str:
    """``$(...)`` (nested too) becomes one word: its output is an argument value, not a command of ours."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            out.append(placeholder)
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def simple_commands(text: str) -> list[list[str]]:
    """Split a command line at pipes, ;, && and & into word lists, without comments and redirections."""
    text = replace_substitutions(re.sub(r"^\s*\$ ", "", text))
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, tokens = [], [], list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in OPERATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTIONS:
            i += 1  # skip the redirection's target as well
        else:
            current.append(token)
        i += 1
    commands.append(current)
    return [without_env_prefix(words) for words in commands if without_env_prefix(words)]


def without_env_prefix(words: list[str]) -> list[str]:
    """``XLA_FLAGS=... python ...`` runs ``python ...``."""
    i = 0
    while i < len(words) and ENV_ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def is_exempt(words: list[str]) -> bool:
    first = words[0]
    if first in EXEMPT_COMMANDS or first.startswith(EXEMPT_PREFIXES):
        return True
    if first in PYTHONS and len(words) > 1:
        return words[1] == "-c" or (words[1] == "-m" and len(words) > 2 and words[2] in EXEMPT_PYTHON_MODULES)
    return False


def commands_in(path: Path) -> list[DocCommand]:
    found = []
    for first_line, lines in shell_blocks(path.read_text(encoding="utf-8")):
        for line_number, text in logical_lines(first_line, lines):
            for words in simple_commands(text):
                if not is_exempt(words):
                    found.append(DocCommand(path, line_number, tuple(words)))
    return found


DOC_COMMANDS = [command for path in DOC_FILES for command in commands_in(path)]


# ----- checking a command -----

def command_and_arguments(words: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The longest PARSERS key the words start with (so a subcommand is part of the name), and the rest."""
    if words[0] in PYTHONS:
        words = ("python", *words[1:])
    for length in range(min(len(words), 4), 0, -1):
        name = " ".join(words[:length])
        if name in PARSERS:
            return name, list(words[length:])
    return None, []


def parse_error(parse: ParseFn, argv: list[str]) -> str | None:
    """None if ``argv`` parses; else argparse's message."""
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            parse(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            # argparse prints the usage, then "PROG: error: ..."; the last line is the useful one.
            lines = stderr.getvalue().strip().splitlines()
            return lines[-1] if lines else f"exit status {e.code}"
    return None


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda c: c.where())
def test_command_parses(command: DocCommand):
    name, argv = command_and_arguments(command.words)
    assert name is not None, (
        f"{command}\nnot a known command: add its parser to PARSERS in tests/test_docs.py, or its first word "
        "to EXEMPT_COMMANDS if it is not ours")
    error = parse_error(PARSERS[name], argv)
    assert error is None, f"{command}\n{name} rejects these arguments:\n{error}"


def test_docs_show_commands_of_every_kind():
    """Guards the scanner: if it silently found nothing, every command test would pass vacuously."""
    shown = {command_and_arguments(c.words)[0] for c in DOC_COMMANDS}
    for name in ("python device_train.py", "python device_sample.py", "python device_serve.py", "python train.py",
                 "python eval_harness.py", "python to_hf_weights.py", "python scripts/create_finetune_tfrecords.py",
                 "python -m mesh_transformer.hf import", "python -m mesh_transformer.legacy",
                 "python -m mesh_transformer.plan", "python -m mesh_transformer.cli.demo"):
        assert name in shown, f"no shell block in the docs shows {name}"


def test_commands_in_the_table_exist():
    """A command the docs may show must be runnable: its script file, or its installed console script, exists."""
    installed = {entry.name for entry in importlib.metadata.entry_points(group="console_scripts")}
    for name in PARSERS:
        words = name.split()
        if words[0] in PYTHONS and words[1].endswith(".py"):
            assert (REPO / words[1]).is_file(), f"{name}: no such script"
        elif words[0].startswith("mtj-"):
            assert words[0] in installed, f"{words[0]} is not an installed console script (pip install -e . again?)"


def test_readme_keeps_the_test_command():
    """.ci/run runs "the README's test command"; the two must stay the same text."""
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (REPO / "README.md").read_text()


# ----- Python examples -----

PYTHON_IMPORT = re.compile(r"^\s*(?:from\s+(mesh_transformer[\w.]*)\s+import\s+([\w\s,]+)"
                           r"|import\s+(mesh_transformer[\w.]*))")


def package_imports(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(file:line, module, imported names) for each import from our package in a ```python block."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    in_python = False
    for number, line in enumerate(lines, 1):
        if re.match(r"^\s*```", line):
            in_python = not in_python and line.strip().lower() == "```python"
            continue
        match = PYTHON_IMPORT.match(line) if in_python else None
        if match:
            module = match.group(1) or match.group(3)
            names = tuple(n.split()[0] for n in (match.group(2) or "").split(",") if n.strip())
            found.append((f"{path.relative_to(REPO)}:{number}", module, names))
    return found


DOC_IMPORTS = [entry for path in DOC_FILES for entry in package_imports(path)]


@pytest.mark.parametrize("where, module, names", DOC_IMPORTS, ids=[e[0] for e in DOC_IMPORTS])
def test_python_examples_import_what_exists(where: str, module: str, names: tuple[str, ...]):
    """The package is being reorganised; an example must not keep an old module path."""
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{where}: {module} has no {', '.join(missing)}"


# ----- the scanner itself -----

def test_continuations_env_prefixes_comments_and_substitutions():
    lines = ['XLA_FLAGS=--xla_force_host_platform_device_count=4 python device_train.py --config c.json \\',
             '    --process-id 0 &   # first host',
             'python device_serve.py --api-key "$(openssl rand -hex 16)" | tee log.txt > /dev/null']
    commands = [words for _, text in logical_lines(1, lines) for words in simple_commands(text)]
    assert commands == [["python", "device_train.py", "--config", "c.json", "--process-id", "0"],
                        ["python", "device_serve.py", "--api-key", "SUBSTITUTED"],
                        ["tee", "log.txt"]]
    assert [start for start, _ in logical_lines(1, lines)] == [1, 3]


def test_console_blocks_check_only_prompt_lines():
    text = "```console\n$ mtj-plan --config c.json\nplan for c.json\n```\n"
    assert shell_blocks(text) == [(2, ["$ mtj-plan --config c.json", ""])]


def test_unknown_flags_and_missing_required_flags_are_reported():
    parse = PARSERS["python device_train.py"]
    assert parse_error(parse, ["--config", "c.json"]) is None
    assert "unrecognized arguments: --no-such-flag" in parse_error(parse, ["--config", "c.json", "--no-such-flag"])
    assert "--config" in parse_error(parse, [])


def test_subcommands_are_part_of_the_name():
    assert command_and_arguments(("mtj-hf", "import", "--hf-path", "x")) == ("mtj-hf import", ["--hf-path", "x"])
    assert command_and_arguments(("python3", "train.py", "--new")) == ("python train.py", ["--new"])
    assert command_and_arguments(("python", "new_script.py")) == (None, [])


# ----- links -----

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def without_fenced_blocks(text: str) -> str:
    return re.sub(r"^\s*(`{3,}|~{3,}).*?^\s*\1", "", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", without_fenced_blocks(text))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    for line in without_fenced_blocks(text).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link counts by its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(text: str) -> list[str]:
    text = prose(text)
    return [t for t in LINK.findall(text) + REFERENCE_LINK.findall(text) if not EXTERNAL.match(t)]


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target``, linked from ``page``, leads nowhere; None if it resolves."""
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    if not destination.exists():
        return f"{target} (no such file)"
    if anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination.read_text("utf-8")):
        return f"{target} (no heading with anchor #{anchor})"
    return None


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path):
    broken = [why for target in relative_links(path.read_text("utf-8")) if (why := broken_link(path, target))]
    assert not broken, f"{path.relative_to(REPO)}: broken links: {', '.join(broken)}"


def test_links_and_anchors_are_found_as_github_renders_them():
    text = ("# Sample and serve\n## `device_sample.py`: sample\n## Sample and serve\n"
            "See [serving](serving.md#http-api), `[not](a-link.md)` and\n```bash\n# not a heading\n```\n")
    assert heading_anchors(text) == {"sample-and-serve", "device_samplepy-sample", "sample-and-serve-1"}
    assert relative_links(text) == ["serving.md#http-api"]
