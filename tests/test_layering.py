"""Imports flow one way, down this list: the API (functional, factory, modules, long_net, memory,
module_swap, symbolic, cli) -> the graph passes (fx_passes) -> the variant table, the configs and
the attention block (variants, config, attention_block) -> the ops (registrations) -> the math
(kernels). The
float64 reference is imported by tests only; the alias package imports dilated_ops only; no
module imports a private name (``_x``) of a package it is not inside."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dilated_ops"
# Layer of each module or subpackage of dilated_ops (the rest is the API, layer 1); a module may
# import its own layer and higher numbers. _checks and _env (argument messages, machine state)
# serve every layer.
LAYERS = {"kernels": 5, "registrations": 4, "variants": 3, "attention_block": 3, "config": 3, "fx_passes": 2}
API = 1
SHARED = {"_checks", "_env"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path):
    """``(module, name or None)`` pairs imported by ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                yield mod, a.name


def imported(path: Path):
    names = set()
    for mod, name in imports(path):
        names.add(mod)
        if name:
            names.add(f"{mod}.{name}")
    return names


def layer(dotted: str) -> int:
    parts = dotted.split(".")
    return LAYERS.get(parts[1], API) if len(parts) > 1 else API


def layer_violations(module: str, names) -> list:
    mine = layer(module)
    bad = []
    for name in sorted(names):
        parts = name.split(".")
        if parts[0] == "dilated_ops" and len(parts) > 1 and parts[1] not in SHARED and layer(name) < mine:
            bad.append(f"{module} imports {name}")
    return bad


def private_violations(module: str, is_package: bool, pairs) -> list:
    """``a.b._c`` (a private module or name) may be imported only from inside ``a.b``."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    bad = []
    for mod, name in pairs:
        parts = mod.split(".") + ([name] if name else [])
        if parts[0] != "dilated_ops":
            continue
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__") and here[:i] != parts[:i]:
                bad.append(f"{module} imports {'.'.join(parts)}")
                break
    return bad


def files():
    return list(PACKAGE.rglob("*.py")) + list((ROOT / "dilated_attention_pytorch").rglob("*.py"))


def test_imports_flow_down_the_layers():
    bad = [v for path in PACKAGE.rglob("*.py") for v in layer_violations(module_name(path), imported(path))]
    assert not bad, "\n".join(bad)


def test_no_private_name_imported_from_another_package():
    bad = [v for path in files()
           for v in private_violations(module_name(path), path.name == "__init__.py", imports(path))]
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail():
    """The two rules catch what they should, on made-up imports."""
    assert layer_violations("dilated_ops.fx_passes.mha", {"dilated_ops.modules.DilatedAttention"})
    assert layer_violations("dilated_ops.kernels.dilated", {"dilated_ops.registrations.eager"})
    assert layer_violations("dilated_ops.variants", {"dilated_ops.fx_passes.config"})
    assert not layer_violations("dilated_ops.fx_passes.mha", {"dilated_ops.variants", "dilated_ops._checks"})
    assert private_violations("dilated_ops.module_swap", False, [("dilated_ops.fx_passes._emit", "emit_op")])
    assert private_violations("dilated_ops.module_swap", False, [("dilated_ops.fx_passes.report", "_PREFIX")])
    assert not private_violations("dilated_ops.fx_passes.mha", False, [("dilated_ops.fx_passes._emit", "emit_op")])
    assert not private_violations("dilated_ops.fx_passes", True, [("dilated_ops.fx_passes._emit", "emit_op")])
    assert not private_violations("dilated_ops.registrations.eager", False, [("dilated_ops._checks", None)])


def test_only_tests_import_the_reference():
    for path in files():
        assert "dilated_ops.kernels.reference" not in imported(path), path


def test_alias_package_imports_dilated_ops_only():
    for path in (ROOT / "dilated_attention_pytorch").glob("*.py"):
        assert imported(path) and all(n.split(".")[0] == "dilated_ops" for n in imported(path)), path
