"""Imports flow one way: API (config, factory, modules, long_net, memory, module_swap, symbolic) -> registrations ->
kernels, and fx_passes -> registrations; the reference is imported by tests only; the alias package imports dilated_ops only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API = {"config", "factory", "modules", "long_net", "memory", "module_swap", "symbolic"}


def imported(path: Path):
    """Module names (relative ones resolved inside dilated_ops) imported by ``path``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_lower_layers_do_not_import_upward():
    for layer in ("kernels", "registrations", "fx_passes"):
        for path in (ROOT / "dilated_ops" / layer).glob("*.py"):
            bad = {n for n in imported(path) if n.split(".")[:2] in [["dilated_ops", a] for a in API]}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_tests_import_the_reference():
    for path in list((ROOT / "dilated_ops").rglob("*.py")) + list((ROOT / "dilated_attention_pytorch").rglob("*.py")):
        assert "dilated_ops.kernels.reference" not in imported(path), path


def test_alias_package_imports_dilated_ops_only():
    for path in (ROOT / "dilated_attention_pytorch").glob("*.py"):
        assert imported(path) and all(n.split(".")[0] == "dilated_ops" for n in imported(path)), path
