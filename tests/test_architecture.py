"""The package's three levels: commands import shared machinery and building blocks, never each other."""

import ast
import re
from pathlib import Path

import xdc_fast

PACKAGE = Path(xdc_fast.__file__).parent
COMMANDS = {"pretrain", "finetune", "probe", "extract", "evaluate", "assign", "browse", "export", "demo", "bench", "cli"}
SHARED = {"config", "seeds", "engine", "pseudo_labels", "transfer", "protocols", "metrics", "report", "learning"}
# demo and cli run whole commands by design (the demo is pretrain + probes; the CLI dispatches).
MAY_CALL_COMMANDS = {"demo", "cli"}


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
OUTSIDE_REFERENCES = re.compile(r"\bissue \d+|REFERENCE §|REFERENCE\.md|DESIGN\.md", re.IGNORECASE)


def test_no_dangling_references_to_documents_outside_the_repository():
    root = PACKAGE.parent
    texts = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.yaml"), *(root / "docs").rglob("*.md"), root / "README.md",
             *(p for p in (root / "benchmarks").glob("*") if p.suffix in (".py", ".sh", ".md"))]
    offences = [f"{p.relative_to(root)}: {m.group(0)}" for p in texts for m in OUTSIDE_REFERENCES.finditer(p.read_text())]
    assert not offences, offences
    assert OUTSIDE_REFERENCES.search("as issue 12 says") and not OUTSIDE_REFERENCES.search("tissue 3")
