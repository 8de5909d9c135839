"""Build, cache and load the compiled CPU kernels (``kernels/bcnn_kernels.cpp``) through ctypes.

The kernels are plain C++ with a C ABI and no Python or torch headers, so the one-time build is a
single compiler call of about a second (``g++ -O3 -std=c++17 -fPIC -shared -fopenmp``); there is no
dependency on ninja or on the Python development headers. The library is cached under
``$BINARYCONNECT_KERNEL_CACHE``, else ``$TORCH_EXTENSIONS_DIR/binaryconnect``, else
``$XDG_CACHE_HOME/binaryconnect/kernels`` (``~/.cache/...``), in a file named after a hash of the
sources, the compiler's version and the flags: a changed source or compiler builds a new library,
and concurrent builds are safe (each writes a temporary file and renames it into place).

The instruction set (AVX-512, AVX2 or portable code) is chosen at run time by the library itself;
``$BINARYCONNECT_ISA`` (``avx512``, ``avx2``, ``scalar``) or ``set_isa`` forces one. The compiler is
``$CXX``, else ``g++``, else ``c++``. OpenMP threads: the kernels use the count they are passed (the
engine passes ``torch.get_num_threads()``); libgomp is shared with torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import BinaryConnectError, ConfigError
from .pack import unpack_bits

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bcnn_kernels.cpp", "lut_body.inc")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp")
ISAS = ("scalar", "avx2", "avx512")
ENV_CACHE = "BINARYCONNECT_KERNEL_CACHE"
ENV_ISA = "BINARYCONNECT_ISA"

#: Return codes of ``bcnn_conv2d``.
_ERRORS = {-1: "invalid layer geometry", -2: "out of memory", -3: "a channel plane (batch x height x width) "
           "over 2^31 values: use a smaller batch"}


def _float32_buffers(**tensors: torch.Tensor) -> None:
    """ValueError unless every tensor is a contiguous float32 CPU tensor: the kernels read and write raw memory."""
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")


def _checked(rc: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` if the kernel returned 0, else a RuntimeError naming the failure (``_ERRORS``)."""
    if rc != 0:
        raise RuntimeError(f"binaryconnect kernel failed: {_ERRORS.get(rc, rc)}")
    return out


class NativeUnavailable(BinaryConnectError):
    """The compiled kernels cannot be built or loaded here (no compiler, failed build, non-x86 CPU...)."""

    verbatim = True  # its message may hold the compiler's output: printed as it is, lines and all


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "binaryconnect"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "binaryconnect" / "kernels"


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"cannot run the C++ compiler {cxx} ({exc})") from None


