"""Every notebook in colabs/ runs top to bottom (nbclient, CPU, tiny weights) and every cell
tagged "figure" displays an image.

The notebooks read DINOV2_JAX_COLAB_TINY=1 and DINOV2_JAX_COLAB_WEIGHTS to swap in the tiny
weights and small inputs; their install cell is a no-op because dinov2_jax is importable, so
it is also run on its own as if dinov2_jax were missing (a real git clone, pip recorded).
"""
import glob
import os

import numpy as np
import pytest

from dinov2_jax import weights
from dinov2_jax.models import vit
from tiny_params import random_params

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))
EXPECTED = {"features_pca", "knn_retrieval", "train_demo", "export_to_pytorch"}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=14,
                                      img_size=56, layerscale=1.0)
    params = random_params(model)
    directory = tmp_path_factory.mktemp("colab") / "weights"
    weights.save(str(directory), model, params)
    return str(directory)


def test_every_expected_notebook_exists():
    assert {os.path.basename(p).removesuffix(".ipynb") for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.endswith("train_demo.ipynb") else p
    for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs_and_draws(path, tiny_weights, tmp_path, monkeypatch):
    if path.endswith("export_to_pytorch.ipynb"):  # it loads the exports into torch libraries
        for module in ("torch", "timm", "transformers"):
            pytest.importorskip(module)
    monkeypatch.setenv("DINOV2_JAX_COLAB_TINY", "1")
    monkeypatch.setenv("DINOV2_JAX_COLAB_WEIGHTS", tiny_weights)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[1].cell_type == "code" and "pip" in notebook.cells[1].source
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # Raises CellExecutionError, naming the cell, if any cell fails.
    figures = [cell for cell in notebook.cells if "figure" in cell.metadata.get("tags", [])]
    assert figures, "a notebook without a figure cell"
    for cell in figures:
        images = [o for o in cell.outputs
                  if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert images, f"figure cell drew nothing:\n{cell.source}"


def _install_cell(path, **form):
    """The notebook's install cell with its Colab form fields set, as Colab rewrites them."""
    source = nbformat.read(path, as_version=4).cells[1].source
    for name, value in form.items():
        line = next(l for l in source.splitlines() if l.startswith(f"{name} = "))
        source = source.replace(line, f"{name} = {value!r}  #@param {{type:\"string\"}}")
    return source


def _run_install_cell(source, monkeypatch):
    """Runs the cell as if dinov2_jax were not installed: git runs for real, pip is recorded."""
    import importlib.util
    import subprocess
    import sys
    real_find_spec, real_run, pip_calls = importlib.util.find_spec, subprocess.run, []
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dinov2_jax" else real_find_spec(name, *a))

    def run(command, **kwargs):
        if command[:3] == [sys.executable, "-m", "pip"]:
            pip_calls.append(command)
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {}
    exec(compile(source, "install cell", "exec"), namespace)
    return namespace, pip_calls, sys.path


def test_install_cells_clone_a_url_or_use_a_checkout(tmp_path, monkeypatch):
    import subprocess
    import sys
    cells = {_install_cell(path) for path in NOTEBOOKS}
    assert len(cells) == 1, "the notebooks' install cells differ"
    path = NOTEBOOKS[0]
    with pytest.raises(SystemExit, match="Set REPOSITORY"):
        _run_install_cell(_install_cell(path, CHECKOUT=str(tmp_path / "none")), monkeypatch)
    # A git URL: a real clone (of a local repository, as file://) into CHECKOUT, then pip.
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "setup.py").write_text("# stand-in\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    for command in (["init", "-q"], ["add", "setup.py"], ["commit", "-qm", "stand-in"]):
        subprocess.run(git + command, check=True)
    checkout = tmp_path / "clone"
    _, pip_calls, path_after = _run_install_cell(
        _install_cell(path, REPOSITORY=f"file://{origin}", CHECKOUT=str(checkout)), monkeypatch)
    assert (checkout / "setup.py").read_text() == "# stand-in\n"
    assert pip_calls[0][:7] == [sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout)]
    assert path_after[0] == str(checkout)
    # A checkout's path (Drive): installed where it is, nothing cloned.
    _, pip_calls, _ = _run_install_cell(
        _install_cell(path, REPOSITORY=str(origin), CHECKOUT=str(tmp_path / "unused")),
        monkeypatch)
    assert pip_calls[0][6] == str(origin) and not (tmp_path / "unused").exists()


def test_pca_rgb_blacks_out_the_background():
    """Central patches of two images share one feature direction, the border another: the
    first PCA component splits them, oriented so the border is background (black)."""
    from dinov2_jax import plots
    grid, dim = (6, 7), 16
    centre = np.zeros(grid, bool)
    centre[1:-1, 2:-1] = True
    directions = np.random.randn(2, dim)
    features = np.where(centre[None, :, :, None], directions[0], directions[1])
    features = features + 0.05 * np.random.randn(2, *grid, dim)
    rgb = plots.pca_rgb(features.reshape(2, -1, dim), grid)
    assert rgb.shape == (2, *grid, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb[:, ~centre] == 0).all()
    assert (rgb[:, centre].max(axis=-1) > 0).mean() > 0.9
    everything = plots.pca_rgb(features.reshape(2, -1, dim), grid, foreground_threshold=None)
    assert (everything.max(axis=-1) > 0).mean() > 0.9


def test_plot_metrics_reads_metrics_jsonl(tmp_path):
    import json
    from dinov2_jax import plots
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "knn/top1": 10.0, "knn/top1_k10": 9.0},
             {"step": 1, "total_loss": 3.0, "dino_local_crops_loss": 2.0, "mfu": None,
              "data/bad_examples": []},
             {"step": 2, "total_loss": 2.5, "dino_local_crops_loss": 1.5},
             {"step": 2, "knn/top1": 30.0}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    figure = plots.plot_metrics(str(path))
    curves = {line.get_label(): line.get_xydata().tolist() for ax in figure.axes
              for line in ax.lines}
    assert curves == {"total_loss": [[1, 3.0], [2, 2.5]],
                      "dino_local_crops_loss": [[1, 2.0], [2, 1.5]],
                      "knn/top1": [[0, 10.0], [2, 30.0]]}
