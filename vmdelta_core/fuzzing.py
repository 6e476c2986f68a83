"""The fuzz contract every parser of untrusted bytes is held to, for the project's and plugins' tests.

A parser given hostile bytes must end in one of two ways: a :class:`VmdeltaError` (refused
cleanly), or a result the test then checks for correctness. Any other exception, a run past its
time bound or an allocation past its memory bound is a bug. :func:`check_untrusted` enforces that
for one input; :func:`fuzz_settings` scales the number of hypothesis examples, small in the test
run and large in ``tox -e fuzz`` (``VMDELTA_FUZZ_SCALE``)::

    from hypothesis import given, strategies as st
    from vmdelta_core.testing import check_untrusted, fuzz_settings

    @fuzz_settings(200)
    @given(st.binary(max_size=4096))
    def test_parse_list(data):
        check_untrusted("free-pfn list", lambda: parse_list(data))

Outcomes are counted per parser name; with ``VMDELTA_FUZZ_REPORT=FILE`` the counts are added to
that JSON file when the process ends (the figures in ``docs/reliability.md`` come from there).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from vmdelta_core.errors import VmdeltaError

__all__ = ["FuzzViolation", "check_untrusted", "fuzz_outcomes", "fuzz_settings"]

T = TypeVar("T")

#: memory one parse may allocate (Python and numpy allocations, as tracemalloc sees them)
DEFAULT_MEMORY = 256 << 20
#: seconds one parse may take before it counts as a hang
DEFAULT_SECONDS = 20.0

_outcomes: dict[str, Counter[str]] = {}
_messages: list[str] = []
_lock = threading.Lock()


class FuzzViolation(AssertionError):
    """A parser broke the contract: a stray exception, a hang or memory past its bound."""


def fuzz_scale() -> float:
    """How many times the default number of examples to run (``VMDELTA_FUZZ_SCALE``, default 1)."""
    try:
        return max(0.01, float(os.environ.get("VMDELTA_FUZZ_SCALE", "1")))
    except ValueError:
        return 1.0


def fuzz_settings(examples: int, **overrides: Any) -> Any:
    """Hypothesis settings for a fuzz test: ``examples`` scaled by ``VMDELTA_FUZZ_SCALE``, no
    per-example deadline (:func:`check_untrusted` bounds the time instead), and derandomized in
    the normal test run so that CI is repeatable; a scaled-up run explores new inputs."""
    from hypothesis import HealthCheck, settings

    scale = fuzz_scale()
    return settings(
        max_examples=max(1, round(examples * scale)),
        deadline=None,
        derandomize=scale <= 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        **overrides,
    )


class _Timeout(BaseException):
    """Raised in the main thread by the alarm (a BaseException, so parsers cannot swallow it)."""


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """``seconds`` of processor time (a busy machine does not make a parser look hung), and ten
    times as long by the clock (a parser blocked on a read uses no processor time)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _Timeout

    timers = ((signal.SIGPROF, signal.ITIMER_PROF, seconds), (signal.SIGALRM, signal.ITIMER_REAL, 10 * seconds))
    previous = [(signum, signal.signal(signum, expire)) for signum, _, _ in timers]
    for _, timer, limit in timers:
        signal.setitimer(timer, limit)
    try:
        yield
    finally:
        for _, timer, _ in timers:
            signal.setitimer(timer, 0)
        for signum, handler in previous:
            signal.signal(signum, handler)


def check_untrusted(
    name: str,
    parse: Callable[[], T],
    *,
    memory: int = DEFAULT_MEMORY,
    seconds: float = DEFAULT_SECONDS,
) -> T | VmdeltaError:
    """Run ``parse`` on untrusted input under the fuzz contract.

    :param name: the parser, for the outcome counts (``"qcow2 header"``).
    :returns: what ``parse`` returned, or the :class:`VmdeltaError` it raised (a clean refusal).
    :raises FuzzViolation: any other exception, more than ``seconds``, or more than ``memory``
        bytes allocated at the peak.
    """
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    outcome = "accepted"
    try:
        with _time_bound(seconds):
            result: T | VmdeltaError = parse()
    except VmdeltaError as exc:
        outcome = "refused"
        result = exc
    except _Timeout:
        outcome = "violation"
        raise _violation(FuzzViolation(f"{name}: still parsing after {seconds} s of processor time")) from None
    except Exception as exc:
        outcome = "violation"
        raise _violation(
            FuzzViolation(f"{name}: {type(exc).__name__} escaped instead of a VmdeltaError: {exc}")
        ) from exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not tracing:
            tracemalloc.stop()
        _count(name, outcome)
    if peak - base > memory:
        _count(name, "violation")
        raise _violation(FuzzViolation(f"{name}: allocated {(peak - base) >> 20} MiB, more than {memory >> 20} MiB"))
    return result


def _violation(error: FuzzViolation) -> FuzzViolation:
    """Keep the first few messages for the report: a long run's failure must say what it was."""
    with _lock:
        if len(_messages) < 20:
            _messages.append(str(error)[:500])
    return error


def fuzz_outcomes() -> dict[str, dict[str, int]]:
    """Outcomes so far in this process: per parser, how many inputs were accepted or refused."""
    with _lock:
        return {name: dict(counts) for name, counts in sorted(_outcomes.items())}


def _count(name: str, outcome: str) -> None:
    with _lock:
        _outcomes.setdefault(name, Counter())[outcome] += 1


def _write_report() -> None:
    target = os.environ.get("VMDELTA_FUZZ_REPORT")
    if not target or not _outcomes:
        return
    path = Path(target)
    try:
        totals: dict[str, dict[str, int]] = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        totals = {}
    for name, counts in fuzz_outcomes().items():
        entry = totals.setdefault(name, {})
        for outcome, n in counts.items():
            entry[outcome] = entry.get(outcome, 0) + n
    if _messages:
        kept = totals.setdefault("violation messages", {})
        for message in _messages:
            kept[str(len(kept))] = message
    path.write_text(json.dumps(totals, indent=1, sort_keys=True) + "\n")


atexit.register(_write_report)
