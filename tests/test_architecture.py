"""The package's three levels: commands import shared machinery and building blocks, never each other."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import xdc_fast

PACKAGE = Path(xdc_fast.__file__).parent
COMMANDS = {"pretrain", "finetune", "probe", "extract", "evaluate", "assign", "browse", "export", "demo", "bench", "cli",
            "submit"}
SHARED = {"config", "seeds", "engine", "pseudo_labels", "rounds", "transfer", "protocols", "metrics", "report", "learning"}
# demo, cli and submit run whole commands by design (the demo is pretrain + probes; the CLI dispatches;
# a submitted job runs the CLI in each of its tasks).
MAY_CALL_COMMANDS = {"demo", "cli", "submit"}


def imported_modules(path: Path) -> set[str]:
    """Top-level xdc_fast modules a file imports, at any depth of the file (lazy imports count)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts + [alias.name] for alias in node.names] if not node.module else [parts]
            else:
                names = [node.module.split(".")] if node.module else []
            for parts in names:
                if parts[0] == "xdc_fast" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "xdc_fast" and len(parts) > 1:
                    found.add(parts[1])
    return found


def level_of(module: str) -> int:
    return 3 if module in COMMANDS else 2 if module in SHARED else 1


def owner(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_no_command_imports_another_command():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        me = owner(path)
        if me not in COMMANDS or me in MAY_CALL_COMMANDS:
            continue
        offences += [f"{path.relative_to(PACKAGE)} imports {other}" for other in imported_modules(path)
                     if other in COMMANDS and other != me]
    assert not offences, offences


def test_arrows_point_only_downward():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        me = owner(path)
        if me == "__init__":
            continue
        offences += [f"{path.relative_to(PACKAGE)} (level {level_of(me)}) imports {other} (level {level_of(other)})"
                     for other in imported_modules(path) if level_of(other) > level_of(me)
                     and not (me in MAY_CALL_COMMANDS and level_of(other) == 3)]
    assert not offences, offences


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    sample = PACKAGE / "finetune.py"
    assert {"transfer", "config", "files"} <= imported_modules(sample)
    assert "pretrain" in imported_modules(PACKAGE / "cli.py")  # the lazy import inside a command


# Product text speaks of the product: no tracker numbers, no documents that live outside the repository.
# Nor how files reach one particular machine (its tool's "carry" of packed pieces).
OUTSIDE_REFERENCES = re.compile(r"\bissue \d+|REFERENCE §|REFERENCE\.md|DESIGN\.md|\bcarry \[|\.dpk\d", re.IGNORECASE)


def test_no_dangling_references_to_documents_outside_the_repository():
    root = PACKAGE.parent
    texts = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.yaml"), *(root / "docs").rglob("*.md"), root / "README.md",
             *(p for p in (root / "benchmarks").glob("*") if p.suffix in (".py", ".sh", ".md"))]
    offences = [f"{p.relative_to(root)}: {m.group(0)}" for p in texts for m in OUTSIDE_REFERENCES.finditer(p.read_text())]
    assert not offences, offences
    assert OUTSIDE_REFERENCES.search("as issue 12 says") and not OUTSIDE_REFERENCES.search("tissue 3")
    assert OUTSIDE_REFERENCES.search("carry [\".dpk1\"]")


# ---- the CLI reads its lists from the tables, and its help is cheap ---------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["pretrain", "--help"], ["evaluate", "--help"]])
def test_help_loads_neither_torch_nor_the_extension(args):
    script = ("import sys\nfrom xdc_fast.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
              "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m == 'xdc_fast._C')\n"
              "print('HEAVY', heavy)\n" % (args,))
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert shown.returncode == 0, shown.stderr
    assert "HEAVY []" in shown.stdout, shown.stdout.splitlines()[-1]
    assert "Usage:" in shown.stdout


def test_no_choice_list_is_written_out_in_the_cli():
    """Every click.Choice is built from a table (a name), never from a literal list of strings."""
    offences = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Choice" and node.args \
                    and isinstance(node.args[0], (ast.List, ast.Tuple, ast.Set)):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offences, offences


def test_every_cli_choice_is_a_table():
    import click

    from xdc_fast import choices, config, protocols
    from xdc_fast.cli import main
    from xdc_fast.data.formats import READERS
    from xdc_fast.data.shards import SHARD_CODECS
    from xdc_fast.data.synthetic import CODECS
    from xdc_fast.models.archs import ARCHS
    from xdc_fast.variants import CLUSTERINGS, VARIANTS

    tables = [tuple(t) for t in (VARIANTS, ARCHS, ("auto", *ARCHS), READERS, CODECS, SHARD_CODECS, CLUSTERINGS,
                                 protocols.PROTOCOLS,
                                 choices.LOADERS, choices.CONCRETE_LOADERS, choices.DEVICES, choices.CONCRETE_DEVICES,
                                 choices.MODALITIES, choices.CPU_ISAS, choices.RESUMES)]
    # Choices of a configuration field are declared once, on the field.
    for cls in (config.PretrainConfig, config.FinetuneConfig, config.ExtractConfig, config.EvaluateConfig):
        tables += [tuple(f.metadata["choices"]) for f in dataclasses.fields(cls) if f.metadata.get("choices")]

    def commands(group, prefix=""):
        for name, command in group.commands.items():
            yield f"{prefix}{name}", command
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")

    loose = [f"{name} --{p.name}: {p.type.choices}" for name, command in commands(main) for p in command.params
             if isinstance(p.type, click.Choice) and tuple(p.type.choices) not in tables]
    assert not loose, loose