def build(force: bool = False) -> Path:
    """Compile the kernels if the cache has no library for these sources and compiler; return its path."""
    if os.uname().machine not in ("x86_64", "AMD64", "i686", "i386"):
        raise NativeUnavailable(f"the compiled kernels target x86 CPUs; this machine is {os.uname().machine}")
    cxx = find_compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set $CXX or install g++)")
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((KERNEL_DIR / name).read_bytes())
    digest.update(_compiler_version(cxx).encode())
    digest.update(" ".join((cxx, *FLAGS)).encode())
    folder = cache_dir()
    lib = folder / f"libbcnn_kernels-{digest.hexdigest()[:16]}.so"
    if lib.is_file() and not force:
        return lib
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise NativeUnavailable(f"cannot write the kernel cache {folder} ({exc}); set ${ENV_CACHE}") from None
    cmd = [cxx, *FLAGS, "-I", str(KERNEL_DIR), str(KERNEL_DIR / "bcnn_kernels.cpp"), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise NativeUnavailable(f"building the kernels failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"building the kernels failed ({exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class LayerDesc(ctypes.Structure):
    """``struct bcnn_layer``: a binary layer's fixed parameters, built once, passed by pointer."""

    _fields_ = [(name, ctypes.c_int64) for name in ("C", "H", "W", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw",
                                                    "N")] + [
        ("wt", ctypes.c_void_p), ("wr", ctypes.c_void_p), ("wq", ctypes.c_void_p), ("w3", ctypes.c_void_p),
        ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p), ("relu", ctypes.c_int64)]


def weight_layouts(wr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' copies of the packed bits ``wr`` [N, Kg] (the file's rows), all 1 bit per weight:
    ``wt`` [Kg, N] uint8 (group-major), ``wq`` [ceil(Kg / 4), N] int32 (each row's bytes 4c..4c+3 as a
    little-endian word) and ``w3`` [ceil(8 Kg / 30), N] int32 (bits 30c..30c+29 of each row in bits 0..29)."""
    if sys.byteorder != "little":  # pragma: no cover - the kernels target x86
        raise NativeUnavailable("the compiled kernels need a little-endian CPU")
    n, kg = wr.shape
    kq = (kg + 3) // 4
    padded = torch.zeros(n, 4 * kq, dtype=torch.uint8)
    padded[:, :kg] = wr
    kc = (8 * kg + 29) // 30
    bits = torch.zeros(n, 30 * kc, dtype=torch.int32)
    bits[:, :8 * kg] = unpack_bits(wr, 8 * kg)
    words = (bits.view(n, kc, 30) << torch.arange(30, dtype=torch.int32)).sum(-1, dtype=torch.int32)
    return wr.t().contiguous(), padded.view(torch.int32).t().contiguous(), words.t().contiguous()


class Kernels:
    """The loaded library: ``conv2d`` (linear layers are 1x1 convolutions), ``maxpool2d`` (fused with a
    following batch norm and ReLU) and instruction-set control."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = lib = ctypes.CDLL(str(path))
        i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.bcnn_conv2d.argtypes = [vp] + [i64] * 12 + [vp, vp, vp, vp, i64, vp, vp, c_int, vp, c_int, c_int]
        lib.bcnn_conv2d.restype = c_int
        lib.bcnn_isa_name.restype = ctypes.c_char_p
        lib.bcnn_isa_name.argtypes = []
        lib.bcnn_set_isa.argtypes = [c_int]
        lib.bcnn_set_isa.restype = c_int
        lib.bcnn_isa_supported.argtypes = [c_int]
        lib.bcnn_isa_supported.restype = c_int
        lib.bcnn_layer_forward.argtypes = [ctypes.POINTER(LayerDesc), vp, i64, vp, c_int, c_int]
        lib.bcnn_layer_forward.restype = c_int
        lib.bcnn_maxpool2d.argtypes = [vp] + [i64] * 10 + [vp, vp, c_int, vp, c_int]
        lib.bcnn_maxpool2d.restype = c_int
        self._conv = lib.bcnn_conv2d
        self._layer = lib.bcnn_layer_forward
        self._pool = lib.bcnn_maxpool2d

    @property
    def isa(self) -> str:
        return self.lib.bcnn_isa_name().decode()

    def supported_isas(self) -> list[str]:
        return [name for i, name in enumerate(ISAS) if self.lib.bcnn_isa_supported(i)]

    def set_isa(self, name: str | None) -> str:
        """Force an instruction set (``None``: the best this CPU has); return the one in use."""
        if name is not None and name not in ISAS:
            raise ConfigError(f"unknown instruction set {name!r} (${ENV_ISA}?); choose one of {', '.join(ISAS)}")
        if self.lib.bcnn_set_isa(-1 if name is None else ISAS.index(name)) < 0:
            raise NativeUnavailable(f"this CPU lacks {name}; it supports {', '.join(self.supported_isas())}")
        return self.isa

    def conv2d(self, x: torch.Tensor, geometry: tuple[int, ...], wr: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor, relu: bool, out: torch.Tensor, threads: int, mode: int = 0) -> torch.Tensor:
        """Run one binary layer (tests; the engine uses ``layer`` and ``forward``). ``x`` [C, B, H, W] float32
        contiguous, ``geometry`` = (B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw), ``wr`` the packed rows
        [N, ceil(K / 8)], ``out`` [N, B, OH, OW]; mode 0 chooses the kernel by a cost model, 1 forces 256-entry
        tables (one per byte of weights), 2 one column at a time (linear layers only), 3 two 16-entry tables
        per byte."""
        _float32_buffers(x=x, out=out)
        wr = wr.contiguous()
        wt, wq, w3 = weight_layouts(wr)
        rc = self._conv(x.data_ptr(), *geometry, wt.data_ptr(), wr.data_ptr(), wq.data_ptr(), w3.data_ptr(),
                        scale.shape[0], scale.data_ptr(), offset.data_ptr(), int(relu), out.data_ptr(), int(threads),
                        int(mode))
        return _checked(rc, out)

    def layer(self, c: int, h: int, w: int, kernel, stride, padding, dilation, wr: torch.Tensor,
              scale: torch.Tensor, offset: torch.Tensor, relu: bool) -> LayerDesc:
        """A ``LayerDesc`` for ``forward``; it keeps its tensors alive (``desc.tensors``)."""
        wr = wr.contiguous()
        wt, wq, w3 = weight_layouts(wr)
        scale, offset = scale.contiguous(), offset.contiguous()
        _float32_buffers(scale=scale, offset=offset)
        desc = LayerDesc(c, h, w, *kernel, *stride, *padding, *dilation, scale.shape[0], wt.data_ptr(), wr.data_ptr(),
                         wq.data_ptr(), w3.data_ptr(), scale.data_ptr(), offset.data_ptr(), int(relu))
        desc.tensors = (wr, wt, wq, w3, scale, offset)
        return desc

    def forward(self, desc: LayerDesc, x: torch.Tensor, batch: int, out: torch.Tensor, threads: int,
                mode: int = 0) -> torch.Tensor:
        """Run the layer ``desc`` on ``x`` [C, batch, H, W] (float32, contiguous) into ``out``."""
        _float32_buffers(x=x, out=out)
        rc = self._layer(desc, x.data_ptr(), batch, out.data_ptr(), threads, mode)
        return _checked(rc, out)

    def maxpool2d(self, x: torch.Tensor, kernel, stride, padding, scale: torch.Tensor | None,
                  offset: torch.Tensor | None, relu: bool, threads: int) -> torch.Tensor:
        """Max pooling (floor mode) of ``x`` [C, B, H, W] (float32, contiguous), then ``scale[c] * . + offset[c]``
        (a following batch norm; ``scale=None``: none) and ``max(., 0)`` if ``relu``, in one pass: a new
        ``[C, B, OH, OW]`` tensor."""
        x = x.to(torch.float32).contiguous()
        c, b, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        out = torch.empty(c, b, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, dtype=torch.float32)
        if scale is not None and (scale.shape != (c,) or offset is None or offset.shape != (c,)):
            raise ValueError(f"scale and offset must both have shape [{c}]")
        if scale is not None:
            _float32_buffers(scale=scale, offset=offset)
        rc = self._pool(x.data_ptr(), c, b, h, w, kh, kw, sh, sw, ph, pw,
                        None if scale is None else scale.data_ptr(), None if scale is None else offset.data_ptr(),
                        int(relu), out.data_ptr(), int(threads))
        return _checked(rc, out)


_lock = threading.Lock()
_kernels: Kernels | None = None
_failure: NativeUnavailable | None = None


def load() -> Kernels:
    """The kernels, built on first use and cached; NativeUnavailable (remembered) if that fails."""
    global _kernels, _failure
    with _lock:
        if _kernels is not None:
            return _kernels
        if _failure is not None:
            raise _failure
        try:
            kernels = Kernels(build())
        except NativeUnavailable as exc:
            _failure = exc
            raise
        except OSError as exc:
            _failure = NativeUnavailable(f"cannot load the compiled kernels ({exc})")
            raise _failure from None
        isa = os.environ.get(ENV_ISA)
        if isa:
            kernels.set_isa(isa)
        _kernels = kernels
        return kernels


def available() -> bool:
    try:
        load()
        return True
    except NativeUnavailable:
        return False
