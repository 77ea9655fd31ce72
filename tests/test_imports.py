"""Every module of the package and every script imports, every import statement in them (also
those inside functions, for libraries that are slow to import) resolves, and every pin of the
requirements is met: a missing or too-old dependency fails here at once, not deep in a command."""

import ast
import importlib
import importlib.util
import pkgutil
from importlib.metadata import version

from conftest import ROOT
from packaging.requirements import Requirement

import ewa

SCRIPTS = ["analyze", "export_hf", "lawa", "model", "pythia_lawa", "report", "reproduce", "train_large", "train_medium",
           "train_small", "train_swa"]


def test_every_module_and_every_import_in_it_resolves():
    modules = [m.name for m in pkgutil.walk_packages(ewa.__path__, "ewa.")]
    assert len(modules) >= 20 and "ewa.tools.merge" in modules and "ewa.engine.trainer" in modules
    for name in modules + SCRIPTS:
        module = importlib.import_module(name)
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                imported = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(imported, alias.name) or importlib.import_module(f"{node.module}.{alias.name}"), (
                        f"{name}: from {node.module} import {alias.name}")


def project_imports(module: str) -> set[str]:
    """The project's modules (ewa.*, model) that ``module`` imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(open(importlib.import_module(module).__file__).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n == "model" or (n.startswith("ewa.") and is_module(n))}
    return found - {"ewa.engine", "ewa.tools"}


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, e.g. ewa.files.Weights
        return False


def test_layers_point_one_way_and_no_module_imports_itself_back():
    """files/window import nothing of the project; model only files; the engine never a tool."""
    modules = [m.name for m in pkgutil.walk_packages(ewa.__path__, "ewa.") if not m.ispkg] + ["model"]
    graph = {m: project_imports(m) for m in modules}
    for m, deps in graph.items():
        if m in ("ewa.files", "ewa.window"):
            assert not deps, (m, deps)
        elif m == "model":
            assert deps <= {"ewa.files"}, deps
        elif m.startswith("ewa.engine."):
            assert not any(d.startswith("ewa.tools") for d in deps), (m, deps)
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
        if m not in done:
            for d in graph.get(m, ()):
                visit(d, (*path, m))
            done.add(m)

    for m in modules:
        visit(m, ())


def test_installed_versions_meet_the_pins():
    for file in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / file).read_text().splitlines():
            text = line.split("#")[0].strip()
            if text:
                requirement = Requirement(text)
                assert requirement.specifier.contains(version(requirement.name), prereleases=True), (
                    f"{file}: {text}, but {version(requirement.name)} is installed")
