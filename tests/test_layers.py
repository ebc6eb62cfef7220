"""The package's layers, checked: every import points down, no module imports itself in a
circle, and no private name crosses a package boundary.

Layers, bottom to top (a component may import its own modules and anything in a lower layer):

    0  leaf helpers   errors fsutil procs env gpus ui lock (and the package root)
    1  models, data   pure nn.Modules; shards, datasets, loader, prepare (not each other)
    2  precision      recipes, support, the converter, FSDP hooks, telemetry
    2  interop        Hugging Face folders in and out: config, name table, safetensors, tokenizer files
                      (beside precision: neither imports the other)
    3  perf           roofline, GEMM and layer timing caches, the layer policy
    4  config         JobConfig: imports registries only
    5  train          build, step, trainer, rollback, guard, checkpoint, ...
    6  bench, compare the measurers (not each other)
    7  commands       one module per verb
    8  cli            discovers the verbs; __main__ (9) calls it

Every import statement counts, at module level or inside a function: an import inside a
function still runs, and hides a cycle rather than removing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import SRC

PKG = SRC / "fp8lab"
RANKS = {
    **{leaf: 0 for leaf in ("errors", "fsutil", "procs", "env", "gpus", "ui", "lock", "__init__")},
    "models": 1, "data": 1, "precision": 2, "interop": 2, "perf": 3, "config": 4, "train": 5, "bench": 6,
    "compare": 6, "commands": 7, "cli": 8, "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    """'fp8lab.train.step' -> 'train'; 'fp8lab.env' -> 'env'; 'fp8lab' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    is_pkg = MODULES.get(importer, Path()).name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, source: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every fp8lab import in `source`;
    `from fp8lab.a import b` imports the module fp8lab.a.b when there is one."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "fp8lab"]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(importer, node)
            if mod.split(".")[0] != "fp8lab":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (mod, a.name, node.lineno))
    return out


def _private_attributes(source: str) -> list[tuple[str, str, int]]:
    """(module, _name, line) where a module bound by an fp8lab import is used as module._name."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fp8lab"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fp8lab.") and a.asname:
                    bound[a.asname] = a.name
    return [(bound[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
            and n.attr.startswith("_") and not n.attr.startswith("__")]


def violations(importer: str, source: str) -> list[str]:
    """What is wrong with the imports of module `importer` whose text is `source`."""
    here = component(importer)
    bad = []
    for mod, name, line in imports_of(importer, source):
        there = component(mod)
        if there not in RANKS:
            bad.append(f"{importer}:{line} imports {mod}, which is in no layer (add it to RANKS)")
        elif there != here and not (RANKS[there] < RANKS[here] or RANKS[there] == RANKS[here] == 0):
            bad.append(f"{importer}:{line} imports {mod}: {there} (layer {RANKS[there]}) is not below "
                       f"{here} (layer {RANKS[here]})")
        if name and name.startswith("_") and not name.startswith("__") and there != here:
            bad.append(f"{importer}:{line} imports the private name {name} from {mod}")
    for mod, attr, line in _private_attributes(source):
        if component(mod) != here:
            bad.append(f"{importer}:{line} uses the private name {mod}.{attr}")
    return bad


def test_every_import_points_down_and_no_private_name_crosses_a_package():
    assert set(map(component, MODULES)) <= set(RANKS), set(map(component, MODULES)) - set(RANKS)
    bad = [v for mod, path in sorted(MODULES.items()) for v in violations(mod, path.read_text())]
    assert not bad, "\n".join(bad)


def find_cycles(graph: dict[str, list[str]]) -> list[str]:
    """Every cycle a depth-first walk of `graph` meets, as 'a -> b -> a'."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles_between_modules():
    graph = {mod: sorted({m for m, _, _ in imports_of(mod, path.read_text()) if m in MODULES and m != mod})
             for mod, path in MODULES.items()}
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]  # it can see one
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(cycles)


# The back-edges the layering removed (issue "Architecture: every import points down"),
# each as it was written: the checker must still catch every one of them.
BACK_EDGES = [
    ("fp8lab.precision.layer_filter", "from fp8lab.bench.gpus import GPUS"),
    ("fp8lab.precision.layer_filter", "def f():\n    from fp8lab.bench.measure import cached_layer_times"),
    ("fp8lab.precision.layer_filter", "from fp8lab.bench.roofline import layer_speedup"),
    ("fp8lab.train.trainer", "from fp8lab.bench.gpus import bf16_peak_tflops"),
    ("fp8lab.train.trainer", "from fp8lab.bench.measure import stack_versions"),
    ("fp8lab.precision.gate", "def f():\n    from fp8lab.train.build import pick_device, resolve_compute_dtype"),
    ("fp8lab.config", "from fp8lab.bench.gpus import GPUS"),
    ("fp8lab.bench.advise", "from fp8lab.precision.convert import _matches"),
    ("fp8lab.bench.doctor", "def f():\n    from fp8lab.precision.capability import _probe"),
    ("fp8lab.bench.doctor", "from fp8lab.precision.capability import _rocm_fp8"),
    ("fp8lab.bench.doctor", "from fp8lab.precision.convert import _import_torchao"),
    ("fp8lab.bench.doctor", "from fp8lab.perf import measure\nmeasure._read('x')"),
    ("fp8lab.data.corpus", "from fp8lab.perf.measure import cache_dir"),
    ("fp8lab.models.llama", "from fp8lab.data import IGNORE_INDEX"),
    ("fp8lab.bench.step_bench", "from fp8lab.compare.verdict import judge"),
]


@pytest.mark.parametrize("importer,source", BACK_EDGES, ids=[f"{m}:{s.split()[-1]}" for m, s in BACK_EDGES])
def test_the_checker_catches_each_removed_back_edge(importer, source):
    assert violations(importer, source)


def test_the_checker_allows_what_the_layers_allow():
    assert not violations("fp8lab.train.step", "from fp8lab.precision.fsdp import post_optimizer_hook")
    assert not violations("fp8lab.precision.support", "from fp8lab.precision.probe import probe_recipe")
    assert not violations("fp8lab.perf.layer_policy", "from fp8lab.precision.convert import LayerChoice")
    assert not violations("fp8lab.env", "from fp8lab.errors import FP8LabError")
    assert not violations("fp8lab.train.checkpoint", "from fp8lab.train.faults import _TARGETS")  # same package
