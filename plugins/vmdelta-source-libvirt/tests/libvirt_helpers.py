"""Save images built for the tests the way libvirt 9.0.0 builds them (``src/qemu/qemu_saveimage.c``:
``virQEMUSaveDataWrite`` writes the header, the XML, the cookie and 64 KiB of zeros; the QEMU
stream follows, piped through ``PROGRAM -c`` when compressed), written here with ``struct`` from
that layout and not by the plugin's code; and a real QEMU stream of a small VM that never ran."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

FORMATS = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5}
COMPRESS = {
    "gzip": ["gzip", "-c"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-3"],
    "lzop": ["lzop", "-c"],
    "zstd": ["zstd", "-c"],
}

DOMAIN_XML = """<domain type='qemu'>
  <name>vmdelta-small</name>
  <uuid>7d9a3c52-5a5e-4f3e-9d59-0c1f5f5b2a11</uuid>
  <memory unit='KiB'>16384</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
</domain>
"""
COOKIE = "<cookie>\n  <cpu mode='custom' match='exact' check='full'/>\n</cookie>\n"


def header(
    data_len: int,
    fmt: int,
    *,
    cookie_offset: int = 0,
    was_running: int = 1,
    version: int = 2,
    magic: bytes = b"LibvirtQemudSave",
    order: str = "<",
) -> bytes:
    """``struct _virQEMUSaveHeader``: magic, version, data_len, was_running, compressed,
    cookieOffset, unused[14], in the writing host's byte order."""
    return magic + struct.pack(f"{order}5I14I", version, data_len, was_running, fmt, cookie_offset, *([0] * 14))


def compress(name: str, data: bytes) -> bytes:
    """What libvirt's save pipe does: QEMU's stream into ``PROGRAM -c`` through a pipe."""
    if name == "raw":
        return data
    return subprocess.run(COMPRESS[name], input=data, capture_output=True, check=True).stdout


def save_image(
    stream: bytes, fmt: str = "raw", *, xml: str = DOMAIN_XML, cookie: str | None = COOKIE, **kw: int
) -> bytes:
    """A whole save image around ``stream``."""
    data = xml.encode() + b"\0"
    cookie_offset = 0
    if cookie is not None:
        cookie_offset = len(data)
        data += cookie.encode() + b"\0"
    data += bytes(64 * 1024)
    kw.setdefault("cookie_offset", cookie_offset)
    return header(len(data), FORMATS[fmt], **kw) + data + compress(fmt, stream)


def qmp(sock: socket.socket, command: str, **arguments: object) -> dict:
    sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
    reader = sock.makefile("r")
    while True:
        reply = json.loads(reader.readline())
        if "return" in reply or "error" in reply:
            return reply


def small_stream(out: Path) -> Path:
    """A real QEMU 7.2 migration stream of a 16 MiB ``pc`` VM stopped before its first
    instruction (ROMs and firmware in it, most RAM zero): a few hundred KB."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise FileNotFoundError("qemu-system-x86_64")
    folder = Path(tempfile.mkdtemp(prefix="vmdelta-small-"))
    sock_path = folder / "qmp.sock"
    proc = subprocess.Popen(
        [qemu, "-accel", "tcg", "-machine", "pc", "-m", "16M", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock_path},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            if sock_path.exists():
                break
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            sock.makefile("r").readline()  # greeting
            qmp(sock, "qmp_capabilities")
            qmp(sock, "migrate", uri=f"exec:cat > {out}")
            while qmp(sock, "query-migrate")["return"].get("status") not in ("completed", "failed"):
                time.sleep(0.05)
            qmp(sock, "quit")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    os.chmod(out, 0o644)
    return out
