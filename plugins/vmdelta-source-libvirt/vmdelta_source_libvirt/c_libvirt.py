"""The libvirt save image header, as libvirt 9.0.0 writes it (``src/qemu/qemu_saveimage.h``).

::

    char     magic[16];      "LibvirtQemudSave" ("LibvirtQemudPart" while being written)
    uint32_t version;        2 (1 before the cookie existed)
    uint32_t data_len;       bytes of domain XML + cookie + zero padding that follow the header
    uint32_t was_running;    1: the domain was running when saved, restore resumes it
    uint32_t compressed;     the save_image_format of the QEMU stream after the data (below)
    uint32_t cookieOffset;   where the cookie starts inside the data (0: no cookie)
    uint32_t unused[14];

92 bytes in the byte order of the host that wrote it: libvirt reads it in its own order and
swaps when the version comes out larger than it knows. The data is the domain XML and the cookie
(libvirt's migration cookie XML: CPU model, slirp helper), each NUL-terminated, then zeros
(64 KiB when first written, so the XML can be edited in place with ``virsh save-image-define``).
The QEMU migration stream follows at ``92 + data_len``, to the end of the file, as QEMU wrote it
or piped through ``PROGRAM -c`` of the compressed format.
"""

from __future__ import annotations

from construct import Array, Bytes, Int32ub, Int32ul, Struct

__all__ = ["FORMATS", "HEADER_SIZE", "MAGIC", "MAGIC_PARTIAL", "SAVE_VERSION", "header_schema"]

MAGIC = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
SAVE_VERSION = 2
HEADER_SIZE = 92

#: the save_image_format numbers (virQEMUSaveFormat): values are on-disk, never reused. 0-4 are
#: libvirt 9.0.0's; zstd (5) came later; 3 was lzma before xz and never released
FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}


def header_schema(little: bool) -> Struct:
    """The header in one byte order."""
    u32 = Int32ul if little else Int32ub
    return Struct(
        "magic" / Bytes(16),
        "version" / u32,
        "data_len" / u32,
        "was_running" / u32,
        "format" / u32,
        "cookie_offset" / u32,
        "unused" / Array(14, u32),
    )
