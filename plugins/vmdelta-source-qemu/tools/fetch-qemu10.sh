#!/usr/bin/env bash
# Unpack QEMU 10 from Debian <codename>-backports into a private folder (nothing is installed),
# the way ../shared/tools/make-qemu-fixtures.sh does it, so that the mapped-ram and QEMU 10 load
# tests can run on Debian 12, whose own QEMU is 7.2.
#
# Usage: fetch-qemu10.sh [DEST]   (default $VMDELTA_QEMU10 or /tmp/vmdelta-qemu10)
# Afterwards DEST/usr/bin/qemu-system-x86_64 exists; the tests find it through $VMDELTA_QEMU10
# (or the default folder). Needs apt-get, dpkg and debian-archive-keyring; not root.
set -euo pipefail
DEST=${1:-${VMDELTA_QEMU10:-/tmp/vmdelta-qemu10}}
if [ -x "$DEST/usr/bin/qemu-system-x86_64" ]; then echo "$DEST"; exit 0; fi
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
# the mirror the system's apt already uses (deb822 sources first, then the one-line format)
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
                     grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                       | sed 's/\[[^]]*\]//' | awk '{print $2}'; } \
                   | grep -v -e security -e '^$' | grep '/debian/\?$' | head -1 || true)
fi
MIRROR=$DEBIAN_MIRROR
[ -n "$MIRROR" ] || { echo "no Debian mirror in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || { echo "$KEYRING missing (package debian-archive-keyring)" >&2; exit 1; }
APT="$DEST.apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d" "$APT/debs"
echo "deb [signed-by=$KEYRING] $MIRROR $CODENAME-backports main" >"$APT/sources.list"
APTO=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Get::List-Cleanup=0")
apt-get -q "${APTO[@]}" update >"$APT/update.log" 2>&1 || { cat "$APT/update.log" >&2; exit 1; }
rm -f "$APT"/debs/*.deb
( cd "$APT/debs" && apt-get -q "${APTO[@]}" download \
    qemu-system-x86/"$CODENAME"-backports qemu-system-common/"$CODENAME"-backports \
    qemu-system-data/"$CODENAME"-backports seabios/"$CODENAME"-backports >"$APT/download.log" 2>&1 ) \
  || { cat "$APT/download.log" >&2; exit 1; }
rm -rf "$DEST.part"
for d in "$APT"/debs/*.deb; do dpkg -x "$d" "$DEST.part"; done
if LC_ALL=C ldd "$DEST.part/usr/bin/qemu-system-x86_64" | grep "not found" >&2; then
  echo "backports QEMU misses shared libraries: install them from $CODENAME" >&2; exit 1
fi
rm -rf "$DEST"; mv "$DEST.part" "$DEST"
echo "$DEST"
