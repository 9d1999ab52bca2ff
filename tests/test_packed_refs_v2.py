"""Packed-refs version 2 (binary, shared name prefixes, restart table): lookups and
listings agree with the sorted entries, version-1 files keep reading (and are rewritten
as version 2 by the next writer), and damage is a CorruptObject naming the file."""

from __future__ import annotations

import struct

import pytest

from adapterhub.errors import CorruptObject
from adapterhub.objects import BLOB, hash_object
from adapterhub.packed_refs import HEADER_V1, HEADER_V2, RESTART_INTERVAL, PackedRefs, render
from adapterhub.refs import HEADS, RefStore
from adapterhub.registry import Registry


def _id(i: int) -> str:
    return hash_object(BLOB, b"%d" % i)


def _names(n: int) -> list[str]:
    # Mixed shapes: long shared prefixes, names that are prefixes of others, a name
    # sorting between a prefix and its extensions, non-ASCII bytes.
    base = [f"refs/heads/users/user{i:07d}" for i in range(n)]
    return sorted(base + ["refs/heads/a", "refs/heads/a-b", "refs/heads/a/b", "refs/tags/v1", "refs/heads/é/x"])


def _write(tmp_path, entries) -> PackedRefs:
    path = tmp_path / "packed-refs"
    path.write_bytes(render(entries))
    return PackedRefs(path)


@pytest.mark.parametrize("n", [0, 1, RESTART_INTERVAL - 1, RESTART_INTERVAL, RESTART_INTERVAL + 1, 1000])
def test_every_name_resolves_and_others_do_not(tmp_path, n):
    names = _names(n)
    entries = [(name, _id(i)) for i, name in enumerate(names)]
    packed = _write(tmp_path, entries)
    for name, oid in entries:
        assert packed.get(name) == oid
    for missing in ("refs/heads/", "refs/heads/a/", "refs/heads/users/user", "refs/heads/users/user9", "refs/z", "a"):
        assert packed.get(missing) is None
    assert list(packed.iter_prefix("")) == entries
    for prefix in ("refs/heads/a", "refs/heads/a/", "refs/heads/users/user00000", "refs/tags/", "refs/heads/é"):
        assert list(packed.iter_prefix(prefix)) == [(k, v) for k, v in entries if k.startswith(prefix)]


def test_version_2_costs_under_40_bytes_a_ref_on_numbered_branches(tmp_path):
    entries = [(f"refs/heads/users/user{i:07d}", _id(i % 50)) for i in range(20_000)]
    size = len(render(entries))
    assert size / len(entries) < 40, size / len(entries)


