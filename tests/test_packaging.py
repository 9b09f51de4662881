"""The packaged install works: a wheel built from the clone (``python -m build``) installs into a
fresh virtual environment and brings the native kernel, the presets and the ``ebood`` command.

Offline and quick: the wheel is built without build isolation (setuptools, wheel and build come with
the ``test`` extra) and installed with ``--no-deps``; the fresh environment sees this environment's
packages (torch, numpy, ...) through a path file, but not its editable ebood.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_native() -> bool:
    try:
        import ebood._native._scores  # noqa: F401
    except ImportError:
        return False
    return True


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_with_native_kernel(tmp_path):
    clone = tmp_path / "clone"  # a copy, so that the build leaves nothing in the work tree
    clone.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", clone)
    (wheel,) = (tmp_path / "dist").glob("ebood-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # this environment's packages, read as a plain path: its .pth files (the editable ebood) are not run
    (site / "ci-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel)

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    check = (
        "import ebood, torch, pathlib\n"
        "from ebood.bench.presets import available_presets\n"
        "print(pathlib.Path(ebood.__file__).resolve())\n"
        "assert available_presets(), 'no presets in the wheel'\n"
        "logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))\n"
        "got = ebood.scores.energy(logits).double()\n"
        "assert torch.allclose(got, -torch.logsumexp(logits.double(), 1), atol=1e-5)\n"
    )
    if _has_native():
        check += "import ebood._native._scores as k; print(k.__file__)\n"
    out = _run(python, "-c", check, cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(out[0]).is_relative_to(site.resolve()), f"ebood imported from {out[0]}, not from the wheel"
    if _has_native():
        assert Path(out[1]).resolve().is_relative_to(site.resolve()) and out[1].endswith(".so")
    version = _run(venv / "bin" / "ebood", "--version", cwd=tmp_path, env=env).stdout.strip()
    import ebood

    assert version == f"ebood {ebood.__version__}"
