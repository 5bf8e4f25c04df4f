"""The user documentation cannot rot.

* Every ``bscompress`` command line in a fenced code block of README.md and docs/*.md (but
  docs/benchmarks.md and docs/experiments.md, which belong to the benchmarks) parses against
  the real CLI: unknown options, wrong option names or value types and missing arguments fail
  with the file and line.
* Every ``python`` block of docs/api.md and docs/quickstart.md runs, each on its own.
* The quickstart's demo section runs end to end on the bundled demo model, with tiny settings.
* Every relative link (and ``#anchor`` into a Markdown file) resolves; every recipe file the
  docs name exists; every recipe example in the docs validates; docs/recipes.md covers every
  key of the recipe schema; docs/cli.md has a section for every command and mentions every
  option. (The shipped recipes themselves are validated by tests/test_finetune.py.)
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.core import recipe as recipe_schema
from bscompress.demo import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: docs whose commands belong to the benchmarks (they name files the benchmarks write)
BENCHMARK_DOCS = {"benchmarks.md"}
ALL_DOCS = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
COMMAND_DOCS = [p for p in ALL_DOCS if p.name not in BENCHMARK_DOCS]
PYTHON_DOCS = [DOCS / "api.md", DOCS / "quickstart.md"]
QUICKSTART = DOCS / "quickstart.md"
#: the quickstart section whose commands the end-to-end test runs, in order
DEMO_SECTION = "## The demo model, step by step"

GROUP = typer.main.get_command(app)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- Markdown ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file, the line of its first content line, its language."""

    path: Path
    line: int
    lang: str
    lines: tuple[str, ...]


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`{]*)")


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = len(match.group(1)), match.group(2), match.group(3).lower()
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        start, i = i + 1, i + 1
        while i < len(lines) and not close.match(lines[i]):
            i += 1
        body = tuple(line[indent:] if not line[:indent].strip() else line.lstrip()
                     for line in lines[start:i])
        blocks.append(Block(path, start + 1, lang, body))
        i += 1
    return blocks


def outside_code(path: Path) -> list[str]:
    """The file's lines with the fenced code blocks (fences included) blanked."""
    lines = path.read_text().splitlines()
    for block in code_blocks(path):
        for n in range(block.line - 1, min(block.line + len(block.lines) + 1, len(lines) + 1)):
            lines[n - 1] = ""
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for text in outside_code(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", text)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


# -- shell command lines -------------------------------------------------------------------

SHELL_LANGS = {"", "bash", "sh", "shell", "zsh", "console", "text"}
_REDIRECT = re.compile(r"^[<>&]+$")
_SEPARATORS = {"|", "||", "&&", ";", "&"}


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """``(line number, command)`` of the shell commands in a block, ``\\`` continuations joined.

    Shell blocks: every line, or only the ``$ ``-prompt lines when there are any (``text``
    blocks without prompts are output). YAML blocks: ``run:`` values and block scalars.
    """
    if block.lang in ("yaml", "yml"):
        candidates = []
        for k, raw in enumerate(block.lines):
            text = re.sub(r"^\s*(-\s+)?(run:\s*)?", "", raw)
            candidates.append((k, text))
    elif block.lang in SHELL_LANGS:
        prompted = any(line.lstrip().startswith("$ ") for line in block.lines)
        if block.lang == "text" and not prompted:
            return []
        candidates = [(k, line.lstrip()[2:] if prompted else line)
                      for k, line in enumerate(block.lines)
                      if not prompted or line.lstrip().startswith("$ ")]
    else:
        return []
    out = []
    for k, text in candidates:
        line, j = text.rstrip(), k
        while line.endswith("\\") and j + 1 < len(block.lines):
            j += 1
            line = line[:-1] + " " + block.lines[j].strip()
        out.append((block.line + k, line))
    return out


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` starting a word outside quotes."""
    quote, escaped = None, False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line as token lists: comments, pipes, ``&&``/``;`` and
    redirections (``>``, ``2>&1``, ``< in``) taken apart. ``ValueError`` on unbalanced
    quotes."""
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", strip_comment(line))  # the 2 of 2>&1
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = list(lexer)
    commands, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in _SEPARATORS:
            commands.append(current)
            current = []
        elif _REDIRECT.match(token):
            skip = True  # and its target: a file, or the 1 of >&1
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def bscompress_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``bscompress`` (or ``python -m bscompress``, ``torchrun … -m
    bscompress``) when the command runs bscompress, else ``None``."""
    i = 0
    while i < len(tokens) and (re.match(r"^[A-Za-z_]\w*=", tokens[i]) or tokens[i] in
                               ("env", "time", "exec")):
        i += 1
    if i >= len(tokens):
        return None
    program = Path(tokens[i]).name
    if program == "bscompress":
        return tokens[i + 1:]
    if program == "torchrun" or re.fullmatch(r"python[\d.]*", program):
        for j in range(i + 1, len(tokens) - 1):
            if tokens[j] == "-m":
                return tokens[j + 2:] if tokens[j + 1] == "bscompress" else None
    return None


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int
    text: str
    args: tuple[str, ...]
    error: str | None = None  # the line could not be split into words

    @property
    def id(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


def doc_commands(paths: list[Path]) -> list[DocCommand]:
    out = []
    for path in paths:
        for block in code_blocks(path):
            for line_no, line in shell_lines(block):
                try:
                    commands = split_commands(line)
                except ValueError as err:
                    if "bscompress" in line:
                        out.append(DocCommand(path, line_no, line, (), str(err)))
                    continue
                for tokens in commands:
                    args = bscompress_args(tokens)
                    if args is not None:
                        out.append(DocCommand(path, line_no, line, tuple(args)))
    return out


COMMANDS = doc_commands(COMMAND_DOCS)


def parse(args: tuple[str, ...]) -> str | None:
    """Parse ``bscompress ARGS`` like the CLI would, without running anything: the name of
    the command, or ``None`` for the group's own options (``--version``, ``--help``)."""
    args = list(args)
    while args and args[0] == "--debug":
        args.pop(0)
    if not args or args[0] in ("--version", "--help", "-h"):
        return None
    name, rest = args[0], args[1:]
    command = GROUP.commands.get(name)
    assert command is not None, (f"no command {name!r}; the commands are "
                                 f"{', '.join(GROUP.commands)}")
    if "--help" in rest or "-h" in rest:
        return name
    command.make_context(name, rest, resilient_parsing=False)  # raises on bad arguments
    return name


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_parses(command):
    if command.error:
        pytest.fail(f"{command.id}: `{command.text}` is not a shell line: {command.error}",
                    pytrace=False)
    try:
        parse(command.args)
    except Exception as err:  # click's UsageError family, or the assertion above
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        pytest.fail(f"{command.id}: `{command.text}` does not parse: {message}",
                    pytrace=False)


