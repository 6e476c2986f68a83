"""docs/guide.md cannot drift from the tool: every shell command in it runs here, in order, with
the exit status it states; the QEMU monitor session it shows is the one QEMU answers; its table
of exit codes is the one errors.py defines.

The sample's commands need the core alone. The real capture's need the plugins, the fixtures and
QEMU, and run in the integration environment (tox -e integration), where all are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from vmdelta_core import errors
from vmdelta_core.registry import default_registry

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
SAMPLE, CAPTURE = "## On the bundled sample", "## On a real capture"
GUIDE_PORT = 7478
#: how long a server may take to listen, or QEMU to load a stream: a guard against a hang, not a
#: measure of speed
PATIENCE = 300.0
_STATUS = re.compile(r"\s+# exits (\d+)$")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@attrs.frozen
class Command:
    """One line of a ``sh`` block: what to run and what it must give."""

    line: str
    status: int = 0
    background: bool = False
    #: the monitor session shown after it (``(qemu) ...`` lines and QEMU's answers)
    session: tuple[str, ...] = ()


def commands(start: str, end: str | None) -> list[Command]:
    """The commands of the guide from heading ``start`` to heading ``end`` (or its end)."""
    text = GUIDE.read_text()
    part = text[text.index(start) : text.index(end) if end else len(text)]
    found: list[Command] = []
    for fence in _FENCE.finditer(part):
        language, body = fence.group(1), fence.group(2)
        if language == "text" and body.startswith("(qemu)") and found:
            found[-1] = attrs.evolve(found[-1], session=tuple(body.splitlines()))
        elif language == "sh":
            for line in filter(None, body.splitlines()):
                expected = _STATUS.search(line)
                line = _STATUS.sub("", line)
                background = line.endswith(" &")
                found.append(Command(line.removesuffix(" &"), int(expected[1]) if expected else 0, background))
    return found


def environment(folder: Path) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this vmdelta first
    return os.environ | {"PATH": path, "VMDELTA_CACHE_DIR": str(folder / ".cache"), "COLUMNS": "100"}


class Output:
    """A process's output, read on a thread as it comes, to wait for what it will say."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        while chunk := os.read(stream.fileno(), 65536):  # type: ignore[attr-defined]
            with self._changed:
                self.text += _ESCAPES.sub("", chunk.decode(errors="replace")).replace("\r", "")
                self._changed.notify_all()
        with self._changed:
            self.text += "\0"  # the end
            self._changed.notify_all()

    def close(self, stream: object) -> None:
        """Once the process has ended: the rest read, then the pipe closed."""
        self._thread.join(PATIENCE)
        stream.close()  # type: ignore[attr-defined]

    def wait_for(self, needle: str, start: int) -> int:
        """Where ``needle`` appears after ``start``; fails at the end of the output or after PATIENCE."""
        deadline = time.monotonic() + PATIENCE
        with self._changed:
            while (at := self.text.find(needle, start)) < 0:
                assert "\0" not in self.text[start:], f"the process ended without saying {needle!r}:\n{self.text}"
                assert self._changed.wait(max(0.0, deadline - time.monotonic())), f"no {needle!r}:\n{self.text}"
            return at


def run_in_background(command: Command, folder: Path) -> tuple[subprocess.Popen[bytes], Output]:
    """A server, once it says it is listening."""
    server = subprocess.Popen(
        ["bash", "-c", f"exec {command.line}"], cwd=folder, env=environment(folder), stderr=subprocess.PIPE
    )
    said = Output(server.stderr)
    said.wait_for("listening on", 0)
    return server, said


