"""The colab/ notebooks, executed top to bottom on CPU with nbclient (each picks small settings when
it finds no accelerator). A cell that raises fails the test, with the cell's traceback."""

from __future__ import annotations

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["quickstart", "serving", "sharding", "kernels"]


@pytest.fixture(scope="module")
def compilation_cache():
    """The session's persistent compilation cache (tests/conftest.py turns it on): what one notebook
    compiles (the same model and settings on CPU) the next reads back, and so does a later run."""
    import jax

    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    return jax.config.jax_compilation_cache_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, compilation_cache):
    nb = nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)
    # The kernel is ipykernel's own spec, i.e. this interpreter (the project's venv). It starts in the
    # repository root, as a notebook opened from a checkout would. What the notebooks write lands
    # there (bench-results/, attention.json), ignored by git.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "MPLBACKEND": "Agg",
           "JAXINFER_COMPILATION_CACHE": compilation_cache}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute(env=env)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "running on CPU" in text