def test_every_command_is_documented_with_an_example():
    used = {c.args[0] for c in COMMANDS if c.args and not c.args[0].startswith("-")}
    assert set(GROUP.commands) <= used, f"no documented example of {set(GROUP.commands) - used}"
    # the parser really rejects what it should: a guard against a check that passes anything
    for bad in (("decompose", "m.pt"), ("decompose", "m.pt", "-o", "x.pt", "--rnak", "2"),
                ("bench", "a.pt", "--runs", "three"), ("nosuchcommand",)):
        with pytest.raises(Exception):  # noqa: B017 — click's errors or the assertion
            parse(bad)


def _sections(path: Path) -> dict[str, str]:
    """Level-2 sections of a Markdown file by heading text."""
    parts = re.split(r"(?m)^## ", path.read_text())
    return {part.splitlines()[0]: part for part in parts[1:]}


def test_cli_reference_has_a_section_for_every_command_and_mentions_every_option():
    sections = _sections(DOCS / "cli.md")
    shared = sections.get("MODEL", "") + sections.get("Options shared by several commands", "")
    for name, command in GROUP.commands.items():
        own = [text for heading, text in sections.items()
               if heading.startswith(f"`bscompress {name} ") or heading == f"`bscompress {name}`"]
        assert own, f"docs/cli.md has no section '## `bscompress {name} …`'"
        for param in command.params:
            names = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")]
            if not names or param.name == "help":
                continue
            pattern = "|".join(rf"(?<![\w-]){re.escape(o)}(?![\w-])" for o in names)
            assert re.search(pattern, own[0] + shared), (
                f"docs/cli.md does not mention {names[0]} of `bscompress {name}`")


# -- Python blocks -------------------------------------------------------------------------

PYTHON_BLOCKS = [b for p in PYTHON_DOCS if p.exists() for b in code_blocks(p)
                 if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS,
                         ids=[f"{_rel(b.path)}:{b.line}" for b in PYTHON_BLOCKS])
def test_python_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "\n".join(block.lines) + "\n"
    exec(compile(source, f"{_rel(block.path)}:{block.line}", "exec"), {"__name__": "__main__"})


def test_api_docs_have_examples():
    assert sum(b.path.name == "api.md" for b in PYTHON_BLOCKS) >= 8


# -- the quickstart, end to end ------------------------------------------------------------

