"""The committed notebooks: outputs stripped, a papermill ``parameters`` cell, fast mode wired in.

Executing them is ``pytest --nbmake notebooks/`` (part of ``make test``).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from corrlab.errors import CorrlabError, WeightsNotFoundError
from corrlab import notebook_helpers as nbhelp

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_the_five_notebooks_exist():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `python scripts/strip_notebooks.py`"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state; run `python scripts/strip_notebooks.py`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell_of_plain_assignments(path):
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code"
    body = ast.parse(cells[0].source).body
    assert body and all(isinstance(s, ast.Assign) for s in body)
    for stmt in body:  # literals only: papermill replaces them
        ast.literal_eval(stmt.value)
    assert "fast_mode()" in "".join(c.source for c in nb.cells if c.cell_type == "code")


def test_strip_script_removes_outputs(tmp_path):
    import strip_notebooks

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    nb.cells[0].execution_count = 1
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert strip_notebooks.main(["--check", str(path)]) == 1
    assert strip_notebooks.main([str(path)]) == 0
    clean = nbformat.read(path, as_version=4)
    assert clean.cells[0].outputs == [] and clean.cells[0].execution_count is None
    assert strip_notebooks.main(["--check", str(path)]) == 0


def test_fast_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(nbhelp.FAST_ENV, raising=False)
    assert nbhelp.fast_mode() is False
    monkeypatch.setenv(nbhelp.FAST_ENV, "1")
    assert nbhelp.fast_mode() is True
    monkeypatch.setenv(nbhelp.FAST_ENV, "no")
    assert nbhelp.fast_mode() is False
    monkeypatch.setenv(nbhelp.FAST_ENV, "maybe")
    with pytest.raises(CorrlabError, match=nbhelp.FAST_ENV):
        nbhelp.fast_mode()


def test_load_pipeline_falls_back_to_an_untrained_model_only_for_the_default(monkeypatch, capsys):
    monkeypatch.setenv("CORRLAB_MODEL", "no-such-model-here")
    pipe = nbhelp.load_pipeline("default", seed=3)
    assert "UNTRAINED" in capsys.readouterr().out
    again = nbhelp.untrained_pipeline(seed=3)
    for (name, a), (_, b) in zip(pipe.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name  # exact: same computation twice (same seed)
    assert type(pipe.model).__name__ == "MultiViewUNet"  # the default model's architecture
    zero = [n for n, p in pipe.model.named_parameters() if not p.any()]
    assert zero and all(n.endswith("epipolar_gain") for n in zero), zero  # zero-init layers randomised, gains not
    with pytest.raises(WeightsNotFoundError):
        nbhelp.load_pipeline("no-such-model-here")


# Notebook 5's real path (load, probe, explore, flow scoring, CorrAdapter) on complete tiny diffusers pipelines:
# nbmake runs it without parameters (the no-weights exit), so papermill runs it here with model_id set.
TINY_NB5 = {
    "wan": dict(height=64, width=64, num_frames=9),
    "flux": dict(height=32, width=32, num_images=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TINY_NB5))
def test_notebook_5_runs_its_real_path_on_a_tiny_pipeline(kind, tiny_pipeline_dir, tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.delenv(nbhelp.FAST_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / f"05_{kind}.ipynb"
    params = dict(model_id=str(tiny_pipeline_dir[kind]), num_inference_steps=3, record_steps=[0, 2], max_layers=2,
                  adapter_active_steps=2, **TINY_NB5[kind])
    pm.execute_notebook(str(NOTEBOOKS[4]), str(out), parameters=params, kernel_name="python3", progress_bar=False,
                        cwd=str(tmp_path))
    nb = nbformat.read(out, as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    assert "not available locally" not in text
    assert {"wan": "WanPipeline", "flux": "FluxPipeline"}[kind] in text
    assert "adapted calls: " in text and "adapted calls: 0," not in text
    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in executed)  # every cell a user with weights runs has run
    if kind == "wan":
        assert "psnr" in "\n".join(str(o.get("data", {}).get("text/plain", "")) for c in executed for o in c.outputs)
