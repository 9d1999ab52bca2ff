"""Build of the one C extension; everything else about the package is in pyproject.toml.

`adapterhub.encoding._native` holds the tensor codec's per-byte loops (byte planes, deltas,
code sections) and BLAKE3 (the vendored C implementation in third_party/blake3, for
hashing tensors on the codec's own threads). It is optional: when it cannot be compiled the
install still succeeds and adapterhub.encoding.kernels falls back to the numpy twins in
reference.py, which write and read the very same bytes. At import the extension also opens
the system's libzstd.so.1 (dlopen; no zstd headers are needed to build) for its
whole-record calls; without it those calls stay off and the codec composes the same
sections in Python.
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError, CompileError

BLAKE3 = "third_party/blake3/"
# BLAKE3's SIMD code as its authors' assembly for x86-64 Unix (no per-file compiler flags
# needed); elsewhere the portable C only.
X86_64_UNIX = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
SIMD = ["sse2", "sse41", "avx2", "avx512"]
PORTABLE_ONLY = [(f"BLAKE3_NO_{s.upper()}", None) for s in SIMD]


class BuildExtWithAssembly(build_ext):
    """build_ext that also hands `.S` files to the C compiler (which assembles them), and
    builds BLAKE3's portable C alone when they do not assemble (an old assembler without
    AVX-512), rather than losing the whole extension."""

    def build_extensions(self):
        if ".S" not in self.compiler.src_extensions:
            self.compiler.src_extensions.append(".S")
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, BaseError):
            if not any(src.endswith(".S") for src in ext.sources):
                raise
            self.warn("BLAKE3's assembly did not build; building its portable C instead")
            ext.sources = [src for src in ext.sources if not src.endswith(".S")]
            ext.define_macros = ext.define_macros + PORTABLE_ONLY
            super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildExtWithAssembly},
    ext_modules=[
        Extension(
            "adapterhub.encoding._native",
            sources=["adapterhub/encoding/_native.c"]
            + [BLAKE3 + f for f in ("blake3.c", "blake3_dispatch.c", "blake3_portable.c")]
            + ([f"{BLAKE3}blake3_{s}_x86-64_unix.S" for s in SIMD] if X86_64_UNIX else []),
            include_dirs=[BLAKE3],
            define_macros=[] if X86_64_UNIX else PORTABLE_ONLY,
            optional=True,
        )
    ],
)
