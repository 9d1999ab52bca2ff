"""The one dispatch point between the codec's C kernels and their numpy twins.

`frames` and `tensor` call the per-byte work through this module's attributes
(`kernels.split(...)`, never a `from kernels import split`), so the choice made here, once
at import, holds everywhere:

- `adapterhub.encoding._native` (built from `_native.c` by `pip install`): one fused pass
  per step, the GIL released around loops over 16 KiB or more, so that threads encoding
  big tensors overlap (snapshot.py decides when a pool pays; on ~45 kB LoRA tensors the
  GIL hand-offs around each short call still cost more than a second thread gains);
- `reference` (numpy): used when the extension is not built, or when the environment
  variable `AH_NO_NATIVE=1` asks for it (tests run both).

Both write and read the very same bytes (tests/test_native.py): the on-disk format never
depends on which one ran. `use()` switches at run time (tests).

Kernels: split, join, survey, pack_codes, count_escapes, unpack_codes,
extrapolation_score; see reference.py
for what each computes.
"""

from __future__ import annotations

import os
from types import ModuleType

NAMES = ("split", "join", "survey", "pack_codes", "count_escapes", "unpack_codes", "extrapolation_score")


def _load_native() -> ModuleType | None:
    """The C extension, or None when it is not built (or does not load here)."""
    try:
        from . import _native as mod
    except ImportError:
        return None
    return mod


def use(name: str) -> str:
    """Bind the kernels of `name` ("native" or "numpy"); returns the name bound before."""
    global active
    before = active
    if name == "native":
        mod = native
        if mod is None:
            raise RuntimeError("the native codec extension is not available")
    elif name == "numpy":
        from . import reference as mod
    else:
        raise ValueError(f"unknown kernel set {name!r}")
    globals().update({k: getattr(mod, k) for k in NAMES})
    active = name
    return before


# The extension when it is built, whatever AH_NO_NATIVE says (tests compare it with numpy).
native = _load_native()
active = "numpy"
use("native" if native is not None and os.environ.get("AH_NO_NATIVE", "") in ("", "0") else "numpy")
