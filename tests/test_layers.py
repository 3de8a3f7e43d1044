"""Layer rules of the README's "Layout" section, checked on the source: every import (top-level, inside functions,
type-checking only ones too) of every module in the package, read with ``ast``, nothing imported."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "attnpipe"

UPPER = ("attnpipe.index", "attnpipe.evaluate", "attnpipe.encode", "attnpipe.query", "attnpipe.reindex")
UPPER += ("attnpipe.train", "attnpipe.dedup", "attnpipe.pipeline", "attnpipe.cli")
NETWORKS = ("attnpipe.models", "attnpipe.data", "attnpipe.encode", "attnpipe.evaluate", "attnpipe.query")
NETWORKS += ("attnpipe.train", "attnpipe.cli", "torch", "torchvision")
# (modules the rule applies to, what they must not import, why)
RULES = [
    (("attnpipe.index",), NETWORKS, "indices know vectors, not networks"),
    (("attnpipe.models", "attnpipe.data", "attnpipe.store", "attnpipe.fs"), UPPER, "readers know nothing downstream"),
    (("attnpipe.",), ("attnpipe.cli",), "the library never imports the CLI"),
]
# Rule breaks that exist and are reported, each with its reason; an entry that no longer breaks fails the test too,
# so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {
    (
        "attnpipe.index.lsh",
        "torch",
    ): "SimHash codes of tensors already on a GPU (lazy import; torch as an array library)",
    ("attnpipe.index.minhash", "torch"): "weighted MinHash on the GPU (lazy import; torch as an array library)",
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports; ``from pkg import name`` counts as ``pkg.name``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def violations() -> dict[tuple[str, str], str]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        deps = imports_of(path)
        for where, banned, why in RULES:
            if not _matches(mod, where):
                continue
            for dep in sorted(deps):
                hit = next((b for b in banned if _matches(dep, (b,))), None)
                if hit and not _matches(mod, (hit,)):  # a layer may import itself (cli -> cli)
                    found.setdefault((mod, hit), why)
    return found


def test_the_walker_sees_lazy_relative_and_from_imports(tmp_path):
    src = PKG / "index" / "search.py"
    deps = imports_of(src)
    assert {"faiss", "numpy", "attnpipe.store", "attnpipe.index.layout"} <= deps
    assert module_name(PKG / "index" / "__init__.py") == "attnpipe.index"
    assert module_name(PKG / "cli.py") == "attnpipe.cli"
    # the CLI imports command modules inside its functions; the walker must see those too
    assert {"attnpipe.encode", "attnpipe.index.build", "attnpipe.evaluate.runner"} <= imports_of(PKG / "cli.py")


def test_layer_rules_hold():
    found = violations()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    fixed = [k for k in KNOWN if k not in found]
    assert not new, "layer rule broken:\n" + "\n".join(f"  {m} imports {d}: {why}" for (m, d), why in new.items())
    assert not fixed, f"no longer broken, remove from KNOWN: {fixed}"


@pytest.mark.parametrize("mod", ["attnpipe.index.search", "attnpipe.index.build", "attnpipe.store", "attnpipe.fs"])
def test_low_layers_import_without_torch(mod):
    """Checked at runtime as well: a fresh interpreter importing the module does not load torch."""
    import subprocess
    import sys

    code = f"import sys, {mod}; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", (mod, out.stdout, out.stderr[-2000:])
