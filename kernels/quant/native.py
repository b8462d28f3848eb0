"""Hand-written CPU kernels (``csrc/``), compiled with the system C++ compiler at first use and cached.

``load(build_dir)`` compiles ``csrc/int8_gemv_cpu.cpp`` against this torch's headers (one ``c++`` call, ~20 s on 2
cores), keeps the shared library in ``build_dir`` under a name keyed by the source, the torch version and the flags,
and loads it with ``torch.ops.load_library``; the next process finds the file and only loads it. It registers the
ops ``torch.ops.kernels_quant_cpu.q8_gemv`` / ``f32_gemv`` (one-row int8 products, see the source's header) with
fake implementations, so that ``torch.compile``/``torch.export`` trace them as opaque calls: inside an AOTInductor
package they are called through the dispatcher (C++ to C++, no Python), so the package needs this library loaded in
the process that runs it (``load`` before opening a package that uses them).

Nothing here is required: without a compiler, off x86-64, or if the build fails, ``load`` returns False and
:func:`status` says why; the kernel selection then never offers these candidates. ``FMCHAT_NATIVE_KERNELS=off``
turns them off (an A/B against the kernels used before they existed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "int8_gemv_cpu.cpp"
OFF_ENV = "FMCHAT_NATIVE_KERNELS"
CXXFLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden"]
LIBRARY = "kernels_quant_cpu"
ISA_AVX2, ISA_AVX512_VNNI = 2, 5

_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "reason": "not loaded yet", "path": None, "seconds": None, "isa": None}


def default_build_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmchat_kernels"


def status() -> dict:
    """``{"loaded", "reason", "path", "seconds"}``: whether the ops are there, and if not why (a one-line reason)."""
    return dict(_STATE)


def available() -> bool:
    return bool(_STATE["loaded"])


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    libdir = Path(torch.__file__).parent / "lib"
    return [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
            str(SOURCE), "-o", str(out), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]  # fmt: skip


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join([torch.__version__, platform.machine(), cxx, *CXXFLAGS]).encode())
    return h.hexdigest()[:16]


def load(build_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> bool:
    """Build (once per machine, source and torch version) and load the native ops; True when they are usable."""
    say = log or (lambda _msg: None)
    with _LOCK:
        if _STATE["loaded"]:
            return True
        if os.environ.get(OFF_ENV, "").lower() in ("off", "0", "no"):
            _STATE["reason"] = f"off ({OFF_ENV})"
            return False
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _STATE["reason"] = f"x86-64 only (this is {platform.machine()})"
            return False
        cxx = _compiler()
        if cxx is None:
            _STATE["reason"] = "no C++ compiler (c++/g++ not on PATH)"
            return False
        folder = Path(build_dir) if build_dir is not None else default_build_dir()
        so = folder / f"{LIBRARY}-{_key(cxx)}.so"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not so.exists():
                _build(cxx, folder, so, say)
            try:
                torch.ops.load_library(str(so))
            except OSError:  # a kept file that does not load (truncated, corrupt): built again, once
                if _STATE["seconds"] is not None:
                    raise
                say(f"native kernels: {so.name} does not load; building it again")
                so.unlink(missing_ok=True)
                _build(cxx, folder, so, say)
                torch.ops.load_library(str(so))
            if not torch.ops.kernels_quant_cpu.isa_available(ISA_AVX2):
                _STATE["reason"] = "this CPU has no AVX2/FMA"
                return False
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            _STATE["reason"] = f"build or load failed: {first}"
            say(f"native kernels: {_STATE['reason']}")
            return False
        _register_fakes()
        cap = torch.backends.cpu.get_cpu_capability()  # read here, not in a trace (Dynamo cannot trace it)
        wide = cap.startswith("AVX512") and torch.ops.kernels_quant_cpu.isa_available(ISA_AVX512_VNNI)
        _STATE.update(loaded=True, reason="loaded", path=str(so), isa=ISA_AVX512_VNNI if wide else ISA_AVX2)
        return True


def _build(cxx: str, folder: Path, so: Path, say) -> None:
    import time

    with _file_lock(folder / ".build.lock"):
        if so.exists():  # another process built it while this one waited
            return
        tmp = so.with_name(f".{so.name}.{os.getpid()}.tmp")
        say("native kernels: compiling csrc/int8_gemv_cpu.cpp (once per machine)")
        t0 = time.perf_counter()
        res = subprocess.run(_command(cxx, tmp), capture_output=True, text=True, timeout=600, check=False)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            errors = [ln for ln in res.stderr.splitlines() if "error" in ln] or res.stderr.splitlines() or ["?"]
            raise RuntimeError(f"{Path(cxx).name} exit {res.returncode}: {errors[0]}")
        os.replace(tmp, so)
        _STATE["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"native kernels: compiled in {_STATE['seconds']:.1f} s")


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_FAKES: list = []


def _register_fakes() -> None:
    if _FAKES:
        return

    def one_row(x, w, scales, isa):
        return x.new_empty(1, w.shape[0])

    for name in ("q8_gemv", "f32_gemv"):
        _FAKES.append(torch.library.register_fake(f"{LIBRARY}::{name}", one_row))


def best_isa() -> int:
    """The widest ISA the q8 kernel may use here: AVX-512 VNNI where the CPU has it and torch's own capability is
    AVX-512 (``ATEN_CPU_CAPABILITY=avx2`` caps it to AVX2, so a capped run measures AVX2 code), else AVX2."""
    return int(_STATE["isa"] or 0)


def describe() -> str:
    """One line for a report header: which native kernels run here, or why none."""
    if not available():
        return f"native int8 kernels: none ({_STATE['reason']})"
    return f"native int8 kernels: {'AVX-512 VNNI' if best_isa() == ISA_AVX512_VNNI else 'AVX2'}"


def one_row(kernel: str, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, K]`` times int8 ``w`` ``[N, K]`` with fp32 per-row ``scales`` by the native ``kernel`` (``q8`` or
    ``f32``), ``[1, N]`` in ``x``'s dtype; traced as one opaque call."""
    op = torch.ops.kernels_quant_cpu.q8_gemv if kernel == "q8" else torch.ops.kernels_quant_cpu.f32_gemv
    return op(x, w, scales, best_isa())


def q8_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, isa: int = ISA_AVX2) -> torch.Tensor:
    return torch.ops.kernels_quant_cpu.q8_gemv(x, w, scales, isa)


def f32_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, isa: int = ISA_AVX2) -> torch.Tensor:
    return torch.ops.kernels_quant_cpu.f32_gemv(x, w, scales, isa)
