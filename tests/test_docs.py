"""The user docs (README.md, docs/*.md) against the code: every flag a command's `--help` shows
is documented, every flag the docs write after one of our commands exists, the README stays a
README (under 350 lines), and every relative link points at a file (and heading) that exists.
Flags of `flwr` / `flower-*` commands are Flower's and not checked here."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350

# (name, how the docs write it (regex), argv after the interpreter for `--help`)
COMMANDS = [
    ("launch", r"-m flowertune_nlp\.launch\b", ["-m", "flowertune_nlp.launch"]),
    ("evaluation", r"-m evaluation(?![\w.])", ["-m", "evaluation"]),
    ("curve", r"-m evaluation\.curve\b", ["-m", "evaluation.curve"]),
    ("sweep", r"run_all_experiments\.sh|run_experiments\.py", ["run_experiments.py"]),
    ("baselines", r"-m flowertune_nlp\.baselines\b", ["-m", "flowertune_nlp.baselines"]),
    ("export", r"-m flowertune_nlp\.export\b", ["-m", "flowertune_nlp.export"]),
    ("tasks", r"-m flowertune_nlp\.tasks(?! +stand-in)\b", ["-m", "flowertune_nlp.tasks"]),
    ("tasks stand-in", r"-m flowertune_nlp\.tasks +stand-in\b",
     ["-m", "flowertune_nlp.tasks", "stand-in"]),
    ("federation", r"-m flowertune_nlp\.federation(?! +[a-z])",
     ["-m", "flowertune_nlp.federation"]),
    *[(f"federation {sub}", rf"-m flowertune_nlp\.federation +{sub}\b",
       ["-m", "flowertune_nlp.federation", sub])
      for sub in ("credentials", "proxy-config", "up", "down", "status")],
]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ALWAYS = {"--help"}


@cache
def help_flags(argv: tuple[str, ...]) -> frozenset[str]:
    """The option strings argparse lists in `--help` (each option line, not its help text)."""
    result = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("\noptions:\n", 1)[1]
    flags = set()
    for line in options.splitlines():
        match = re.match(r"^ {2}(-\S.*?)(?: {2,}|$)", line)
        if match:
            flags.update(FLAG.findall(match.group(1)))
    return frozenset(flags - ALWAYS)


def docs_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def command_uses(text: str) -> list[str]:
    """Every command line of the docs: code-block lines joined over trailing backslashes, and
    every inline `code` span."""
    uses = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        uses += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    uses += re.findall(r"`([^`\n]+)`", prose)
    return uses


def documented_flags(pattern: str) -> dict[str, str]:
    """Flag -> the docs line that writes it right after a command matching `pattern` (up to the
    end of that command: a pipe, `;`, `&&` or a comment)."""
    found = {}
    for line in command_uses(docs_text()):
        for match in re.finditer(pattern, line):
            rest = re.split(r"\s(?:\||;|&&|#)\s?", line[match.end():], maxsplit=1)[0]
            # A flag of a command that follows (e.g. `cmd -- other --flag`) is not this one's.
            rest = re.split(r"\s--\s", rest, maxsplit=1)[0]
            for flag in FLAG.findall(rest):
                found.setdefault(flag, line.strip())
    return found


@pytest.mark.parametrize("name,pattern,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_flag_of_the_help_is_documented(name, pattern, argv):
    text = docs_text()
    missing = sorted(f for f in help_flags(tuple(argv))
                     if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
    assert not missing, f"`{name}` flags in --help but not in README.md/docs: {missing}"


@pytest.mark.parametrize("name,pattern,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_documented_flag_exists(name, pattern, argv):
    known = help_flags(tuple(argv)) | ALWAYS
    unknown = {flag: line for flag, line in documented_flags(pattern).items()
               if flag not in known}
    assert not unknown, f"`{name}` has no such flags (docs lines): {unknown}"


def test_the_flag_checks_see_command_lines():
    """The parsing above finds flags where the docs write them (so the checks cannot pass by
    finding nothing)."""
    assert "--run-config" in documented_flags(COMMANDS[0][1])
    assert "--hosts" in documented_flags(r"-m flowertune_nlp\.federation +credentials\b")
    assert {"--run-config", "--no-jemalloc"} <= help_flags(("-m", "flowertune_nlp.launch"))


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ +(.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_point_at_existing_files_and_headings(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, fragment = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        missing_heading = bool(fragment) and path.suffix == ".md" and (
            not path.exists() or fragment not in anchors(path))
        if not path.exists() or missing_heading:
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"
