"""The one report path every `fmchat bench` command prints through.

A run starts with :func:`begin` (date and load average at the start, the machine, the checkout) and ends with
:func:`emit`, which stamps the end (and the decode path and the weight kernels chosen at load, known only then), then prints either the header followed by the command's own rich table(s),
or with ``--json`` one JSON object: ``{"header": {...}, ...the command's own keys, unchanged}``.

Figures nobody can know (no /proc/cpuinfo, no load average, not a git checkout) are ``None`` in JSON and
print as ``n/a``, never as 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from rich.console import Console

NA = "n/a"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fmchat/


# ---------------------------------------------------------------- the facts
def cpu_model() -> str | None:
    """The CPU's marketing name: /proc/cpuinfo's ``model name`` on Linux, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def cpu_counts() -> tuple[int | None, int | None]:
    """(logical, physical) cores; physical is None where psutil cannot tell."""
    logical = os.cpu_count()
    try:
        import psutil
    except ImportError:
        return logical, None
    return psutil.cpu_count(logical=True) or logical, psutil.cpu_count(logical=False)


def total_ram_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return int(psutil.virtual_memory().total)


def load_avg_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cpu_isa() -> str:
    """Exactly what PyTorch's CPU dispatch picked: ``torch.backends.cpu.get_cpu_capability()`` (AVX2, AVX512, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


# Variables that cap the instruction set of torch's CPU kernels (ATen's dispatch and inductor's generated code), of
# oneDNN's and of MKL's below what the CPU has: an AVX-512 machine then runs the AVX2 code paths.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_isa_cap() -> str | None:
    """When the CPU's instruction set is capped (``ISA_CAPS``): which variables, and what the CPU has; else None. (A
    llama.cpp built for this CPU is not capped: its kernels are chosen when it is compiled.)"""
    import torch

    set_ = [f"{v}={os.environ[v]}" for v in ISA_CAPS if os.environ.get(v)]
    if not set_:
        return None
    probe = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # (private: guarded)
    has = "AVX512" if probe("_is_avx512_supported") else "AVX2" if probe("_is_avx2_supported") else NA
    return f"capped by {', '.join(set_)}; the CPU has {has}"


def kernel_choices() -> dict | None:
    """The weight kernels this process chose (``fmchat_kernels.quant.select``): its ``current_choices()`` plus where
    they came from (``source``: measured, cached, default) and one line for the header (``line``)."""
    try:
        from fmchat_kernels.quant import select
    except Exception:  # noqa: BLE001 - a header never fails over a missing kernel package
        return None
    return {**select.current_choices(), "source": select.details()["source"], "line": select.describe()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def version(dist: str) -> str | None:
    """An installed distribution's version, read without importing it (transformers takes seconds to import)."""
    if dist == "torch":
        import torch

        return str(torch.__version__)  # e.g. 2.13.0+cpu, as torch itself reports it
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never take index.lock under someone else's git
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def fmchat_commit(package_dir: Path = PACKAGE_DIR) -> str:
    """``git rev-parse --short HEAD`` of the checkout the package lives in, ``+dirty`` when the tree has changes;
    "n/a" when the package is not a tracked file of a git checkout (e.g. installed into site-packages)."""
    tracked = _git("ls-files", "--error-unmatch", "__init__.py", cwd=package_dir)
    if tracked is None or tracked.returncode != 0:
        return NA
    head = _git("rev-parse", "--short", "HEAD", cwd=package_dir)
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return NA
    status = _git("status", "--porcelain", cwd=package_dir)
    dirty = status is None or status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``fmchat bench ...`` (the entry script's name, not its path)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return NA
    prog = Path(argv[0])
    if prog.name == "__main__.py":  # python -m fmchat (or -m pytest, when a test calls a bench)
        head = ["python", "-m", prog.parent.name]
    else:
        head = [prog.name or argv[0]]
    return shlex.join(head + argv[1:])


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- the header
@dataclass
class Run:
    """One bench run in progress: the header's start half; :func:`emit` adds the end."""

    command: str  # e.g. "bench load"
    header: dict = field(default_factory=dict)


def begin(command: str, argv: list[str] | None = None) -> Run:
    """Call first thing in a bench: records the start (UTC time, 1-minute load average) and the machine."""
    logical, physical = cpu_counts()
    header = {
        "cpu": cpu_model(),
        "logical_cores": logical,
        "physical_cores": physical,
        "ram_bytes": total_ram_bytes(),
        "cpu_isa": cpu_isa(),
        "cpu_isa_cap": cpu_isa_cap(),  # None unless capped below the CPU's own (ISA_CAPS)
        "threads": None,  # filled at the end: a bench may set its thread count after it starts
        "decode_path": None,  # filled at the end: known once the backends are loaded
        "kernels": None,  # filled at the end: the weight kernels chosen at load (kernel_choices)
        "fmchat_commit": fmchat_commit(),
        "started_utc": utc_now(),
        "ended_utc": None,
        "load_avg_1m_start": load_avg_1m(),
        "load_avg_1m_end": None,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "command": command_line(argv),
    }
    return Run(command, header)


def finish(run: Run, threads: int | None = None, decode_path: str | None = None, kernels: dict | None = None) -> dict:
    """The complete header: the end time and load average, the threads (torch's now, unless ``threads``), the decode
    path(s) of the run and the weight kernels chosen (this process's, unless ``kernels``: a bench whose backends
    loaded in other processes passes theirs, ``{row: kernel_choices()}``)."""
    h = run.header
    h["threads"] = threads if threads is not None else torch_threads()
    if decode_path is not None:
        h["decode_path"] = decode_path
    h["kernels"] = kernels if kernels is not None else kernel_choices()
    h["ended_utc"] = utc_now()
    h["load_avg_1m_end"] = load_avg_1m()
    return h


def num(x, spec: str = "") -> str:
    """A figure for a table cell: ``format(x, spec)``, or "n/a" when nobody knows it (None), never 0."""
    return NA if x is None else format(x, spec)


def _na(v) -> str:
    return num(v)


def _gib(n: int | None) -> str:
    return NA if n is None else f"{n / 2**30:.1f} GiB"


def header_lines(run: Run) -> list[str]:
    h = run.header
    return [
        f"fmchat {run.command} · {_na(h['started_utc'])} → {_na(h['ended_utc'])} (UTC)",
        (f"machine  {_na(h['cpu'])} · {_na(h['logical_cores'])} logical / {_na(h['physical_cores'])} physical cores · "
         f"{_gib(h['ram_bytes'])} RAM"),
        (f"cpu isa  {_na(h['cpu_isa'])}{f' ({cap})' if (cap := h.get('cpu_isa_cap')) else ''} · threads {_na(h['threads'])} · load 1m {_na(h['load_avg_1m_start'])} → "
         f"{_na(h['load_avg_1m_end'])}"),
        f"commit   {_na(h['fmchat_commit'])} · torch {_na(h['torch'])} · transformers {_na(h['transformers'])}",
        f"decode   {_na(h.get('decode_path'))}",
        *_kernel_lines(h.get("kernels")),
        f"command  {_na(h['command'])}",
    ]


def _kernel_lines(k: dict | None) -> list[str]:
    if not k:
        return [f"kernels  {NA}"]
    if "line" in k:
        return [f"kernels  {k['line']}"]
    return [f"kernels  [{row}] {v['line'] if v else NA}" for row, v in k.items()]  # per row (bench shape)


def decode_paths(paths: dict[str, str]) -> str:
    """The decode paths of a run's rows, one entry per distinct path: ``eager (eager, int8) · compiled (...) (...)``."""
    by_path: dict[str, list[str]] = {}
    for label, path in paths.items():
        by_path.setdefault(path, []).append(label)
    return " · ".join(f"{path} ({', '.join(labels)})" for path, labels in by_path.items()) or NA


def print_header(run: Run, console: Console | None = None) -> None:
    console = console or Console(highlight=False, width=200)
    for line in header_lines(run):
        console.print(line, markup=False, soft_wrap=True)
    console.print()


# ---------------------------------------------------------------- the one way a result is printed
def emit(run: Run, result: dict, json_out: bool, render: Callable[[], None], threads: int | None = None,
         decode_path: str | None = None, kernels: dict | None = None) -> dict:  # fmt: skip
    """Print ``result``: with ``json_out`` one JSON object (``"header"`` first, then the command's keys unchanged),
    else the header then ``render()`` (the command's own tables). ``result`` gains the ``"header"`` key in place, so
    what the bench returns is what ``--json`` printed. ``threads``, ``kernels``: for a bench whose work ran in other
    processes; ``decode_path``: the run's decode path(s) (``decode_paths``)."""
    header = finish(run, threads, decode_path, kernels)
    merged = {"header": header, **{k: v for k, v in result.items() if k != "header"}}
    result.clear()
    result.update(merged)
    if json_out:
        print(json.dumps(result), flush=True)
    else:
        print_header(run)
        render()
    return result
