#!/usr/bin/env bash
# Build llama.cpp's llama-server out of the llama-cpp-python sdist on the package index (it vendors llama.cpp
# under vendor/llama.cpp), for `pdserve bench compare`. Everything lands under DEST_ROOT/<version>/:
#   src/       the vendored llama.cpp tree (its convert_hf_to_gguf.py and gguf-py are used to make the GGUF)
#   bin/       llama-server, linked statically
#
# usage: bash scripts/build_llama_server.sh DEST_ROOT [PIP]
# Idempotent: exits at once when DEST_ROOT/<version>/bin/llama-server already runs. The build takes about
# 12 minutes on 2 cores; it runs at nice 19 with JOBS (default 2) compiler processes.
# LLAMA_CPP_PYTHON_VERSION pins the sdist's version (default: whatever the index has newest, looked up once).
set -euo pipefail

if [[ $# -lt 1 || -z "$1" ]]; then
    echo "usage: $0 DEST_ROOT [PIP]" >&2
    exit 2
fi
dest_root="$(mkdir -p "$1" && cd "$1" && pwd)"
pip="${2:-pip}"
jobs="${JOBS:-2}"

sdist_dir="$dest_root/sdist"
mkdir -p "$sdist_dir"
sdist="$(find "$sdist_dir" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | sort -V | tail -n 1)"
if [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]]; then
    sdist="$sdist_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fi
if [[ -z "$sdist" || ! -f "$sdist" ]]; then
    spec="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    "$pip" download -q --no-binary :all: --no-deps "$spec" -d "$sdist_dir"
    sdist="$(find "$sdist_dir" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | sort -V | tail -n 1)"
fi
version="$(basename "$sdist" .tar.gz)"
version="${version#llama_cpp_python-}"
out="$dest_root/$version"
server="$out/bin/llama-server"

if [[ -x "$server" ]] && "$server" --version >/dev/null 2>&1; then
    echo "$server"
    exit 0
fi

if [[ ! -f "$out/src/CMakeLists.txt" ]]; then
    work="$(mktemp -d "$dest_root/unpack.XXXXXX")"
    tar -xzf "$sdist" -C "$work"
    rm -rf "$out/src"
    mkdir -p "$out"
    mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$out/src"
    rm -rf "$work"
fi

nice -n 19 cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$out/cmake.log" 2>&1 \
    || { tail -n 30 "$out/cmake.log" >&2; exit 1; }
nice -n 19 cmake --build "$out/build" --config Release --target llama-server -j "$jobs" >"$out/build.log" 2>&1 \
    || { tail -n 30 "$out/build.log" >&2; exit 1; }

mkdir -p "$out/bin"
install -m 0755 "$out/build/bin/llama-server" "$server.tmp"
mv -f "$server.tmp" "$server"
echo "$server"
