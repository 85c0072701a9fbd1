"""The package boundary: ``recall/`` (models and tensors) imports nothing from ``memory/`` (files,
records, versions) except the memory tokens, so a model change never reaches into the DB."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_recall_imports_only_the_token_manager_from_memory():
    bad = {f"{p.name}: {m}" for p in (ROOT / "recall").glob("*.py") for m in _imports(p)
           if (m == "memory" or m.startswith("memory.")) and m != "memory.token_manager"}
    assert not bad, sorted(bad)


def test_no_function_in_recall_or_memory_is_over_70_lines():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for d in ("recall", "memory") for p in sorted((ROOT / d).glob("*.py"))
            for n in ast.walk(ast.parse(p.read_text(), str(p)))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 70]
    assert not long, long
