"""The API reference (docs/api.md, generated from the docstrings by mkdocstrings) builds with
warnings as errors, and lists every public module, new ones included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _public_modules() -> list[str]:
    src = ROOT / "src"
    names = []
    for path in sorted((src / "ebood").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        names.append(".".join(parts))
    return names


@pytest.mark.slow
def test_api_reference_builds_strict_and_lists_every_public_module(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-5000:]}"
    page = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    missing = [m for m in _public_modules() if f'id="{m}"' not in page]
    assert not missing, f"the API reference lacks {missing}"
    for name in ("ebood.data.open_dataset", "ebood.train.classifier.train_classifier", "ebood.extraction.extract",
                 "ebood.detectors.base.Detector.score"):
        assert f'id="{name}"' in page, name
