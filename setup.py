"""Build of the one C extension; everything else about the package is in pyproject.toml.

`adapterhub.encoding._native` holds the tensor codec's per-byte loops (byte planes, deltas,
code sections). It is optional: when it cannot be compiled the install still succeeds and
adapterhub.encoding.kernels falls back to the numpy twins in reference.py, which write and
read the very same bytes. At import the extension also opens the system's libzstd.so.1
(dlopen; no zstd headers are needed to build) for its whole-record calls; without it those
calls stay off and the codec composes the same sections in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "adapterhub.encoding._native",
            sources=["adapterhub/encoding/_native.c"],
            optional=True,
        )
    ]
)
