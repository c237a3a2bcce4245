"""The layout the style guide asks for, checked on the source itself: imports run one way, files stay small."""

import ast
import itertools
from pathlib import Path

from helpers import ROOT

PACKAGES = ("vqgen", "stage1_vqvae", "stage2_prior", "benchmarks", "experiments")


def source_files() -> list[Path]:
    root = Path(ROOT)
    return [p for d in PACKAGES for p in sorted((root / d).rglob("*.py"))] + [root / "sample.py"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at the top, inside a function or for type checking alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} & known
            found |= {f"{node.module}.{a.name}" for a in node.names} & known
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found


def test_no_two_files_import_each_other():
    files = {module_name(p): p for p in source_files()}
    deps = {name: imported_modules(path, set(files)) for name, path in files.items()}
    mutual = [(a, b) for a, b in itertools.combinations(sorted(files), 2) if b in deps[a] and a in deps[b]]
    assert mutual == []


def test_no_file_is_over_500_lines():
    files = source_files() + sorted(Path(ROOT, "tests").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
