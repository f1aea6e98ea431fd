"""The shape of the code: no import circle inside vera_core, a light `import vera_core`, short functions, tests
that do not import each other."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vera_core"
MAX_FUNCTION_LINES = 120


def _imports(path: Path) -> set[str]:
    """vera_core modules a file imports anywhere (top level or inside functions), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module.split(".")[0] if node.module else None
                found |= {base} if base else {alias.name for alias in node.names}
            elif node.module and node.module.startswith("vera_core."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vera_core.")}
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def test_no_import_circle_inside_vera_core():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert graph["compare"] >= {"report", "request", "train"}, "the walk must see real imports"

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, f"import circle: {' -> '.join(cycles[0])}"


def test_import_vera_core_loads_the_adapter_api_only():
    code = ("import sys, vera_core; heavy = ['sacrebleu', 'gradio', 'psutil', 'rouge_score', 'datasets', "
            "'matplotlib', 'vera_core.train', 'vera_core.compare']; print([m for m in heavy if m in sys.modules]); "
            "vera_core.train; print(callable(vera_core.train), 'psutil' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "True True"], out  # lazily there on first use, and still the function


def test_functions_in_vera_core_are_short():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines: {long}"


def test_no_test_module_imports_another():
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    offenders = [f"{p.name} imports {sorted(_test_imports(p) & tests)}" for p in Path(__file__).parent.glob("*.py")
                 if _test_imports(p) & tests]
    assert not offenders, offenders


def _test_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names