#: what the end-to-end run changes to stay within seconds: the last occurrence of an option
#: wins, so these are appended. ``auto`` under the budget fits every candidate of five forms
#: to the calibration statistics (half a minute); DSC under the same budget runs the same
#: code path (budget, calibration, BatchNorm re-estimation) in a second or two.
TINY = {
    "inspect": [],
    "decompose": ["--method", "dsc", "--calib-samples", "64"],
    "evaluate": ["--limit", "256"],
    "finetune": [],  # recipes/demo-kd.yaml is replaced by a two-step copy, below
    "export": ["--limit", "64"],
    "bench": ["--runs", "3", "--warmup", "1", "--batch", "2", "--limit", "128",
              "--profile-top", "0"],
}


def demo_commands() -> list[DocCommand]:
    lines = QUICKSTART.read_text().splitlines()
    assert DEMO_SECTION in lines, f"docs/quickstart.md lost its section {DEMO_SECTION!r}"
    start = lines.index(DEMO_SECTION) + 1
    end = next((n for n in range(start, len(lines)) if lines[n].startswith("## ")), len(lines))
    return [c for c in COMMANDS if c.path == QUICKSTART and start < c.line <= end]


def _outputs(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output")]


@pytest.mark.slow  # an end-to-end run (13–20 s): the slow tier, which CI runs
def test_quickstart_demo_runs_end_to_end(tmp_path, monkeypatch):
    commands = demo_commands()
    names = [c.args[0] for c in commands]
    assert set(TINY) <= set(names), f"the quickstart demo lost a step: {names}"
    # the working tree the quickstart assumes: the repository's demo checkpoint and recipe
    (tmp_path / "bscompress" / "demo").mkdir(parents=True)
    shutil.copyfile(CHECKPOINT, tmp_path / "bscompress" / "demo" / "fmnist_resnet.pt")
    tiny = yaml.safe_load((ROOT / "recipes" / "demo-kd.yaml").read_text())
    tiny.update(epochs=1, steps_per_epoch=2)
    tiny["data"].update(limit_train=128, limit_val=256)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo-kd.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in commands:
        args = [*command.args, *TINY.get(command.args[0], [])]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (
            f"{command.id}: `bscompress {' '.join(args)}` exited {result.exit_code}:\n"
            f"{result.output}")
        for output in _outputs(args):
            assert Path(output).exists(), f"{command.id}: no {output} written"


# -- links, recipes ------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of the Markdown links and images outside code, but URLs."""
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in outside_code(path))
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _LINK.finditer(text)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", m.group(1), re.I)]


LINKS = [(path, n, target) for path in ALL_DOCS for n, target in links(path)]


@pytest.mark.parametrize("path, line, target", LINKS,
                         ids=[f"{_rel(p)}:{n}:{t}" for p, n, t in LINKS])
def test_relative_link_resolves(path, line, target):
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    assert resolved.exists(), f"{_rel(path)}:{line}: link to {target} — no such file"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), (
            f"{_rel(path)}:{line}: link to {target} — no heading with that anchor in "
            f"{resolved.name}")


def test_named_recipe_files_exist():
    named = {(path, name) for path in ALL_DOCS
             for name in re.findall(r"recipes/[\w.-]+\.ya?ml", path.read_text())}
    missing = sorted(f"{_rel(p)}: {n}" for p, n in named if not (ROOT / n).exists())
    assert not missing, f"docs name recipe files that do not exist: {missing}"


#: YAML blocks with a top-level ``data:`` key: recipes (a GitHub Actions file has none)
RECIPE_EXAMPLES = [b for p in ALL_DOCS for b in code_blocks(p) if b.lang in ("yaml", "yml")
                   and any(re.match(r"^data:", line) for line in b.lines)]


@pytest.mark.parametrize("block", RECIPE_EXAMPLES,
                         ids=[f"{_rel(b.path)}:{b.line}" for b in RECIPE_EXAMPLES])
def test_recipe_example_validates(block):
    where = f"{_rel(block.path)}:{block.line}"
    recipe_schema.parse_recipe(yaml.safe_load("\n".join(block.lines)), f"recipe at {where}")


def test_recipe_reference_covers_every_key():
    text = (DOCS / "recipes.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    sections = [cls for cls in vars(recipe_schema).values()
                if isinstance(cls, type) and issubclass(cls, BaseModel)
                and cls.__module__ == recipe_schema.__name__]
    assert recipe_schema.Recipe in sections
    missing = sorted(f"{cls.__name__}.{field}" for cls in sections
                     for field in cls.model_fields if field not in documented)
    assert not missing, f"docs/recipes.md does not document {missing}"
