from __future__ import annotations

from vmdelta_encoder_bytepatch import BytePatchEncoder

from vmdelta_core.testing import check_encoder


def test_conformance() -> None:
    counts = check_encoder(BytePatchEncoder())
    assert counts["accepted"] >= 2  # the small edits
    assert counts["declined"] >= 2  # random data, shifted text


def test_a_small_edit_costs_a_few_bytes() -> None:
    base = bytes(4096)
    target = bytearray(base)
    target[100:104] = b"edit"
    (payload,) = BytePatchEncoder().encode([memoryview(base)], [memoryview(bytes(target))])
    assert payload is not None and len(payload) == 8
