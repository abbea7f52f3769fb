"""The package's layers point down (docs/architecture.md, "Layers", draws the same list).

Read from the source with ``ast``, every import counts (function-level and ``TYPE_CHECKING``
ones too, since a lazy import is still a dependency): a module may import its own package and
the packages of lower layers, never a package of its own layer or above; no import cycle; the
policy backends do not import each other; ``algorithms/`` imports neither megatron, Transformer
Engine nor vLLM. The checks are tested on made-up graphs first, so each one can fail.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastmath_nemo"

# Bottom to top. A package imports only packages of lower layers (and itself).
LAYERS: list[set[str]] = [
    {"config"},                # the schema, the loader, what the config alone decides
    {"utils"},                 # devices and torch.distributed, metrics, topology
    {"batching", "checkpoint"},  # Batch, micro-batches, step totals, documents | atomic files, manager, preemption
    {"data", "rewards"},       # records, chat, packing | extraction, verification, reward functions
    {"policy", "generation"},  # the two seams and their backends
    {"algorithms", "evaluation", "export", "planning"},  # stage loops | evaluation | formats | memory plan
    {"preflight"},             # every check before work starts, asking each implementation
    {"pipeline", "nemo_run"},  # the stages wired together | NeMo-Run recipes
]
# What both policy backends may share; everything else under policy/ belongs to one backend.
SHARED_POLICY = {"policy", "policy.base", "policy.optimization"}
MEGATRON_BACKEND = "policy.megatron"
FORBIDDEN_IN_ALGORITHMS = ("megatron", "transformer_engine", "vllm")


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, packages in enumerate(LAYERS):
        if top in packages:
            return index
    raise KeyError(f"fastmath_nemo.{module} is in no layer: add its package to LAYERS here and in docs/architecture.md")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every name imported by the file at ``path``: ``fastmath_nemo``'s modules without the
    prefix (``"batching.batch"``), other packages with ``"external:"`` (``"external:vllm"``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                yield name.removeprefix("fastmath_nemo.") if name.startswith("fastmath_nemo.") \
                    else f"external:{name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "fastmath_nemo" or (node.module or "").startswith("fastmath_nemo."):
                source = node.module.removeprefix("fastmath_nemo").lstrip(".")
            else:
                yield f"external:{node.module}"
                continue
            for alias in node.names:  # `from fastmath_nemo.config import schema` imports a module
                child = f"{source}.{alias.name}" if source else alias.name
                yield child if _is_module(child) else source


def import_graph() -> dict[str, set[str]]:
    """module -> the names it imports (see :func:`_imports`), for every module of the package."""
    return {_module_name(p): set(_imports(p, _module_name(p))) for p in sorted(PACKAGE.rglob("*.py"))}


# -- the checks, each a function of a graph -------------------------------------------------
def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, names in graph.items():
        if not module:
            continue
        for name in names:
            if name.startswith("external:") or not name or name.split(".")[0] == module.split(".")[0]:
                continue
            if layer_of(name) >= layer_of(module):
                found.append(f"{module} (layer {layer_of(module)}) imports {name} (layer {layer_of(name)})")
    return found


def backend_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, names in graph.items():
        if not module.startswith("policy"):
            continue
        in_megatron = module.startswith(MEGATRON_BACKEND)
        for name in names:
            if not name.startswith("policy") or name in SHARED_POLICY:
                continue
            if in_megatron != name.startswith(MEGATRON_BACKEND):
                found.append(f"{module} imports {name}: the backends share only {sorted(SHARED_POLICY)}")
    return found


def forbidden_in_algorithms(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} imports {name.removeprefix('external:')}" for module, names in graph.items()
            if module.startswith("algorithms") for name in names
            if name.startswith("external:") and name.removeprefix("external:").split(".")[0] in FORBIDDEN_IN_ALGORITHMS]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    edges = {m: sorted(n for n in names if n in graph and n != m) for m, names in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


# -- the package ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_package_is_in_a_layer(graph: dict[str, set[str]]) -> None:
    for module in graph:
        if module:
            layer_of(module)


def test_imports_point_down(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_config_imports_nothing_else_of_the_package(graph: dict[str, set[str]]) -> None:
    assert {n for m, names in graph.items() if m.startswith("config") for n in names
            if not n.startswith(("external:", "config"))} == set()


def test_the_policy_backends_are_independent(graph: dict[str, set[str]]) -> None:
    assert backend_imports(graph) == []


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_algorithms_import_no_backend_library(graph: dict[str, set[str]]) -> None:
    assert forbidden_in_algorithms(graph) == []


def test_the_graph_is_read_from_the_source(graph: dict[str, set[str]]) -> None:
    """The reader sees what the modules import, in each form the package writes imports."""
    assert "batching.batch" in graph["algorithms.losses"]  # from fastmath_nemo.batching.batch import Batch
    assert "config.schema" in graph["config.validate"]  # from fastmath_nemo.config import schema as s
    assert "checkpoint.manager" in graph["checkpoint.preemption"]  # under TYPE_CHECKING
    assert "policy.megatron.policy" in graph["pipeline"]  # inside a function
    assert "external:megatron.core" in graph["policy.megatron.model"]


def test_the_architecture_page_draws_these_layers() -> None:
    """docs/architecture.md's table ("| 7 | `pipeline`, `nemo_run` | ...") lists the same layers."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    drawn = {int(number): set(re.findall(r"`(\w+)`", packages))
             for number, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE)}
    assert drawn == dict(enumerate(LAYERS))


# -- the checks can fail ----------------------------------------------------------------------
def test_the_checks_report_what_they_forbid() -> None:
    made_up = {
        "config.schema": {"utils.distributed"},  # upward
        "batching.batch": {"checkpoint.atomic"},  # same layer, another package
        "policy.megatron.policy": {"policy.torch_policy", "policy.optimization"},  # one backend into the other
        "policy.torch_policy": {"policy.megatron.model"},
        "algorithms.grpo": {"external:vllm.sampling_params", "external:torch"},
        "data.a": {"data.b"},
        "data.b": {"data.c"},
        "data.c": {"data.a"},  # a cycle within a package
    }
    assert upward_imports(made_up) == ["config.schema (layer 0) imports utils.distributed (layer 1)",
                                       "batching.batch (layer 2) imports checkpoint.atomic (layer 2)"]
    assert backend_imports(made_up) == [
        f"policy.megatron.policy imports policy.torch_policy: the backends share only {sorted(SHARED_POLICY)}",
        f"policy.torch_policy imports policy.megatron.model: the backends share only {sorted(SHARED_POLICY)}",
    ]
    assert forbidden_in_algorithms(made_up) == ["algorithms.grpo imports vllm.sampling_params"]
    assert cycles(made_up) == [["data.a", "data.b", "data.c"]]
    with pytest.raises(KeyError, match="no layer"):
        layer_of("somewhere_new.module")
