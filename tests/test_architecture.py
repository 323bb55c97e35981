"""The import rules of the package, read from the source (ast) of every module, nothing imported.

- The layers that use the package (train/, integrations/, bench/) import from aepg_kernels only
  its public API (`import aepg_kernels as ak`, `from aepg_kernels import <name in __all__>`),
  their own subpackage, the other public subpackages, and the shared utilities aepg_kernels.utils.
- The kernels (backends/) import nothing above the op contract and the spec: only _contract,
  _spec, _torch_private, the compiled _C and backends/ itself.
- The spec layer imports only the contract; the contract and _torch_private import nothing of
  the package.
"""

import ast
import pathlib
from typing import Iterator, NamedTuple

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "aepg_kernels"  # the checkout's, not imported
ROOT = "aepg_kernels"
USER_SUBPACKAGES = ("train", "integrations", "bench")
PUBLIC_SUBPACKAGES = ("aepg_kernels.train", "aepg_kernels.integrations", "aepg_kernels.bench", "aepg_kernels.utils")
KERNEL_LAYER = (
    "aepg_kernels._contract",
    "aepg_kernels._spec",
    "aepg_kernels._torch_private",
    "aepg_kernels._C",
    "aepg_kernels.backends",
)
LOWER_LAYERS = {
    "aepg_kernels._spec": ("aepg_kernels._contract", "aepg_kernels._torch_private"),
    "aepg_kernels._contract": (),
    "aepg_kernels._torch_private": (),
}
# The harness measures the kernels themselves, below the public API: each exception names its
# module, the imported module (or package) and why. A new one needs a reason here; a stale one
# fails a test.
BENCH_EXCEPTIONS = {
    (
        "aepg_kernels.bench.resources",
        "aepg_kernels.backends.triton",
    ): "compiles the Triton kernels for sm_90 to report their registers and shared memory",
    (
        "aepg_kernels.bench.implementations",
        "aepg_kernels.backends",
    ): "triton_interpreter(): the Triton rows run only where the interpreter or a GPU is",
    (
        "aepg_kernels.bench.machine",
        "aepg_kernels.backends",
    ): "triton_interpreter(): the machine description records whether the interpreter is on",
    (
        "aepg_kernels.bench.perf_model",
        "aepg_kernels.backends.native",
    ): "the CUDA backend's on-chip column limit decides which kernel path the model bounds",
    (
        "aepg_kernels.bench.device_check",
        "aepg_kernels.backends.native",
    ): "the device session records whether the native kernels were built, and the build error",
}


class Import(NamedTuple):
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    names: tuple  # the name of `from target import name`; () when target is the module imported
    line: int

    def __str__(self):
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{self.module}:{self.line}: {what}"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    """Whether a dotted name of the package is a module or subpackage (the compiled _C included)."""
    if not dotted.startswith(ROOT + "."):
        return False
    path = PACKAGE_DIR.joinpath(*dotted.split(".")[1:])
    return path.is_dir() or path.with_suffix(".py").exists() or any(path.parent.glob(path.name + ".*.so"))


def package_imports() -> Iterator[Import]:
    """Every import of aepg_kernels by a module of aepg_kernels, relative ones made absolute."""
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, alias.name, (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, path.name == "__init__.py", node)
                for alias in node.names:  # `from package import submodule` imports the submodule
                    if _is_module(f"{target}.{alias.name}"):
                        yield Import(module, f"{target}.{alias.name}", (), node.lineno)
                    else:
                        yield Import(module, target, (alias.name,), node.lineno)


def _of_package(imp: Import) -> bool:
    return imp.target == ROOT or imp.target.startswith(ROOT + ".")


def _within(target: str, prefixes) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _public_names():
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("aepg_kernels/__init__.py defines no __all__")


def _in_subpackage(module: str, subpackages) -> bool:
    return _within(module, [f"{ROOT}.{name}" for name in subpackages])


def _is_public(imp: Import, public_names) -> bool:
    if imp.target == ROOT:  # `import aepg_kernels` or `from aepg_kernels import name`
        return all(name in public_names for name in imp.names)
    return _within(imp.target, PUBLIC_SUBPACKAGES)


def _excepted(imp: Import) -> bool:
    return any(imp.module == module and _within(imp.target, [target]) for module, target in BENCH_EXCEPTIONS)


def test_the_scan_finds_the_package_imports():
    """Guards the rules below against a scan that silently finds nothing."""
    imports = [imp for imp in package_imports() if _of_package(imp)]
    modules = {imp.module for imp in imports}
    assert (
        len(imports) > 50
        and {"aepg_kernels.functional", "aepg_kernels.train.trainer", "aepg_kernels.backends.triton.launch"} <= modules
    )


@pytest.mark.parametrize("subpackage", USER_SUBPACKAGES)
def test_train_integrations_and_bench_use_only_the_public_api(subpackage):
    public_names = _public_names()
    offending = [
        str(imp)
        for imp in package_imports()
        if _in_subpackage(imp.module, [subpackage])
        and _of_package(imp)
        and not _is_public(imp, public_names)
        and not _excepted(imp)
    ]
    assert not offending, (
        f"aepg_kernels.{subpackage} may import only the public API of aepg_kernels "
        "(its __all__, the subpackages train, integrations, bench, utils); these import "
        "private modules:\n" + "\n".join(offending)
    )


def test_every_bench_exception_is_still_used():
    imports = list(package_imports())
    stale = [
        f"{module} -> {target}"
        for module, target in BENCH_EXCEPTIONS
        if not any(imp.module == module and _within(imp.target, [target]) for imp in imports)
    ]
    assert not stale, "BENCH_EXCEPTIONS lists imports that no longer exist:\n" + "\n".join(stale)


def test_kernels_import_nothing_above_the_spec():
    offending = [
        str(imp)
        for imp in package_imports()
        if _in_subpackage(imp.module, ["backends"]) and _of_package(imp) and not _within(imp.target, KERNEL_LAYER)
    ]
    assert not offending, (
        "aepg_kernels.backends may import only "
        + ", ".join(KERNEL_LAYER)
        + " from the package; these import a higher layer:\n"
        + "\n".join(offending)
    )


@pytest.mark.parametrize("module", sorted(LOWER_LAYERS))
def test_contract_and_spec_import_only_below_them(module):
    allowed = LOWER_LAYERS[module]
    offending = [
        str(imp)
        for imp in package_imports()
        if imp.module == module and _of_package(imp) and not _within(imp.target, allowed)
    ]
    assert not offending, (
        f"{module} may import from the package only {', '.join(allowed) or 'nothing'}; "
        "these import a higher layer:\n" + "\n".join(offending)
    )
