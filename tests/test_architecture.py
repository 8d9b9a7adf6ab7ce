"""The package's layering, read from its imports (with ``ast``, importing nothing).

The engine (requests, scheduler, loop) sits on top. The executor below it reads
one plain-data module of the engine's, the step data; the KV manager, layers,
kernels and models read nothing of it. Each rule is one small function over
``imports_under``, so another rule is a few lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import orbitllm

ROOT = Path(orbitllm.__file__).parent.parent   # the folder holding the package
ENGINE = "orbitllm.engine"
STEP_DATA = "orbitllm.engine.step_data"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module the file imports, anywhere in it (functions and TYPE_CHECKING
    blocks included), relative imports resolved; ``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``."""
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full, root) else base)
    return found


def imports_under(subpackage: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module name -> its imports, for every module of ``orbitllm.<subpackage>``."""
    folder = root / "orbitllm" / subpackage
    assert folder.is_dir(), folder
    return {module_name(p, root): imports_of(p, root) for p in sorted(folder.rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def engine_imports(subpackage: str, allowed: tuple[str, ...] = (),
                   root: Path = ROOT) -> dict[str, set[str]]:
    """The modules of ``subpackage`` that import the engine beyond ``allowed``, and what."""
    bad = {}
    for module, names in imports_under(subpackage, root).items():
        hits = {n for n in names if _within(n, ENGINE) and not any(_within(n, a) for a in allowed)}
        if hits:
            bad[module] = hits
    return bad


def test_lower_floors_do_not_import_the_engine():
    for subpackage in ("layers", "kernels", "models", "kv"):
        assert engine_imports(subpackage) == {}, subpackage


def test_the_executor_imports_only_the_step_data_from_the_engine():
    assert engine_imports("executor", allowed=(STEP_DATA,)) == {}


def test_the_step_data_imports_nothing_else_from_the_engine():
    names = imports_of(ROOT / "orbitllm" / "engine" / "step_data.py")
    assert {n for n in names if _within(n, ENGINE)} == set()


def test_the_walker_sees_every_form_of_import(tmp_path):
    """The rules above pass only if the walker would have seen a violation."""
    pkg = tmp_path / "orbitllm"
    for folder in ("engine", "layers", "executor"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "request.py").write_text("class Request: ...\n")
    (pkg / "engine" / "step_data.py").write_text("")
    forms = {
        "absolute": "import orbitllm.engine.request\n",
        "from_package": "from orbitllm.engine import request\n",
        "from_module": "from orbitllm.engine.request import Request\n",
        "relative": "from ..engine.request import Request\n",
        "relative_package": "from .. import engine\n",
        "in_function": "def f():\n    from orbitllm.engine.request import Request\n",
        "type_checking": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from orbitllm.engine.request import Request\n"),
    }
    for name, source in forms.items():
        (pkg / "layers" / f"{name}.py").write_text(source)
    (pkg / "executor" / "fine.py").write_text(
        "from orbitllm.engine.step_data import X\nfrom ..engine import step_data\n")
    (pkg / "executor" / "not_fine.py").write_text("from orbitllm.engine import request, step_data\n")
    bad = engine_imports("layers", root=tmp_path)
    assert set(bad) == {f"orbitllm.layers.{n}" for n in forms}
    assert bad["orbitllm.layers.relative_package"] == {"orbitllm.engine"}
    assert bad["orbitllm.layers.from_package"] == {"orbitllm.engine.request"}
    assert engine_imports("executor", allowed=(STEP_DATA,), root=tmp_path) == {
        "orbitllm.executor.not_fine": {"orbitllm.engine.request"}}
