"""The house's rules: what a newcomer sees at the root, which rooms hold the rest, how long a function may be, who
may import whom, that no code builds a command line for another, how long the README is. Read from the source with
ast, so a change that breaks a rule fails here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("run_training", "eval", "predict", "export", "demo", "reproduce")
MAX_ROOT_MODULES = 10
MAX_FUNCTION_LINES = 50
MAX_README_LINES = 200
# The packages beside the root's modules, each named for what it holds (the README's layout table names each).
PACKAGES = ("cli", "common", "deploy", "evaluation", "localization", "reproduction", "scoring", "storage", "training")
# The method's modules (the design card's) import, of this project, only these: no flags, no scripts.
METHOD_MODULES = ("cutpaste", "model", "density")
METHOD_MAY_IMPORT = ("common",)


def project_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in ("tests", ".git")
                  and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Project modules imported at module level (imports inside functions run later and cannot form a cycle)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_root_holds_the_design_card_and_the_scripts():
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    assert {f"{s}.py" for s in SCRIPTS} | {"cutpaste.py", "model.py", "dataset.py", "density.py"} >= set(root_modules)


def test_the_rest_lives_in_rooms_named_for_what_they_hold():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == sorted(PACKAGES) and not (ROOT / "support").exists()
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    assert all(f"`{name}/`" in layout for name in PACKAGES), "the README's layout table names every package"


def test_the_method_modules_know_nothing_of_the_command_line():
    project = set(PACKAGES) | set(SCRIPTS) | {"cutpaste", "model", "density", "dataset"}
    for name in (*METHOD_MODULES, "dataset"):
        imported = {m.split(".")[0] for m in all_imports(ROOT / f"{name}.py")} & project
        allowed = set(METHOD_MAY_IMPORT) | {"model", "density", "cutpaste"}
        allowed |= {"storage"} if name == "dataset" else set()  # dataset.py is also the download script
        assert imported <= allowed and "cli" not in imported, (name, imported)


def test_no_code_builds_a_command_line_for_a_parser():
    built = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in project_files()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "parse_args"
             and node.args and isinstance(node.args[0], (ast.List, ast.ListComp)) and getattr(node.args[0], "elts", 1)]
    assert not built, "parse an argv only where a user wrote it: " + ", ".join(built)


def all_imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module}
    return names


def test_no_function_is_longer_than_fifty_lines():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in project_files() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_scripts_are_never_imported_and_modules_form_no_cycle():
    modules = {module_name(p): p for p in project_files()}
    graph = {name: {m for m in top_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    importers = {name: [m for m, deps in graph.items() if name in deps] for name in SCRIPTS}
    assert not any(importers.values()), importers
    done, active = set(), []

    def visit(name):
        assert name not in active, f"import cycle: {' -> '.join(active[active.index(name):] + [name])}"
        if name not in done:
            active.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            active.pop()
            done.add(name)
    for name in sorted(graph):
        visit(name)


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES
