"""Every flag README.md and docs/*.md name exists in the --help of the command it belongs to.

The documentation is read as a reader would run it: a command line (``python job.py ...``, ``python -m
result_stat.evaluate ...``, ``result_stat/testing_models_3d.sh ...``, ``python -m brats_fl.privacy svt ...``; in a
code block, lines continued with a backslash joined, or in an inline code span) owns the flags that follow it up to
the end of the line or span, a shell separator (``&&``, ``|``, ``;``), a ``#`` comment or the next command; each of
those must be in that command's --help. Every other ``--flag`` (prose, tables, comments, printed messages) must be in
the --help of at least one of the project's commands. Lines of third-party commands (pip, tensorboard, nvflare,
pytest, ruff, ``python -m`` of a module that is not the project's) are not ours and are skipped.

Each command's help comes from running it with --help from the repository root, once per session. To keep that to a
few seconds (most commands import torch and MONAI), one Python subprocess runs every command's ``__main__`` in turn,
as ``python job.py --help`` and ``python -m <module> --help`` would, and returns the texts.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from tiny_job import REPO_DIR

DOCS = (REPO_DIR / "README.md", *sorted((REPO_DIR / "docs").glob("*.md")))
OUR_PACKAGES = ("result_stat", "dataset_brats18", "benchmarks", "brats_fl")
SUBCOMMANDS = {"brats_fl.privacy": ("svt", "dpsgd")}
# Shell wrappers: every flag goes to the module they exec (checked below), so they take its flags.
WRAPPERS = {
    "result_stat/testing_models_3d.sh": "result_stat.evaluate",
    "benchmarks/gpu_check.sh": "benchmarks.gpu_check",
}
NO_FLAG_SCRIPTS = ("benchmarks/fetch_wheels.sh",)  # takes a Python version, no flags
# NVFlare's own job flags: nvflare.recipe takes them out of sys.argv before job.py's parser runs (job.py's epilog
# names them), so they are not in job.py's usage line.
NVFLARE_JOB_FLAGS = ("--export", "--export-dir")
THIRD_PARTY = ("pip", "pip3", "tensorboard", "nvflare", "pytest", "ruff")

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*(?:_\*)?")  # '--dp_*' names a family of flags
COMMAND = re.compile(
    r"""(?<![\w/.-])(?:
        (?P<job>(?:python3?\s+)?job\.py)\b
      | python3?\s+-m\s+(?P<module>[A-Za-z_][\w.]*)(?:\s+(?P<sub>[a-z]+)\b)?
      | (?:\./)?(?P<script>(?:result_stat/)?testing_models_3d\.sh|benchmarks/[\w]+\.sh)
      | (?P<test_helper>python3?\s+tests/[\w/]+\.py)
      | (?P<other>(?:"""
    + "|".join(THIRD_PARTY)
    + r"""))(?=\s)
    )""",
    re.VERBOSE,
)
SEPARATOR = re.compile(r"&&|\|\||;|\s\|\s|(?:^|\s)#(?:\s|$)")
THEIRS = "third-party"


@dataclass(frozen=True)
class FlagUse:
    doc: str  # path relative to the repository
    line: int
    command: str | None  # the command the flag is given to, THEIRS, or None for a flag named in prose
    flag: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


# ---------------------------------------------------------------------------------------------------------------
# Reading the documentation
# ---------------------------------------------------------------------------------------------------------------
def command_key(match: re.Match) -> str:
    """'job.py', a module (with its subcommand: 'brats_fl.privacy svt'), or THEIRS."""
    if match["job"]:
        return "job.py"
    if match["script"]:
        script = match["script"] if "/" in match["script"] else f"result_stat/{match['script']}"
        return WRAPPERS.get(script, script)
    if match["other"] or match["test_helper"]:  # a test's helper script documents its flags itself
        return THEIRS
    module = match["module"]
    if module.split(".")[0] not in OUR_PACKAGES:
        return THEIRS
    if match["sub"] and match["sub"] in SUBCOMMANDS.get(module, ()):
        return f"{module} {match['sub']}"
    return module


def command_spans(code: str) -> list[tuple[int, int, str]]:
    """(start, end, command) of each command line in a piece of code: from the command to the end of the code, a
    shell separator, a comment, or the next command."""
    starts = [(m.start(), m.end(), command_key(m)) for m in COMMAND.finditer(code)]
    spans = []
    for i, (start, after, key) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(code)
        separator = SEPARATOR.search(code, after, end)
        spans.append((start, separator.start() if separator else end, key))
    return spans


def flags_in_code(code: str) -> list[tuple[int, str | None, str]]:
    """(offset, command or None, flag) of every flag in a piece of code."""
    spans = command_spans(code)
    found = []
    for m in FLAG.finditer(code):
        owner = next((key for start, end, key in spans if start <= m.start() < end), None)
        found.append((m.start(), owner, m.group()))
    return found


def text_blocks(lines: list[str]) -> list[tuple[int, str, bool]]:
    """(first line number, text, is code) of each fenced code line (backslash continuations joined) and each
    paragraph of prose (its lines joined with spaces, so that inline code spans are whole)."""
    blocks, paragraph, in_fence, i = [], [], False, 0

    def flush():
        if paragraph:
            blocks.append((paragraph[0][0], " ".join(text for _, text in paragraph), False))
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            flush()
            in_fence = not in_fence
        elif in_fence:
            first, parts = i + 1, [line]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1].rstrip()[:-1]
                i += 1
                parts.append(lines[i])
            blocks.append((first, " ".join(parts), True))
        elif line.strip():
            paragraph.append((i + 1, line))
        else:
            flush()
        i += 1
    flush()
    return blocks


def flag_uses(markdown: str, doc: str = "<text>") -> list[FlagUse]:
    """Every flag in a markdown text with the command it is given to (None in prose)."""
    uses = []
    for first, text, is_code in text_blocks(markdown.splitlines()):
        if is_code:
            found = flags_in_code(text)
        else:
            found, covered = [], []
            for span in re.finditer(r"`([^`]+)`", text):
                covered.append(span.span())
                found += [(span.start(1) + off, key, flag) for off, key, flag in flags_in_code(span.group(1))]
            found += [
                (m.start(), None, m.group())
                for m in FLAG.finditer(text)
                if not any(a <= m.start() < b for a, b in covered)
            ]
        # a paragraph's line: count the joined lines before the flag by their lengths
        breaks = _line_breaks(markdown, first, text, is_code)
        for offset, key, flag in found:
            uses.append(FlagUse(doc, first + sum(b <= offset for b in breaks), key, flag))
    return uses


def _line_breaks(markdown: str, first: int, text: str, is_code: bool) -> list[int]:
    """Offsets in a joined block at which its 2nd, 3rd, ... source line starts."""
    lines = markdown.splitlines()
    breaks, offset, n = [], 0, first - 1
    while n < len(lines):
        source = lines[n]
        piece = source.rstrip()[:-1] if is_code and source.rstrip().endswith("\\") else source
        offset += len(piece) + 1
        if offset >= len(text):
            break
        breaks.append(offset)
        n += 1
    return breaks


@functools.cache
def documented_flags() -> tuple[FlagUse, ...]:
    uses = []
    for doc in DOCS:
        uses += flag_uses(doc.read_text(), str(doc.relative_to(REPO_DIR)))
    return tuple(uses)


# ---------------------------------------------------------------------------------------------------------------
# The commands' help
# ---------------------------------------------------------------------------------------------------------------
def cli_modules() -> list[str]:
    """The project's command-line modules: those that build an argparse parser and can be run (brats_fl/cli.py builds
    job.py's parser, which job.py runs)."""
    modules = []
    for package in OUR_PACKAGES:
        for path in sorted((REPO_DIR / package).rglob("*.py")):
            text = path.read_text()
            if "ArgumentParser(" in text and ("__main__" in text or path.name == "__main__.py"):
                parts = path.relative_to(REPO_DIR).with_suffix("").parts
                modules.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return modules


