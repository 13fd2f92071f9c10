"""The project's own layout, read from its source with ast: imports go one way (components ->
the composed models -> data -> evaluation -> eval.py -> training -> train.py -> tools), there is
no import cycle, no library import hides inside a function, every library file opens with a
docstring and stays readable in length, and the README's layout table names every file."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each module's layer: a module may import its own layer and the ones before it, never after.
LAYERS = [
    ("weights.",),                                     # checkpoint I/O, GGUF, offline assets
    ("text.",),                                        # tokenizers
    ("precision",),                                    # the compute dtype, attention's kernel
    ("image_processor", "model", "vit", "qformer", "adapters"),   # components
    ("vlm", "dual_encoder"),                           # the composed models
    ("data.",),                                        # conversations, batches, easy-vqa
    ("evaluation.",),                                  # scoring, answering
    ("eval",),
    ("training.",),                                    # config, presets, runtime, stages, checkpoints
    ("train",),
    ("tools.",),
]
MAX_LINES = 450


def project_modules() -> dict[str, Path]:
    # not the tests, nor hidden folders (.git, a .venv, the GPU check's stand-ins in .gpu)
    files = [p for p in ROOT.rglob("*.py")
             if not any(d == "tests" or d.startswith(".") for d in p.relative_to(ROOT).parts)]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in files}


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module.startswith(n) if n.endswith(".") else module == n for n in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README's layout)")


def imports(path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] \
            if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name in modules:
                found.append((name, node.lineno, id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {name for name, _, _ in imports(p, modules) if name != m} for m, p in modules.items()}


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    wrong = [f"{m} (layer {layer(m)}) imports {dep} (layer {layer(dep)})"
             for m, deps in graph().items() for dep in deps
             if layer(dep) > layer(m)]
    assert not wrong, wrong


def find_cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search: every back edge closes a cycle, returned as its path."""
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(deps.get(m, ())):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle():
    assert not find_cycles(graph())


def test_the_checks_can_fail():
    """A cycle is found, and an import from a lower layer to a higher one is refused."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert layer("train") > layer("data.collate") > layer("vlm") > layer("model")
    assert "training.stages" in graph()["train"]


def test_no_import_inside_a_function():
    """Library imports are all at the top of their module: nothing dodges a cycle or hides a
    dependency in a function body."""
    inner = []
    for m, path in project_modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in ast.walk(node)
                          if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not inner, inner


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_library_files_open_with_a_docstring_and_stay_readable(module):
    path = project_modules()[module]
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no module docstring"
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path}: {n} lines (at most {MAX_LINES})"


def test_readme_layout_table_names_every_file():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+\.py|[\w]+/)`", table))
    for module, path in project_modules().items():
        rel = str(path.relative_to(ROOT))
        folder = rel.split("/")[0] + "/" if "/" in rel else None
        assert rel in named or folder in named, f"README's layout table does not name {rel}"
