"""The docs hold when followed: every ```bash and ```python block of README.md and docs/*.md runs.

How the blocks run (so that a doc can be written to pass):

* The blocks of one Markdown file run in order, as a reader follows them: python blocks share one
  namespace, bash blocks run with ``set -Eeo pipefail`` (the first failing command fails the test,
  named with its file and line). ```text and untagged blocks are output samples: not run.
* The working directory is a fresh temporary directory that looks like the clone's root: it
  links the repository's top-level entries (``benchmarks/``, ``constraints-cpu.txt``, ...), ``.venv``
  is the interpreter running the tests, and files the blocks write stay in it. ``ebood`` and
  ``python`` on ``PATH`` are this interpreter's; ``EBOOD_CACHE`` is a cache shared by the session.
* Stand-in data for blocks that stand for a user's files (seed 0; logits = features @ W.T + b):
  ``logits.npy`` (200, 10) float32; ``train.npz``, ``val.npz``, ``test.npz`` (logits (N, 10),
  features (N, 16), labels (N,), head_weight (10, 16), head_bias (10,); N = 300, 100, 100) and
  ``ood.npz`` (the same without labels, N = 100, shifted features); ``images.npz`` (inputs
  (64, 1, 8, 8) in [0, 1] like the built-in digits, labels (64,)).
* A block that needs real CIFAR files, a GPU, a cluster, a server that keeps running or a long run
  is skipped when the line directly before its opening fence is
  ``<!-- doc-test: skip REASON -->``; the reason is shown in the test report. The README's two
  set-up commands (under ``<!-- main-command -->`` / ``<!-- test-command -->``) are skipped: CI
  runs them (.ci/run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from doc_blocks import Block, MarkerError, find_blocks, to_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a whole file's blocks must finish within this (README.md takes about 3 minutes on an idle 2-core
#: machine, several times that on a loaded one)
FILE_TIMEOUT_S = 2400


def _all_blocks() -> dict[str, list[Block]]:
    return {p.relative_to(ROOT).as_posix(): find_blocks(p, ROOT) for p in DOC_FILES}


def _collect() -> tuple[list, list]:
    try:
        blocks = _all_blocks()
    except MarkerError:
        return [], []  # test_markers_are_well_formed reports it
    runs = [pytest.param(name, id=name) for name, bs in blocks.items() if any(b.skip is None for b in bs)]
    skips = [pytest.param(b, id=b.where) for bs in blocks.values() for b in bs if b.skip is not None]
    return runs, skips


RUNS, SKIPS = _collect()


def test_markers_are_well_formed():
    for path in DOC_FILES:
        find_blocks(path, ROOT)  # raises MarkerError naming the file and line


def _stand_in_data(directory: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 16)).astype(np.float32)
    b = rng.normal(scale=0.1, size=10).astype(np.float32)
    means = rng.normal(scale=2.0, size=(10, 16)).astype(np.float32)

    def outputs(n: int, shift: float = 0.0, labelled: bool = True) -> dict[str, np.ndarray]:
        labels = rng.integers(0, 10, size=n)
        features = (means[labels] + rng.normal(size=(n, 16)) + shift).astype(np.float32)
        arrays = {"logits": features @ w.T + b, "features": features, "head_weight": w, "head_bias": b}
        if labelled:
            arrays["labels"] = labels.astype(np.int64)
        return arrays

    np.save(directory / "logits.npy", rng.normal(scale=3.0, size=(200, 10)).astype(np.float32))
    for name, n in (("train", 300), ("val", 100), ("test", 100)):
        np.savez(directory / f"{name}.npz", **outputs(n))
    np.savez(directory / "ood.npz", **outputs(100, shift=3.0, labelled=False))
    np.savez(directory / "images.npz", inputs=rng.uniform(0, 1, size=(64, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 10, size=64))


def _workdir(tmp: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv") and not (tmp / entry.name).exists():
            (tmp / entry.name).symlink_to(entry)
    (tmp / ".venv").symlink_to(Path(sys.prefix))
    _stand_in_data(tmp)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNS)
def test_doc_blocks_run(doc, tmp_path, tmp_path_factory):
    blocks = [b for b in find_blocks(ROOT / doc, ROOT) if b.skip is None]
    work = tmp_path / "work"
    work.mkdir()
    _workdir(work)
    spec = tmp_path / "blocks.json"
    spec.write_text(to_json(blocks, FILE_TIMEOUT_S))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["EBOOD_CACHE"] = str(tmp_path_factory.getbasetemp() / "doc-cache")
    env["MPLBACKEND"] = "Agg"
    env.pop("EBOOD_DATA", None)
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "doc_blocks.py"), str(spec)], cwd=work,
                              env=env, capture_output=True, text=True, timeout=FILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{doc}: the blocks ran past {FILE_TIMEOUT_S} s (the last `doc-test: running` line names the "
                    f"block); last output:\n{out[-3000:]}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{doc}: a block failed (the first `doc-test:` line names it)\n"
                    f"--- stderr (end) ---\n{done.stderr[-6000:]}\n--- stdout (end) ---\n{done.stdout[-2000:]}", pytrace=False)


@pytest.mark.parametrize("block", SKIPS)
def test_doc_block_skipped(block):
    pytest.skip(f"{block.where}: {block.skip}")


# ----- the runner itself: failures name the file, the line and the command ------------------------
def _run_fake(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "fake.md").write_text(text)
    spec = tmp_path / "blocks.json"
    spec.write_text(to_json([b for b in find_blocks(tmp_path / "fake.md", tmp_path) if b.skip is None], 60))
    return subprocess.run([sys.executable, str(Path(__file__).parent / "doc_blocks.py"), str(spec)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_a_failing_bash_command_is_named_with_its_line(tmp_path):
    done = _run_fake(tmp_path, "# t\n\n```bash\necho one > a.txt\ncat a.txt\nls no-such-file\necho never\n```\n")
    assert done.returncode == 1
    assert "doc-test: fake.md:6: command failed (exit 2): ls no-such-file" in done.stderr
    assert "never" not in done.stdout
    assert (tmp_path / "a.txt").read_text() == "one\n"


def test_python_blocks_share_a_namespace_and_failures_show_the_doc_line(tmp_path):
    text = "```python\nx = 41\n```\n\ntext\n\n```python\nassert x == 41\ny = x + 1\nraise SystemExit(y) if y != 42 else 1 / 0\n```\n"
    done = _run_fake(tmp_path, text)
    assert done.returncode == 1
    assert "doc-test: fake.md:8: python block failed" in done.stderr
    assert 'fake.md", line 10' in done.stderr and "ZeroDivisionError" in done.stderr


def test_blocks_run_in_order_and_text_blocks_are_not_run(tmp_path):
    text = "```text\nexit 3\n```\n```bash\necho hi > f\n```\n```python\nassert open('f').read() == 'hi\\n'\n```\n"
    done = _run_fake(tmp_path, text)
    assert done.returncode == 0, done.stderr


def test_skip_marker_reason_and_misplaced_markers(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("<!-- doc-test: skip needs a GPU -->\n```bash\nnvidia-smi\n```\n```python\nx = 1\n```\n")
    first, second = find_blocks(doc, tmp_path)
    assert (first.skip, first.line, second.skip, second.line) == ("needs a GPU", 3, None, 6)
    for text, message in [
        ("<!-- doc-test: skip -->\n```bash\nls\n```\n", "needs a reason"),
        ("<!-- doc-test: skip GPU -->\n\n```bash\nls\n```\n", "directly followed"),
        ("<!-- doc-test: skip GPU -->\n```text\nls\n```\n", "directly followed"),
        ("<!-- doc-test: ignore GPU -->\n```bash\nls\n```\n", "malformed marker"),
    ]:
        doc.write_text(text)
        with pytest.raises(MarkerError, match=message) as info:
            find_blocks(doc, tmp_path)
        assert str(info.value).startswith("d.md:1:")
