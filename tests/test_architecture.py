"""The shape of the code: two rooms in vera_core (the adapter library never imports the lab), no import circle, a
light `import vera_core` and `import vera_core.adapters`, short functions everywhere, tests that do not import each
other."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vera_core"
ROOMS = ("adapters", "lab")
MAX_FUNCTION_LINES = 120
HEAVY = ["sacrebleu", "gradio", "psutil", "rouge_score", "datasets", "matplotlib"]


def _module_name(path: Path) -> str:
    """vera_core/lab/train.py -> 'lab.train'."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """vera_core modules a file imports anywhere (top level or inside functions), as 'room.module' names."""
    here = _module_name(path).split(".")[:-1]  # the package the file is in: ['lab'] or ['adapters']
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                found |= {".".join(parts)} | {".".join(parts + [a.name]) for a in node.names}
            elif node.module and node.module.startswith("vera_core."):
                parts = node.module.split(".")[1:]
                found |= {".".join(parts)} | {".".join(parts + [a.name]) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("vera_core.")}
    return {name for name in found if (PACKAGE / (name.replace(".", "/") + ".py")).is_file()}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for room in ROOMS for p in (PACKAGE / room).glob("*.py")
            if p.stem != "__init__"}


def test_vera_core_has_two_rooms_and_nothing_else():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"], flat
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ROOMS)


def test_the_adapter_library_imports_nothing_from_the_lab():
    graph = _graph()
    assert graph["lab.compare"] >= {"lab.report", "lab.request", "lab.train"}, "the walk must see real imports"
    assert "adapters.layers" in graph["lab.memory"], "the walk must see imports across rooms"
    offenders = {m: sorted(d for d in deps if d.startswith("lab.")) for m, deps in graph.items()
                 if m.startswith("adapters.")}
    assert not any(offenders.values()), f"the adapter library imports the lab: {offenders}"
    # The walk sees an injected import into the lab, relative or absolute, at any depth in a function.
    injected = PACKAGE / "adapters" / "_injected_for_test.py"
    for line in ("from ..lab.data import load_dataset", "from vera_core.lab import train", "import vera_core.lab.plots"):
        injected.write_text(f"def f():\n    {line}\n")
        try:
            assert any(d.startswith("lab.") for d in _imports(injected)), line
        finally:
            injected.unlink()


def test_no_import_circle_inside_vera_core():
    graph = _graph()

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, f"import circle: {' -> '.join(cycles[0])}"


@pytest.mark.parametrize("package", ["vera_core", "vera_core.adapters"])
def test_importing_the_package_loads_the_adapter_api_only(package):
    code = (f"import sys, {package}; heavy = {HEAVY + ['vera_core.lab.train', 'vera_core.lab.compare']}; "
            "print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]"], out


# Every public name of the flat layout (before the two rooms) still imports from the top level.
FLAT_LAYOUT_NAMES = (
    "VeraConfig LoraConfig add_adapter set_active_adapter active_adapter adapter_configs disabled_adapter merge_adapter "
    "unmerge_adapter remove_adapter save_adapter load_adapter load_adapters mixed_adapters export_peft count_parameters "
    "estimate_parameters generate_projections TrainConfig vera_grid lora_grid compare run_request RunRequest Report "
    "load_run list_runs load_run_model export TrainResult train evaluate load_model generate predict model_summary "
    "OFFLINE_MODELS TextDataset load_dataset preview format_preview BUILTIN_DATASETS estimate_memory largest_batch "
    "MemoryTracker bleu rouge_l generation_scores"
).split()


def test_lab_names_load_on_first_use_and_every_flat_layout_name_still_imports():
    code = ("import sys, vera_core; vera_core.train; print(callable(vera_core.train), 'psutil' in sys.modules, "
            "callable(vera_core.compare)); "
            f"names = {FLAT_LAYOUT_NAMES!r}; print(len(names), [n for n in names if n not in vera_core.__all__]); "
            "print([n for n in names if getattr(vera_core, n, None) is None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["True True True", "48 []", "[]"], out


@pytest.mark.parametrize("folder", ["vera_core", "app", "benchmarks"])
def test_functions_are_short(folder):
    long = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
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
