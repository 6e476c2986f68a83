"""The fuzz contract itself: what counts as a clean refusal and what as a violation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vmdelta_core.errors import FormatError
from vmdelta_core.fuzzing import FuzzViolation, check_untrusted, fuzz_outcomes


def test_a_result_or_a_vmdelta_error_passes() -> None:
    assert check_untrusted("self-test ok", lambda: 42) == 42

    def refuse() -> None:
        raise FormatError("bad magic")

    got = check_untrusted("self-test ok", refuse)
    assert isinstance(got, FormatError)
    assert fuzz_outcomes()["self-test ok"] == {"accepted": 1, "refused": 1}


def test_a_stray_exception_is_a_violation() -> None:
    with pytest.raises(FuzzViolation, match="IndexError escaped"):
        check_untrusted("self-test stray", lambda: [][1])


def test_a_hang_is_a_violation() -> None:
    def spin() -> None:
        while True:
            pass

    def blocked() -> None:
        while True:
            time.sleep(0.01)

    with pytest.raises(FuzzViolation, match="still parsing"):
        check_untrusted("self-test hang", spin, seconds=0.2)
    with pytest.raises(FuzzViolation, match="still parsing"):  # no processor time: the clock bound
        check_untrusted("self-test hang", blocked, seconds=0.05)


def test_memory_past_the_bound_is_a_violation() -> None:
    with pytest.raises(FuzzViolation, match="allocated"):
        check_untrusted("self-test memory", lambda: np.ones(64 << 20, dtype=np.uint8), memory=16 << 20)
