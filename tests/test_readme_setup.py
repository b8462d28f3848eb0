"""README's two set-up commands are what CI runs: the install line (CI drops its last step, which opens the app) and
the test command (CI adds only a report of the slowest tests). CI itself runs them in a fresh clone, so the lines
cannot drift from a working install without CI failing or this test failing."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPEN_APP = " && .venv/bin/fmchat"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install and run") : text.index("\n## ", text.index("## Install and run") + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [b.strip() for b in blocks]


def _ci_commands() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if ln.startswith(("python3 -m venv", ".venv/bin/python -m pytest"))]


def test_readme_has_two_one_line_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    install, tests = cmds
    assert install.endswith(OPEN_APP), "the first command opens the app on the default model"
    assert "activate" not in install, "no manual activate"
    words = shlex.split(install.replace("&&", " ; "))
    # PyTorch is installed (pinned) before fmchat, so pip never resolves a bare torch requirement by itself
    torch_at = next(i for i, w in enumerate(words) if w.startswith("torch=="))
    fmchat_at = words.index("-e")
    assert torch_at < fmchat_at
    assert tests == ".venv/bin/python -m pytest -q"


def test_ci_runs_readme_commands():
    install, tests = _readme_commands()
    ci_install, ci_tests = _ci_commands()
    assert ci_install == install[: -len(OPEN_APP)]
    assert ci_tests.startswith(tests)
    assert ci_tests[len(tests) :].strip() in ("", "--durations=15")


def test_pinned_torch_is_within_the_declared_bounds():
    install, _ = _readme_commands()
    pinned = re.search(r"torch==([\d.]+)", install).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    bounds = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject)
    assert bounds, "pyproject.toml declares torch with a lower and an upper bound"

    def key(v):
        return tuple(int(x) for x in v.split("."))

    assert key(bounds.group(1)) <= key(pinned) < key(bounds.group(2))
