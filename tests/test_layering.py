"""The layout is the pipeline: errors/registry/config/optim/utils -> data -> models -> methods ->
engine -> commands/cli. No module imports a higher layer, not even inside a function."""
import ast
from pathlib import Path

import segadapt

PACKAGE = Path(segadapt.__file__).parent
LAYERS = {"errors": 0, "registry": 0, "config": 0, "optim": 0, "utils": 0, "data": 1, "models": 2, "methods": 3,
          "engine": 4, "commands": 5, "cli": 5, "__main__": 5, "__init__": 5, "configs": 0}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def _imports(path: Path):
    """Absolute names of the segadapt modules a file imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("segadapt"):
                yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("segadapt"):
                    yield node.lineno, alias.name


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for line, name in _imports(path):
            if name != "segadapt" and _layer(name) > _layer(module):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_config_loading_imports_no_method_module():
    """The config loader validates method and model names through the registries; the import
    graph from segadapt.config has no edge to the layers above it."""
    for line, name in _imports(PACKAGE / "config.py"):
        assert _layer(name) == 0, (line, name)
