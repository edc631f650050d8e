"""The package's structure, read from its own imports (scripts/import_graph.py): layered, one room for scores."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_import_picture_is_the_code_s(graph):
    assert graph.main(["--check"]) == 0, "docs/architecture.md's import picture is stale: python scripts/import_graph.py --write"


def test_parts_form_no_cycle(graph):
    assert graph.cycles(graph.part_edges()) == []


def test_cycle_finder_sees_a_cycle(graph):
    assert graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert graph.cycles({"a": {"b"}, "b": set()}) == []


def test_capture_and_lower_layers_do_not_import_evaluation(graph):
    edges = graph.part_edges()
    assert "evaluation" in edges
    for part in ("geometry", "scenes", "sets", "baselines", "probing", "model", "interventions"):
        assert "evaluation" not in edges.get(part, set()), f"{part} imports corrlab.evaluation"


def test_evaluation_functions_are_defined_only_in_evaluation():
    """No second scorer, pooling or best-cell rule: no function of corrlab.evaluation's public names is
    defined anywhere else in the package."""
    import corrlab.evaluation as evaluation

    public = {name for name in evaluation.__all__ if callable(getattr(evaluation, name)) and name[0].islower()}
    assert {"score_record", "pool_scores", "best_layer_step", "comparison_table", "held_out_scores"} <= public
    owners: dict[str, list[str]] = {}
    for path in (ROOT / "corrlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in public:
                owners.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    outside = {name: paths for name, paths in owners.items() if any(not p.startswith("corrlab/evaluation/") for p in paths)}
    assert outside == {}
    assert public <= set(owners)
