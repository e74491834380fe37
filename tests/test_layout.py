"""The repository's shape: entry scripts at the root over one package, alpaca_lib, that never imports them; one
user-error type that every command catches."""

import ast
import importlib
import inspect
import pkgutil

import alpaca_lib
from alpaca_lib.errors import UserError
from conftest import REPO_ROOT

ENTRY_SCRIPTS = {"generate_instruction", "train", "weight_diff", "inference", "judge", "data_report", "utils", "demo"}


def imported_modules(path):
    """Top-level names of every module `path` imports, anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "alpaca_lib":
                names.update(f"alpaca_lib.{alias.name}" for alias in node.names)
    return names


def package_modules():
    return {f"alpaca_lib.{m.name}": REPO_ROOT / "alpaca_lib" / f"{m.name}.py"
            for m in pkgutil.iter_modules([str(REPO_ROOT / "alpaca_lib")])}


def test_only_the_entry_scripts_are_python_files_at_the_root():
    assert {path.stem for path in REPO_ROOT.glob("*.py")} == ENTRY_SCRIPTS


def test_the_package_never_imports_an_entry_script():
    for module, path in package_modules().items():
        assert not {name.split(".")[0] for name in imported_modules(path)} & ENTRY_SCRIPTS, module


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    graph = {module: {name for name in imported_modules(path) if name in modules} for module, path in modules.items()}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_every_error_class_a_user_can_see_is_a_user_error():
    """cli.main catches UserError once: an error class of a command or of the package that is not one would reach
    the user as a traceback. Only the API client's per-request failures (and private signals), handled inside the
    commands, are not."""
    internal = {"RequestFailed", "RequestRefused"}
    for name in sorted(ENTRY_SCRIPTS | set(package_modules())):
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == module.__name__
                    and attr not in internal and not attr.startswith("_")):
                assert issubclass(value, UserError), f"{name}.{attr}"


def test_the_package_docstring_lists_every_module():
    listed = {line.split()[0] for line in alpaca_lib.__doc__.splitlines()[2:] if line.startswith("  ")}
    assert listed == {module.split(".")[1] for module in package_modules()} - {"__init__"}
