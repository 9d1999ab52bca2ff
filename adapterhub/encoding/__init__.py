"""Lossless float-aware encodings for tensor objects (docs/format/encodings.md).

- `planes`: split elements into byte planes (sign bit rotated down) with numpy;
- `frames`: store each plane raw, as a fill byte, or as a size-bounded zstd frame;
- `delta`: XOR / SUB difference against the same-named tensor of a base revision;
- `tensor`: the record payloads built from those (codec encodings 1 and 2).

None of these change an object id: ids hash the canonical plain bytes, and every read
decodes back to them and re-hashes.
"""