def all_commands() -> list[str]:
    commands = ["job.py"]
    for module in cli_modules():
        commands += [module] + [f"{module} {sub}" for sub in SUBCOMMANDS.get(module, ())]
    return commands


# Runs each command's __main__ with --help in one interpreter, as `python job.py --help` or
# `python -m <module> [sub] --help` would, and prints {command: [exit code, help text]} as JSON.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
out = {}
for command in json.loads(sys.argv[1]):
    target, *sub = command.split()
    buffer = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            if target.endswith(".py"):
                sys.argv = [target, *sub, "--help"]
                runpy.run_path(target, run_name="__main__")
            else:
                sys.argv = [target, *sub, "--help"]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    out[command] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


@functools.cache
def help_texts() -> dict[str, str]:
    """Every command's --help text, run once per session from the repository root."""
    commands = all_commands()
    done = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(commands)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {c: r for c, r in results.items() if r[0] != 0 or "usage:" not in r[1]}
    assert not bad, f"--help failed: {bad}"
    return {c: text for c, (_, text) in results.items()}


def usage_flags(help_text: str) -> set[str]:
    """The flags of argparse's usage lines (from 'usage:' to the first blank line): the options the command
    takes, and nothing its descriptions merely mention."""
    usage = help_text[help_text.index("usage:") :].split("\n\n", 1)[0]
    return set(FLAG.findall(usage)) | {"--help"}


