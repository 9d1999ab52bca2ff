"""Snapshot.parse refuses every malformed tensor entry with the message that names it,
and object ids are exactly 64 lowercase hex characters (no trailing newline)."""

from __future__ import annotations

import pytest

from adapterhub.errors import CorruptObject
from adapterhub.objects import FileEntry, Snapshot, TensorEntry, canonical_json, is_oid

OID = "ab" * 32
SNAP_ID = "cd" * 32


def _body(tensor: dict) -> bytes:
    return canonical_json({"files": [
        {"path": "adapter_model.safetensors", "kind": "safetensors", "size": 24, "blob": OID, "tensors": [tensor]},
    ]})


GOOD = {"name": "w", "dtype": "F32", "shape": [2, 3], "blob": OID}


def test_a_good_entry_parses_to_what_was_written():
    snap = Snapshot.parse(SNAP_ID, _body(GOOD))
    assert snap == Snapshot((FileEntry("adapter_model.safetensors", "safetensors", 24, OID,
                                       (TensorEntry("w", "F32", (2, 3), OID),)),))
    assert Snapshot.parse(SNAP_ID, snap.serialize()) == snap
    empty = {**GOOD, "shape": []}  # a scalar
    assert Snapshot.parse(SNAP_ID, _body(empty)).files[0].tensors[0].shape == ()


@pytest.mark.parametrize("change, message", [
    ({"shape": None}, "field 'shape' missing"),
    ({"shape": "2x3"}, "field 'shape' missing"),
    ({"shape": [2, -3]}, "not a list of sizes"),
    ({"shape": [2, True]}, "not a list of sizes"),
    ({"shape": [2, 3.0]}, "not a list of sizes"),
    ({"name": None}, "field 'name' missing"),
    ({"name": 7}, "field 'name' missing"),
    ({"dtype": ["F32"]}, "field 'dtype' missing"),
    ({"blob": None}, "tensor blob is not an object id"),
    ({"blob": OID.upper()}, "tensor blob is not an object id"),
    ({"blob": OID + "\n"}, "tensor blob is not an object id"),
    ({"blob": OID[:-1]}, "tensor blob is not an object id"),
])
def test_a_malformed_tensor_entry_is_refused_by_name(change, message):
    entry = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(CorruptObject, match=message):
        Snapshot.parse(SNAP_ID, _body(entry))


def test_a_tensor_entry_that_is_not_an_object_is_refused():
    body = canonical_json({"files": [
        {"path": "a.safetensors", "kind": "safetensors", "size": 0, "blob": OID, "tensors": [["w"]]},
    ]})
    with pytest.raises(CorruptObject, match="tensor entry is not an object"):
        Snapshot.parse(SNAP_ID, body)


def test_is_oid_is_exact():
    assert is_oid(OID)
    assert not is_oid(OID + "\n") and not is_oid(OID.upper()) and not is_oid(OID[:-1]) and not is_oid(OID + "0")
