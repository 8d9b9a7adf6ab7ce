"""Import rules between the package's floors, checked on the source (ast): a model file
composes layers and names its checkpoint tensors, so it imports no kernel, and no
module that picks kernels for it."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "orbitllm"
# Kernel choice belongs to the layers: the Triton kernels themselves, and the layers'
# dispatch helpers (fused_ops_for, takes_gemv, matmul).
KERNEL_MODULES = ("orbitllm.kernels", "orbitllm.layers.fused", "orbitllm.layers.matmul")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a file of ``package`` imports, anywhere in it (from-imports also as
    ``module.name``, so ``from orbitllm import kernels`` counts)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def kernel_imports(source: str, package: str) -> list[str]:
    return sorted(m for m in imported_modules(source, package)
                  if any(m == k or m.startswith(k + ".") for k in KERNEL_MODULES))


def test_no_kernel_import_under_models():
    offenders = {}
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
        if found := kernel_imports(path.read_text(), package):
            offenders[str(path.relative_to(PACKAGE.parent))] = found
    assert offenders == {}


def test_the_check_sees_kernel_imports():
    """The rule can fail: plain, from- and relative imports, inside a function too."""
    source = ("import orbitllm.kernels.pdl\n"
              "from orbitllm.kernels.gemv import gemv\n"
              "from orbitllm import kernels\n"
              "def f():\n    from ..layers import fused\n")
    assert kernel_imports(source, "orbitllm.models") == [
        "orbitllm.kernels", "orbitllm.kernels.gemv", "orbitllm.kernels.gemv.gemv",
        "orbitllm.kernels.pdl", "orbitllm.layers.fused"]
    assert kernel_imports("from orbitllm.layers.linear import RowParallelLinear\n",
                          "orbitllm.models") == []