def test_version_1_file_reads_and_the_next_write_is_version_2(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    lines = b"".join(b"%s %s\n" % (_id(i).encode(), n.encode()) for i, n in enumerate(["refs/heads/a", "refs/heads/b/c"]))
    (reg.ah_dir / "packed-refs").write_bytes(HEADER_V1 + lines)
    refs = RefStore(reg.ah_dir)
    assert refs.read(HEADS + "a") == _id(0) and refs.read(HEADS + "b/c") == _id(1)
    assert list(refs.list(HEADS)) == [(HEADS + "a", _id(0)), (HEADS + "b/c", _id(1))]
    refs.create_packed({HEADS + "d": _id(2)})
    assert (reg.ah_dir / "packed-refs").read_bytes().startswith(HEADER_V2)
    assert list(RefStore(reg.ah_dir).list(HEADS)) == [(HEADS + "a", _id(0)), (HEADS + "b/c", _id(1)), (HEADS + "d", _id(2))]


def test_render_refuses_a_bad_id():
    with pytest.raises(ValueError):
        render([("refs/heads/a", "xyz")])


# --- damage ---------------------------------------------------------------------------
def _file(n: int = 40) -> tuple[bytes, list[tuple[str, str]]]:
    entries = [(f"refs/heads/u{i:04d}", _id(i)) for i in range(n)]
    return render(entries), entries


def _footer(data: bytes) -> tuple[int, int]:
    """(restart count, offset of the restart table)."""
    count = struct.unpack_from("<I", data, len(data) - 8)[0]
    return count, len(data) - 8 - 4 * count


def _set_restart(data: bytes, i: int, value: int) -> bytes:
    _count, table = _footer(data)
    out = bytearray(data)
    struct.pack_into("<I", out, table + 4 * i, value)
    return bytes(out)


def _read_all(tmp_path, data: bytes) -> None:
    path = tmp_path / "packed-refs"
    path.write_bytes(data)
    packed = PackedRefs(path)
    names = [f"refs/heads/u{i:04d}" for i in range(40)]
    for name in names:
        packed.get(name)
    list(packed.iter_prefix(""))


def _damaged():
    data, _ = _file()
    count, table = _footer(data)
    second = struct.unpack_from("<I", data, table + 4)[0]
    cases = {
        "truncated in the records": (data[: len(HEADER_V2) + 30], "truncated"),
        "truncated footer": (data[:-3], "truncated"),
        "only a header": (HEADER_V2, "truncated"),
        "restart count too large": (data[:-8] + struct.pack("<I4s", 10**6, b"APR2"), "bad restart table"),
        "no restarts but records": (data[:table] + struct.pack("<I4s", 0, b"APR2"), "bad restart table"),
        "first restart not at the first record": (_set_restart(data, 0, len(HEADER_V2) + 1), "bad restart table"),
        "restart inside a record": (_set_restart(data, 1, second + 3), "bad restart table"),
        "restart past the records": (_set_restart(data, 1, table + 4), "bad restart table"),
        "restarts out of order": (_set_restart(_set_restart(data, 1, struct.unpack_from("<I", data, table + 8)[0]), 2, second),
                                  "bad restart table|not sorted"),
        "restart pointing at a shared-prefix record": (_set_restart(data, 1, second - 35), "bad restart table"),
    }
    # A record whose shared-prefix length exceeds the previous name (byte after the restart record).
    first_len = 2 + len(b"refs/heads/u0000") + 32
    bad = bytearray(data)
    bad[len(HEADER_V2) + first_len] = 100
    cases["shared prefix longer than the previous name"] = (bytes(bad), "sharing")
    return cases


@pytest.mark.parametrize("case", sorted(_damaged()))
def test_damaged_version_2_file_is_a_clear_corrupt_object(tmp_path, case):
    data, match = _damaged()[case]
    with pytest.raises(CorruptObject, match=match) as info:
        _read_all(tmp_path, data)
    assert "packed-refs" in str(info.value)


def test_unsorted_names_are_refused_in_lookups_and_listings(tmp_path):
    # Write names out of order by hand through render's record layout: render sorts, so
    # build two valid files and splice a restart block of one after the other.
    late = [(f"refs/heads/z{i:04d}", _id(i)) for i in range(RESTART_INTERVAL)]
    early = [(f"refs/heads/a{i:04d}", _id(i)) for i in range(RESTART_INTERVAL)]
    a, b = render(late), render(early)
    body_a = a[len(HEADER_V2) : _footer(a)[1]]
    body_b = b[len(HEADER_V2) : _footer(b)[1]]
    data = HEADER_V2 + body_a + body_b + struct.pack("<2I", len(HEADER_V2), len(HEADER_V2) + len(body_a))
    data += struct.pack("<I4s", 2, b"APR2")
    path = tmp_path / "packed-refs"
    path.write_bytes(data)
    with pytest.raises(CorruptObject, match="not sorted"):
        list(PackedRefs(path).iter_prefix(""))
    with pytest.raises(CorruptObject, match="not sorted"):
        PackedRefs(path).get("refs/heads/0")  # probes restart 1, then 0 against it
    # Inside one restart block too.
    swapped = bytearray(render([("refs/heads/b", _id(1)), ("refs/heads/c", _id(2))]))
    swapped[len(HEADER_V2) + 2 + len(b"refs/heads/b") + 32 + 2] = ord("a")  # second name's suffix "c" -> "a"
    path.write_bytes(bytes(swapped))
    with pytest.raises(CorruptObject, match="not sorted"):
        list(PackedRefs(path).iter_prefix(""))


def test_a_registry_with_damaged_packed_refs_reports_it_on_resolve(tmp_path):
    reg = Registry.init(tmp_path / "reg")
    reg.refs.create_packed({HEADS + f"u{i}": _id(i) for i in range(50)})
    path = reg.ah_dir / "packed-refs"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptObject, match="packed-refs"):
        RefStore(reg.ah_dir).read(HEADS + "u7")


def test_a_name_that_is_not_utf8_is_a_corrupt_object(tmp_path):
    data = bytearray(render([("refs/heads/a", _id(1)), ("refs/heads/b", _id(2))]))
    data[len(HEADER_V2) + 2 + len(b"refs/heads/")] = 0xFF  # first name's last byte
    path = tmp_path / "packed-refs"
    for content in (bytes(data), HEADER_V1 + b"%s refs/heads/\xff\n" % _id(1).encode()):
        path.write_bytes(content)
        with pytest.raises(CorruptObject, match="not UTF-8"):
            list(PackedRefs(path).iter_prefix("refs/"))
