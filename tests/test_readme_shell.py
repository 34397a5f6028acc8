"""Every shell line of the README runs as pasted, in an activated ``.venv`` (what the README says to
do after its two set-up commands), from a folder of its own with the repository's ``specs/``.

A line that would take minutes gets flags appended that keep it quick but meaningful (argparse
takes the last occurrence, so they override the line's own); a line that cannot run here says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: flags appended to a line, by the command it starts with (the first match wins)
QUICK = [
    (r"^tokenprune eval --scenes", "--scenes 2"),  # its own budgets (a count and a ratio) stay
    (r"^tokenprune eval ", "--scenes 2 --budgets 8"),
    (r"^torchrun .* eval ", "--scenes 2 --budgets 8"),
    (r"^tokenprune ablate ", "--scenes 2 --budgets 8"),
    (r"^tokenprune calibrate ", "--scenes 2 --budgets 8 --ratios 0,1 --strategies B,D"),
    # the SmolLM2 LLaVA it loads by default is loaded and run by tests/test_real_smollm.py already
    (r"^tokenprune bench prefill", "--model tiny --batch 1 --budgets 64 --repeats 1 --new-tokens 2 --quiet"),
]
#: lines that do not run here, and why
NOT_HERE = [
    (r"^make (demo|test)\b", "the set-up itself: CI and the fresh-clone check run it"),
    (r"^\. \.venv/bin/activate", "every other line runs in the activated environment"),
    (r"^lmms-eval .*pretrained=[\w-]+/", "downloads a checkpoint from the Hub"),
    (r"^tokenprune lmms-eval table results/lmms", "reads what the Hub run above it writes"),
    (r"^tokenprune bench stages\s*$", "the full benchmark takes tens of minutes; its --quick line runs"),
]


def shell_lines(markdown: str) -> list[str]:
    """The commands of the page's ```sh blocks, comments dropped, continued lines joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").split("\n"):
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                out.append(command)
    return out


LINES = shell_lines((ROOT / "README.md").read_text())


def _reason_not_to_run(line: str) -> str | None:
    return next((why for pattern, why in NOT_HERE if re.search(pattern, line)), None)


def _quick(line: str) -> str:
    return next((f"{line} {extra}" for pattern, extra in QUICK if re.search(pattern, line)), line)


def test_the_readme_has_shell_lines_and_every_one_is_run_or_says_why_not():
    assert len(LINES) >= 10
    assert sum(_reason_not_to_run(line) is None for line in LINES) >= 8


@pytest.mark.parametrize("line", [line for line in LINES if _reason_not_to_run(line) is None])
def test_a_readme_shell_line_runs_as_pasted(line, tmp_path):
    (tmp_path / "specs").symlink_to(ROOT / "specs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run(["bash", "-c", _quick(line)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{_quick(line)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
