#!/usr/bin/env bash
# Install promtool (Prometheus' rule/config/metrics checker) and the prometheus server binary into
# DEST_DIR without installing or starting anything system-wide: download the Debian package, unpack it
# into a temporary directory and copy only usr/bin/promtool and usr/bin/prometheus. The chaos suite
# (tests/chaos/) starts that server itself, to see the alert rules fire.
#
# usage: bash scripts/install_promtool.sh DEST_DIR
# Idempotent: exits at once when DEST_DIR/promtool and DEST_DIR/prometheus already run.
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest="$1"
tools=(promtool prometheus)

installed=1
for tool in "${tools[@]}"; do
    if ! { [[ -x "$dest/$tool" ]] && "$dest/$tool" --version >/dev/null 2>&1; }; then
        installed=0
    fi
done
if [[ $installed -eq 1 ]]; then
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
mkdir -p "$dest"
for tool in "${tools[@]}"; do
    if [[ ! -f "$work/root/usr/bin/$tool" ]]; then
        echo "install_promtool: $deb holds no usr/bin/$tool" >&2
        exit 1
    fi
    install -m 0755 "$work/root/usr/bin/$tool" "$dest/$tool.tmp"
    mv -f "$dest/$tool.tmp" "$dest/$tool"
    "$dest/$tool" --version 2>&1 | head -n 1
done
