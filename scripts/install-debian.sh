#!/bin/sh
# Install the Debian packages orthanc-ai needs, only when one is missing
# (a second run costs one dpkg query).
set -eu
PKGS="orthanc orthanc-python orthanc-dicomweb orthanc-postgresql postgresql dcmtk python3-venv python3-dev docker-compose chromium debootstrap util-linux"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages:$missing (run as root or: sudo apt-get install$missing)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $missing
# The Debian package starts a system Orthanc on 8042/4242 where an init
# system exists; ours runs in the foreground on its own ports and data.
if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