@functools.cache
def command_flags() -> dict[str, frozenset[str]]:
    flags = {command: usage_flags(text) for command, text in help_texts().items()}
    assert all(flag in help_texts()["job.py"] for flag in NVFLARE_JOB_FLAGS), "job.py's epilog names --export"
    flags["job.py"] |= set(NVFLARE_JOB_FLAGS)
    for script in NO_FLAG_SCRIPTS:
        flags[script] = set()
    return {command: frozenset(f) for command, f in flags.items()}


def exists(flag: str, flags: frozenset[str] | set[str]) -> bool:
    if flag.endswith("*"):
        return any(f.startswith(flag[:-1]) for f in flags)
    return flag in flags


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
def unknown_flags(uses, flags: dict[str, frozenset[str]]) -> list[str]:
    """One line per documented flag that does not exist where the documentation says it does."""
    every = frozenset().union(*flags.values())
    problems = []
    for use in uses:
        if use.command == THEIRS:
            continue
        if use.command is None:
            if not exists(use.flag, every):
                problems.append(f"{use.where()}: {use.flag} is in no command's --help")
        elif use.command not in flags:
            problems.append(f"{use.where()}: {use.command} is not one of the project's commands ({use.flag})")
        elif not exists(use.flag, flags[use.command]):
            problems.append(f"{use.where()}: {use.flag} is not in `{use.command} --help`")
    return problems


def test_every_flag_in_the_docs_exists_in_its_commands_help():
    problems = unknown_flags(documented_flags(), command_flags())
    assert not problems, "flags named in the docs that the commands do not take:\n" + "\n".join(problems)


def test_the_docs_command_lines_are_found():
    """A guard for the scanner itself: the docs' main command lines are recognised as such."""
    by_command = {}
    for use in documented_flags():
        by_command.setdefault(use.command, set()).add(use.flag)
    assert {"--dataset_base_dir", "--n_clients", "--enable_dp", "--resume", "--checkpoint"} <= by_command["job.py"]
    assert {"--checkpoint", "--datalist_json_path", "--job_names"} <= by_command["result_stat.evaluate"]
    assert {"--datalist_json_path"} <= by_command["dataset_brats18.check_dataset"]
    assert {"--dp_noise_var"} <= by_command["brats_fl.privacy svt"]
    assert {"--n_train"} <= by_command["brats_fl.privacy dpsgd"]
    assert {"--index-url", "--logdir", "--startup-kit"} <= by_command[THEIRS]


def test_wrappers_pass_every_flag_to_their_module():
    for script, module in WRAPPERS.items():
        text = (REPO_DIR / script).read_text()
        assert re.search(rf"-m {re.escape(module)} \"\$@\"", text), script


@pytest.mark.parametrize(
    "markdown, expected",
    [
        # a continued command line in a code block, a comment, a second command after &&
        (
            "```bash\npython job.py --n_clients 2 \\\n    --no_such_flag   # --gpu here is prose\n"
            "pip install x --index-url y && python -m result_stat.evaluate --job_names a\n```\n",
            [
                (2, "job.py", "--n_clients"),
                (3, "job.py", "--no_such_flag"),
                (3, None, "--gpu"),
                (4, THEIRS, "--index-url"),
                (4, "result_stat.evaluate", "--job_names"),
            ],
        ),
        # inline code across a line break, prose flags, a subcommand, a wrapper script
        (
            "Run `python -m brats_fl.privacy svt\n--dp_gamma 1` or `--seed` with\n"
            "`result_stat/testing_models_3d.sh --gpu 0`; `tensorboard --logdir x`.\n",
            [
                (2, "brats_fl.privacy svt", "--dp_gamma"),
                (2, None, "--seed"),
                (3, "result_stat.evaluate", "--gpu"),
                (3, THEIRS, "--logdir"),
            ],
        ),
    ],
)
def test_the_scanner_assigns_flags_to_commands(markdown, expected):
    uses = flag_uses(markdown)
    assert sorted((u.line, u.command or "", u.flag) for u in uses) == sorted(
        (line, command or "", flag) for line, command, flag in expected
    )


def test_a_doc_naming_a_missing_flag_fails():
    flags = command_flags()
    broken = flag_uses(
        "```\npython -m result_stat.evaluate --models a.pt\n```\nand `--no_such_flag` in prose\n"
        "`python -m result_stat.plot_case --job brats18_4`\n"
    )
    assert unknown_flags(broken, flags) == [
        "<text>:2: --models is not in `result_stat.evaluate --help`",
        "<text>:4: --no_such_flag is in no command's --help",
        "<text>:5: --job is not in `result_stat.plot_case --help`",
    ]
