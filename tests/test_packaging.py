"""The distribution installs one import package, ``jetflow``, and works from a wheel.

The wheel is built from the repository (``pip wheel --no-deps``), installed into a fresh
virtual environment, and used there with the repository off ``sys.path``: the console
script and ``from jetflow import connect`` must work from what the wheel holds alone.
The fresh environment gets jetflow's dependencies (nats-py, pyarrow...) from this
project's venv through a path line, not by downloading them again; that path holds no
``jetflow`` of its own (the editable install is a finder that the line does not start),
and the test checks that ``jetflow`` was imported from the fresh environment.
"""

from __future__ import annotations

import ast
import os
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ["connect", "Client", "JobContext", "PermanentError", "SubmissionRejected",
          "SubmitTimeout"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("jetflow-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        text=True).strip())
    # the dependencies, from this venv (see the module docstring)
    (purelib / "_jetflow_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir


def _run_outside(env_dir: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run in a directory that is not the repository, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120,
                          cwd=env_dir.parent, env=env)


def test_the_wheel_holds_jetflow_and_its_dist_info_alone(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"jetflow", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}"
                               ".dist-info"}, tops
    for needed in ("jetflow/__init__.py", "jetflow/py.typed", "jetflow/core/job.py",
                   "jetflow/adapters/bus.py", "jetflow/sentinel/service.py",
                   "jetflow/workers/child.py", "jetflow/projections/projector.py",
                   "jetflow/cli/main.py", "jetflow/up.py"):
        assert needed in names, f"{needed} is not in the wheel"
    conf = zipfile.ZipFile(wheel).read("jetflow/nats.conf")  # what `jetflow up` starts with
    assert conf == (ROOT / "nats.conf").read_bytes()
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["jetflow"]


def test_the_installed_wheel_runs_without_the_repository(fresh_venv: Path) -> None:
    python = str(fresh_venv / "bin" / "python")
    done = _run_outside(fresh_venv, "jetflow", "--help")
    assert done.returncode == 0, done.stderr
    assert "submit" in done.stdout and "replay" in done.stdout
    probe = ("import sys, jetflow; from jetflow import connect; "
             f"from jetflow import {', '.join(PUBLIC)}; "
             "import jetflow.core.job, jetflow.workers.child, jetflow.projections.projector; "
             "print(jetflow.__file__); "
             "print(any(p.rstrip('/') == " + repr(str(ROOT)) + " for p in sys.path))")
    done = _run_outside(fresh_venv, python, "-I", "-c", probe)
    assert done.returncode == 0, done.stderr
    where, repo_on_path = done.stdout.split()
    assert Path(where).is_relative_to(fresh_venv), f"jetflow came from {where}"
    assert repo_on_path == "False"
    for old in ("core", "sentinel", "workers", "projections", "examples"):
        done = _run_outside(fresh_venv, python, "-I", "-c", f"import {old}")
        assert done.returncode != 0, f"the wheel installed a top-level {old!r}"


def test_the_editable_install_maps_only_jetflow() -> None:
    """``pip install -e .`` (what ``make`` does) exposes one top-level name too."""
    finders = [Path(p) for d in site.getsitepackages()
               for p in Path(d).glob("__editable___jetflow*_finder.py")]
    assert finders, "jetflow is not installed in editable mode in this venv"
    for finder in finders:
        tree = ast.parse(finder.read_text())
        mapping = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                       if isinstance(node, ast.AnnAssign | ast.Assign)
                       and "MAPPING" in ast.unparse(node.targets[0] if isinstance(
                           node, ast.Assign) else node.target))
        assert {name.split(".")[0] for name in mapping} == {"jetflow"}, mapping
        assert mapping["jetflow.core"] == str(ROOT / "core")


def test_the_public_api_is_typed_and_listed() -> None:
    import jetflow

    assert set(PUBLIC) <= set(jetflow.__all__)
    for name in jetflow.__all__:
        assert getattr(jetflow, name) is not None
    assert (ROOT / "jetflow" / "py.typed").exists()
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        jetflow.nothing  # noqa: B018


def test_importing_the_domain_does_not_load_the_client() -> None:
    """The facade's names load on first use: a child process that needs only the domain
    does not pay for nats-py."""
    done = subprocess.run([sys.executable, "-c", "import sys, jetflow.core.job; "
                           "print('nats' in sys.modules)"],
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert done.stdout.strip() == "False", done.stderr
