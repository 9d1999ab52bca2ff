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
extrapolation_score, hash_objects (object ids: BLAKE3, vendored in C); see reference.py
for what each computes.

Besides the kernels, the native set has whole-record calls: `encode_sections` and
`decode_sections`, all of a tensor's plane and tail sections (frames.py's choices, zstd
included) in one call without the GIL, and `encode_records` / `read_tensors`, whole
records of a batch of tensors made (codec.encode_tensor's) or read and checked against
their ids, on kept C threads (`read_plan` parses a record's headers for the latter;
`read_tensors_start` hands a batch to the kept threads and returns at once, its `wait()`
joins them and gives read_tensors' list: Python runs meanwhile).
They need zstd from C (the system's libzstd.so.1, `_native.has_zstd()`); they are None
under numpy or without it, and tensor.py then composes the same sections from frames.py
in Python (codec.encode_tensors and store.read_tensors go one tensor at a time).
Per-section, then per-tensor, Python was most of a commit's time on ~45 kB LoRA tensors,
and held the GIL so that threads could not help.
"""

from __future__ import annotations

import os
from types import ModuleType

NAMES = ("split", "join", "survey", "pack_codes", "count_escapes", "unpack_codes", "extrapolation_score", "hash_objects")


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
    whole = name == "native" and mod.has_zstd()
    globals().update(
        encode_sections=mod.encode_sections if whole else None,
        decode_sections=mod.decode_sections if whole else None,
        encode_records=mod.encode_records if whole else None,
        read_tensors=mod.read_tensors if whole else None,
        read_tensors_start=mod.read_tensors_start if whole else None,
        read_plan=mod.read_plan if whole else None,
    )
    active = name
    return before


# The extension when it is built, whatever AH_NO_NATIVE says (tests compare it with numpy).
native = _load_native()
# What decode_sections raises for a damaged record (tensor.py turns it into CorruptObject).
CorruptRecord = native.CorruptRecord if native is not None else ValueError
encode_sections = decode_sections = encode_records = read_tensors = read_tensors_start = read_plan = None
active = "numpy"
use("native" if native is not None and os.environ.get("AH_NO_NATIVE", "") in ("", "0") else "numpy")
