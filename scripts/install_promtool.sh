#!/usr/bin/env bash
# Install promtool (Prometheus' rule/config/metrics checker) into DEST_DIR without
# installing or starting a Prometheus server: download the Debian package, unpack
# it into a temporary directory and copy only usr/bin/promtool.
#
# usage: bash scripts/install_promtool.sh DEST_DIR
# Idempotent: exits at once when DEST_DIR/promtool already runs.
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest="$1"
target="$dest/promtool"

if [[ -x "$target" ]] && "$target" --version >/dev/null 2>&1; then
    exit 0
fi

for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_promtool: '$tool' not found; this script needs a Debian/Ubuntu host" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# apt-get download writes into the current directory.
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    echo "install_promtool: download failed, running apt-get update and retrying" >&2
    apt-get update >/dev/null
    (cd "$work" && apt-get download prometheus)
fi

deb="$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)"
if [[ -z "$deb" ]]; then
    echo "install_promtool: no prometheus .deb was downloaded" >&2
    exit 1
fi

dpkg-deb -x "$deb" "$work/root"
if [[ ! -f "$work/root/usr/bin/promtool" ]]; then
    echo "install_promtool: $deb holds no usr/bin/promtool" >&2
    exit 1
fi

mkdir -p "$dest"
install -m 0755 "$work/root/usr/bin/promtool" "$target.tmp"
mv -f "$target.tmp" "$target"
"$target" --version | head -n 1