def run_monitor_session(command: Command, folder: Path) -> None:
    """QEMU with its monitor on standard input: once the stream has loaded, the documented
    commands give the documented answers."""
    qemu = subprocess.Popen(
        ["bash", "-c", f"exec {command.line}"],
        cwd=folder,
        env=environment(folder),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = Output(qemu.stdout)
    try:
        prompt = "(qemu)"
        mark = out.wait_for(prompt, 0) + len(prompt)

        def ask(what: str) -> str:
            nonlocal mark
            assert qemu.stdin is not None
            qemu.stdin.write(f"{what}\n".encode())
            qemu.stdin.flush()
            end = out.wait_for("\0", mark) if what == "quit" else out.wait_for(prompt, mark)
            answer, mark = out.text[mark:end], end + len(prompt)
            return answer

        deadline = time.monotonic() + PATIENCE
        while "inmigrate" in ask("info status"):  # the stream is still loading
            assert time.monotonic() < deadline, "QEMU did not finish loading the stream"
            time.sleep(0.2)
        for number, line in enumerate(command.session):
            if line.startswith("(qemu) "):
                answer = ask(line.removeprefix("(qemu) ")).splitlines()
                for expected in _answers(command.session[number + 1 :]):
                    assert expected in answer, f"{line}: QEMU said {answer}, the guide {expected!r}"
        assert qemu.wait(PATIENCE) == 0, out.text
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        qemu.stdin.close()  # type: ignore[union-attr]
        out.close(qemu.stdout)


def _answers(rest: tuple[str, ...]) -> Iterator[str]:
    for line in rest:
        if line.startswith("(qemu)"):
            return
        yield line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_guide(found: list[Command], folder: Path) -> None:
    """Run ``found`` in ``folder``; the guide's port is replaced by a free one, so that a server
    already on it (another test run on this machine) cannot make the guide fail."""
    port = str(free_port())
    found = [attrs.evolve(c, line=c.line.replace(f":{GUIDE_PORT}", f":{port}")) for c in found]
    servers: list[tuple[subprocess.Popen[bytes], Output]] = []
    try:
        for command in found:
            if command.background:
                servers.append(run_in_background(command, folder))
            elif command.session:
                run_monitor_session(command, folder)
            else:
                done = subprocess.run(
                    ["bash", "-c", command.line], cwd=folder, env=environment(folder), capture_output=True, text=True
                )
                assert done.returncode == command.status, (
                    f"{command.line}\nexited {done.returncode}, the guide says {command.status}\n{done.stderr}"
                )
                if command.status:
                    assert done.stderr.startswith("vmdelta: error: ") and done.stderr.count("\n") == 1
    finally:
        for server, said in servers:
            server.terminate()
            server.wait(PATIENCE)
            said.close(server.stderr)


# --------------------------------------------------------------------------------------------


def test_the_guide_shows_every_step_of_the_workflow() -> None:
    lines = [c.line for c in commands(SAMPLE, None)]
    for step in ("vmdelta index", "vmdelta create", "vmdelta inspect", "vmdelta convert", "vmdelta send"):
        assert any(line.startswith(step) for line in lines), step
    assert any(line.startswith("vmdelta apply") for line in lines)
    assert any(c.line.startswith("qemu-system-x86_64") and c.session for c in commands(CAPTURE, None))


@pytest.mark.slow
def test_the_sample_commands_run_as_the_guide_says(tmp_path: Path) -> None:
    found = commands(SAMPLE, CAPTURE)
    assert any(c.status for c in found) and any(c.background for c in found)
    run_guide(found, tmp_path)
    assert (tmp_path / "vm.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.fixtures
def test_the_real_capture_commands_run_as_the_guide_says(realistic: Path, tmp_path: Path) -> None:
    registry = default_registry()
    needed = [("source", "qemu"), ("filter", "trim")]
    if not all(component in registry for component in needed) or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs the plugins and QEMU: tox -e integration runs it")
    (tmp_path / "capture").symlink_to(realistic)
    run_guide(commands(CAPTURE, None), tmp_path)


def test_the_exit_codes_are_those_of_errors_py() -> None:
    text = GUIDE.read_text()
    table = text[text.index("## Exit codes") : text.index("## What vmdelta guarantees")]
    documented = {name: int(status) for status, name in re.findall(r"^\| (\d+) \| [^|]+ \| `(\w+)` \|$", table, re.M)}
    defined = {name: getattr(errors, name).exit_code for name in errors.__all__}
    assert documented == defined
