"""Import names: the top-level ``kernels/`` folder is ``fmchat_kernels``, and PyPI's ``kernels`` beside fmchat breaks
neither.

``kernels`` is the top-level name of PyPI's ``kernels`` (Hugging Face hub kernels; transformers imports it when it is
installed). The repository's ``kernels/`` folder has no ``__init__.py``: as a regular package it would win over PyPI's
whenever Python runs with the repository root as the current directory (``python -c``, ``python -m pytest``, a REPL:
the current directory comes first on ``sys.path``), in an editable and in a wheel install alike. Without it the folder
is only a namespace portion, which loses to a regular package found later on ``sys.path``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run with ``python -c`` on purpose: sys.path[0] is then the current directory (for ``python script.py`` it would be
# the script's folder), which is how the repository root can shadow an installed package.
CHILD = textwrap.dedent(
    """
    import importlib.metadata
    import os
    import sys

    target = os.path.realpath(os.environ["PYPI_KERNELS"])
    ours = os.path.realpath(os.environ["FMCHAT_KERNELS_DIR"])

    import kernels

    where = getattr(kernels, "__file__", None) or list(kernels.__path__)  # no __file__: a namespace package
    assert kernels.__file__ and os.path.realpath(kernels.__file__).startswith(target + os.sep), where
    from kernels import get_kernel  # PyPI's API

    assert callable(get_kernel)
    assert "fmchat" not in (importlib.metadata.packages_distributions().get("kernels") or [])

    import torch
    from torch import nn

    from fmchat_kernels.attention import fmc_attention, reference_attention
    from fmchat_kernels.quant import Int8Linear, quantize_model

    for mod in (fmc_attention, quantize_model):  # from the install under test (the repo folder, or the wheel)
        assert os.path.realpath(sys.modules[mod.__module__].__file__).startswith(ours + os.sep), mod.__module__

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
        report = quantize_model(model, "int8", skip=(), compute_dtype=torch.float32)
        got = model(x)
    assert report.quantized == ["0", "2"] and isinstance(model[0], Int8Linear), report
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)

    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    seq_lens = torch.tensor([5], dtype=torch.int32)
    out = fmc_attention(q, k, v, seq_lens, impl="cpu")
    torch.testing.assert_close(out, reference_attention(q, k, v, seq_lens).to(out.dtype), atol=1e-4, rtol=1e-4)

    import transformers.integrations.hub_kernels  # transformers' side of PyPI's kernels
    from transformers.utils.import_utils import _is_package_available

    assert _is_package_available("kernels", return_version=True) == (True, importlib.metadata.version("kernels"))
    print("ok", kernels.__file__)
    """
)


IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".whl", ".gl"
)
CASES = [(install, where) for install in ("editable", "wheel") for where in ("repo-root", "elsewhere")]


def _pip(tmp_path_factory, *args: str) -> None:
    """No registry is a failure, not a skip: CI has one."""
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-input", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "20", "--cache-dir", str(tmp_path_factory.mktemp("pip_cache"))]  # fmt: skip
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def _wheel_install(tmp_path_factory) -> Path:
    """fmchat built as a wheel (from a copy of the repository: no build/ folder is left in it) and unpacked."""
    src = tmp_path_factory.mktemp("src") / "fmchat"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    out = tmp_path_factory.mktemp("wheel")
    _pip(tmp_path_factory, "wheel", "-w", str(out), str(src))
    (whl,) = out.glob("fmchat-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        assert "fmchat_kernels" in tops and "kernels" not in tops, sorted(tops)
        assert {"fmchat_kernels/quant/__init__.py", "fmchat_kernels/attention/__init__.py"} <= set(names)
        z.extractall(out / "site")  # a pure-Python wheel unpacked is an install, less the scripts
    return out / "site"


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[int, str]]:
    """CHILD in the four cases, started side by side (each one mostly imports torch and transformers): the editable
    install (as .ci/run installs it) and the wheel, each with the repository root and another folder as cwd."""
    pypi = tmp_path_factory.mktemp("pypi_kernels")
    _pip(tmp_path_factory, "install", "--target", str(pypi), "kernels")  # PyPI's, without its dependencies
    assert (pypi / "kernels" / "__init__.py").is_file()
    elsewhere, logs = tmp_path_factory.mktemp("elsewhere"), tmp_path_factory.mktemp("logs")
    procs: dict[tuple[str, str], tuple[subprocess.Popen, Path]] = {}

    def start(install: str, where: str, site: Path | None = None) -> None:
        env = {**os.environ, "PYPI_KERNELS": str(pypi)}
        cmd = [sys.executable]
        if site is None:  # the environment's own install of fmchat
            env.update(PYTHONPATH=str(pypi), FMCHAT_KERNELS_DIR=str(REPO / "kernels"))
        else:  # -S: no site-packages .pth files, so the editable install's import hook is off; its packages stay
            paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
            env.update(PYTHONPATH=os.pathsep.join([str(site), str(pypi), *paths]),
                       FMCHAT_KERNELS_DIR=str(site / "fmchat_kernels"))  # fmt: skip
            cmd.append("-S")
        log = logs / f"{install}-{where}.log"
        with open(log, "w") as f:
            p = subprocess.Popen([*cmd, "-c", CHILD], cwd=REPO if where == "repo-root" else elsewhere, env=env,
                                 stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        procs[install, where] = p, log

    try:
        for where in ("repo-root", "elsewhere"):
            start("editable", where)
        site = _wheel_install(tmp_path_factory)  # built while the editable cases run
        for where in ("repo-root", "elsewhere"):
            start("wheel", where, site)
        return {case: (p.wait(timeout=300), log.read_text()) for case, (p, log) in procs.items()}
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize(("install", "where"), CASES, ids=[f"{i}-{w}" for i, w in CASES])
def test_pypi_kernels_beside_fmchat_kernels(child_runs, install, where):
    rc, out = child_runs[install, where]
    assert rc == 0, f"{install} install, cwd {where}:\n{out[-4000:]}"
    assert "ok " in out


def test_kernels_folder_is_not_a_regular_package():
    """The measured cause of the shadowing above, stated directly (the subpackages stay regular packages)."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "quant" / "__init__.py").is_file()
    assert (REPO / "kernels" / "attention" / "__init__.py").is_file()


def test_no_import_uses_the_old_name():
    """``import kernels.quant`` would still resolve from the repository root (a namespace package there) and hide a
    stale import from tests run at the root; installed elsewhere it is PyPI's package, or nothing."""
    stale = []
    for folder in ("fmchat", "kernels", "tests", "tools", "docs"):
        for f in sorted((REPO / folder).rglob("*.py")) if (REPO / folder).is_dir() else []:
            for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
                mods = [a.name for a in n.names] if isinstance(n, ast.Import) else []
                if isinstance(n, ast.ImportFrom) and n.level == 0:
                    mods = [n.module or ""]
                stale += [
                    f"{f.relative_to(REPO)}:{n.lineno}" for m in mods if m == "kernels" or m.startswith("kernels.")
                ]
    assert not stale, stale
