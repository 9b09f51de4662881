"""Find the ```bash / ```python blocks of the docs and run them in order (used by tests/test_docs.py).

Run as a script (``python tests/doc_blocks.py BLOCKS.json``) it executes the blocks listed in the
JSON file in the current directory, in order, as a reader would: python blocks share one
namespace, bash blocks run with ``set -Eeo pipefail``. The first failure prints
``doc-test: FILE:LINE: ...`` with the failing command (bash) or the traceback (python), whose line
numbers are those of the Markdown file, and exits 1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

#: languages whose blocks are run; ```text and untagged blocks are output samples
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "console": None, "python": "python", "py": "python"}
#: the line that skips the block right after it, with the reason shown in the test report
SKIP_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*skip\b\s*(?P<reason>.*?)\s*-->\s*$")
ANY_MARKER = re.compile(r"^\s*<!--\s*doc-test\b")  # a marker line (prose may quote the marker)
#: the README's set-up commands: CI runs them already (.ci/run), so the doc test does not
SETUP_MARKERS = {
    "<!-- main-command -->": "the README's main set-up command (creates .venv, installs ebood, runs `ebood bench`); "
                             "CI installs ebood the same way (.ci/run)",
    "<!-- test-command -->": "the README's test command: CI runs it (.ci/run), and this test is part of it",
}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    file: str        # path relative to the repository
    line: int        # line of the block's first code line (1-based)
    language: str    # "bash" or "python"
    code: str
    skip: str | None = None  # reason, when the block is skipped

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class MarkerError(ValueError):
    """A ``doc-test`` marker that is malformed or not directly before a runnable block."""


def find_blocks(path: Path, root: Path) -> list[Block]:
    """The runnable blocks of the Markdown file ``path`` (skipped ones included, with their reason)."""
    name = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if ANY_MARKER.search(line):
            _check_marker(lines, i, name)
        m = FENCE.match(line)
        if not m:
            i += 1
            continue
        fence, lang = m.group("fence"), m.group("lang").lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if RUN_LANGUAGES.get(lang):
            indent = len(m.group("indent"))
            code = "\n".join(l[indent:] if l[:indent].isspace() else l for l in lines[i + 1:end])
            blocks.append(Block(name, i + 2, RUN_LANGUAGES[lang], code, _skip_reason(lines, i)))
        i = end + 1
    return blocks


def _skip_reason(lines: list[str], fence_index: int) -> str | None:
    before = lines[fence_index - 1].strip() if fence_index > 0 else ""
    m = SKIP_MARKER.match(before)
    if m:
        return m.group("reason")
    return SETUP_MARKERS.get(before)


def _check_marker(lines: list[str], i: int, name: str) -> None:
    m = SKIP_MARKER.match(lines[i])
    where = f"{name}:{i + 1}"
    if not m:
        raise MarkerError(f"{where}: malformed marker {lines[i].strip()!r}; write `<!-- doc-test: skip REASON -->` "
                          "on the line directly before a ```bash or ```python block")
    if not m.group("reason"):
        raise MarkerError(f"{where}: `<!-- doc-test: skip -->` needs a reason: `<!-- doc-test: skip REASON -->`")
    nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
    if nxt is None or not RUN_LANGUAGES.get(nxt.group("lang").lower()):
        raise MarkerError(f"{where}: the skip marker must be directly followed by a ```bash or ```python block")


# ----- running (in the subprocess) ---------------------------------------------------------------
def _bash_script(block: Block) -> str:
    # the trap names the failing command; the padding makes $LINENO the Markdown file's line
    trap = (f"set -Eeo pipefail; trap 'rc=$?; echo \"doc-test: {block.file}:$LINENO: command failed (exit $rc): "
            f"$BASH_COMMAND\" >&2; exit $rc' ERR")
    return trap + "\n" * (block.line - 1) + block.code + "\n"


def run_blocks(blocks: list[Block], timeout: float) -> int:
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        print(f"doc-test: running {block.where} ({block.language})", flush=True)
        if block.language == "bash":
            try:
                done = subprocess.run(["bash", "-c", _bash_script(block)], timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"doc-test: {block.where}: the bash block ran past {timeout:.0f} s; shorten it or mark it "
                      "`<!-- doc-test: skip REASON -->`", file=sys.stderr, flush=True)
                return 1
            if done.returncode != 0:
                print(f"doc-test: {block.where}: bash block failed (exit {done.returncode})", file=sys.stderr, flush=True)
                return 1
        else:
            code = compile("\n" * (block.line - 1) + block.code + "\n", str(Path(ROOT, block.file)), "exec")
            try:
                exec(code, namespace)
            except BaseException:  # noqa: BLE001 - report any failure of the block, with its traceback
                print(f"doc-test: {block.where}: python block failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                return 1
    return 0


def to_json(blocks: list[Block], timeout: float) -> str:
    return json.dumps({"blocks": [asdict(b) for b in blocks], "timeout": timeout})


ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.exit(run_blocks([Block(**b) for b in spec["blocks"]], spec["timeout"]))
