"""The README and the manual in docs/ stay true to the command line.

Every command line shown in them (in fenced code blocks, and in inline code that starts with
``xdc-fast``) names only flags that the command's ``--help`` lists; the README stays a short front door,
and every relative link of README.md and docs/*.md points at a file (and heading) that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 170

# Launchers that put an ``xdc-fast`` command line after their own arguments.
LAUNCHERS = (
    (re.compile(r"\$\(\s*which\s+xdc-fast\s*\)"), "xdc-fast"),  # torchrun ... $(which xdc-fast) pretrain ...
    (re.compile(r"(?<!\S)-m\s+xdc_fast\.cli(?!\S)"), "xdc-fast"),  # torchrun ... -m xdc_fast.cli pretrain ...
    (re.compile(r"(?<![\w/.-])(?:\S*/)?bin/xdc-fast(?!\S)"), "xdc-fast"),  # .venv/bin/xdc-fast demo ...
)
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FLAG = re.compile(r"^--[A-Za-z0-9][A-Za-z0-9-]*")


# ---- reading the pages -------------------------------------------------------------------------------

def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced code block, with ``\\`` continuations joined."""
    lines, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if pending:
                lines.append((start, pending))
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        stripped = line.rstrip()
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
        else:
            lines.append((start, pending + stripped))
            pending = ""
    return lines


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of inline code spans outside fenced blocks."""
    spans, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            spans += [(number, m.group(1).replace("\\|", "|")) for m in INLINE_CODE.finditer(line)]
    return spans


def command_lines(line: str) -> list[list[str]]:
    """The ``xdc-fast`` invocations in one shell line, each as its tokens after ``xdc-fast``.

    Comments are dropped, launchers (torchrun's ``-m xdc_fast.cli`` or ``$(which xdc-fast)``) become
    ``xdc-fast``, and ``&&``/``;`` separate commands."""
    line = re.sub(r"(^|\s)#.*$", "", line)
    for pattern, replacement in LAUNCHERS:
        line = pattern.sub(replacement, line)
    found = []
    for part in re.split(r"&&|\|\||;", line):
        tokens = part.split()
        if "xdc-fast" in tokens:
            tokens = tokens[tokens.index("xdc-fast") + 1:]
            while "--" in tokens:  # `xdc-fast submit ... -- COMMAND ...`: the command is an invocation too
                found.append(tokens[: tokens.index("--")])
                tokens = tokens[tokens.index("--") + 1:]
            found.append(tokens)
    return found


def split_invocation(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(command words, flags): the words that name a (sub)command of ``xdc-fast``, then every ``--flag``.

    ``[--flag VALUE]`` brackets, ``--flag=value`` and ``--a/--b`` alternatives are unwrapped."""
    from xdc_fast.cli import main

    words, group = [], main
    for token in tokens:
        if isinstance(group, click.Group) and token in group.commands:
            words.append(token)
            group = group.commands[token]
        else:
            break
    flags = []
    for token in tokens[len(words):]:
        for piece in token.strip("[]()<>{},").split("/"):
            match = FLAG.match(piece.strip("[]()<>{},"))
            if match:
                flags.append(match.group(0))
    return words, flags


def shown_invocations() -> list[tuple[str, list[str], list[str]]]:
    """(where, command words, flags) of every xdc-fast command line shown in README.md and docs/*.md."""
    shown = []
    for page in PAGES:
        text = page.read_text()
        candidates = fenced_lines(text) + [(n, s) for n, s in inline_spans(text) if s.lstrip().startswith("xdc-fast")]
        for number, line in candidates:
            for tokens in command_lines(line):
                words, flags = split_invocation(tokens)
                shown.append((f"{page.relative_to(ROOT)}:{number}", words, flags))
    return shown


_HELP: dict[tuple[str, ...], str] = {}


def help_text(words: list[str]) -> str:
    from xdc_fast.cli import main

    key = tuple(words)
    if key not in _HELP:
        result = CliRunner().invoke(main, [*words, "--help"])
        assert result.exit_code == 0, f"xdc-fast {' '.join(words)} --help failed:\n{result.output}"
        _HELP[key] = result.output
    return _HELP[key]


# ---- the tests ---------------------------------------------------------------------------------------

def test_every_flag_shown_in_the_docs_exists():
    shown = shown_invocations()
    unknown = []
    for where, words, flags in shown:
        if not words and not flags:
            unknown.append(f"{where}: `xdc-fast` without a known command")
            continue
        text = help_text(words)
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                unknown.append(f"{where}: xdc-fast {' '.join(words)} has no {flag}")
    assert not unknown, "flags shown in README.md / docs/*.md that the CLI does not have:\n" + "\n".join(unknown)


def test_the_docs_show_every_command():
    """The flag check above is only as good as its parsing: every command must be found at least once."""
    from xdc_fast.cli import main

    def leaves(group: click.Group, prefix: tuple[str, ...] = ()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from leaves(command, (*prefix, name))
            else:
                yield (*prefix, name)

    found = {tuple(words) for _, words, _ in shown_invocations()}
    missing = [" ".join(words) for words in leaves(main) if words not in found]
    assert not missing, f"commands never shown as `xdc-fast ...` in README.md or docs/*.md: {missing}"
    with_flags = {tuple(words) for _, words, flags in shown_invocations() if flags}
    assert {("pretrain",), ("finetune",), ("extract",), ("bench", "kmeans")} <= with_flags


def test_the_parser_reads_continuations_launchers_and_brackets():
    text = "\n".join([
        "```bash",
        "torchrun --nproc_per_node 8 -m xdc_fast.cli pretrain --data $DATA \\",
        "    --out runs/x [--epochs 4] --config=paper   # a comment --not-a-flag",
        "torchrun --nnodes 2 $(which xdc-fast) bench kmeans [--device cpu|cuda] [--b B]",
        "```",
    ])
    (_, first), (_, second) = fenced_lines(text)
    assert split_invocation(command_lines(first)[0]) == (["pretrain"], ["--data", "--out", "--epochs", "--config"])
    assert split_invocation(command_lines(second)[0]) == (["bench", "kmeans"], ["--device", "--b"])


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the detail into docs/"
    # CI and new users run exactly these (see .ci/run and the Makefile).
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return heading.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, inside = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and (match := re.match(r"^#{1,6}\s+(.*)$", line)):
            anchors.add(_slug(match.group(1)))
    return anchors


def _links(page: Path) -> list[str]:
    text = re.sub(r"(?ms)^\s*```.*?^\s*```", "", page.read_text())
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def test_the_readme_links_every_docs_page_and_each_exists():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README) if t.startswith("docs/")}
    assert linked, "README.md links no docs/ page"
    for target in linked:
        assert target.is_file(), f"README.md links {target.relative_to(ROOT)}, which does not exist"
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


# ---- the protocol table of docs/evaluation.md ----------------------------------------------------------------

PROTOCOL_ROW = re.compile(r"^\| `([\w@-]+)`", re.MULTILINE)


def undocumented_protocols(text: str | None = None) -> list[str]:
    """Protocols of the table in xdc_fast.protocols that docs/evaluation.md's protocol table lacks."""
    from xdc_fast.protocols import PROTOCOLS

    text = (ROOT / "docs" / "evaluation.md").read_text() if text is None else text
    documented = set(PROTOCOL_ROW.findall(text))
    return [name for name in PROTOCOLS if name not in documented]


def test_every_protocol_is_documented():
    assert undocumented_protocols() == []
