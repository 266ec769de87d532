#!/usr/bin/env bash
# CI entry point for the fuzzers (called by .ci/run): make sure the tools are there, then run each
# fuzzer for a bounded time (FUZZ_SECONDS, default 60).  Fails on any new finding.
#
# Needs: apt packages clang-14 libclang-rt-14-dev (libFuzzer + sanitizer runtimes), pip package atheris.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${FUZZ_SECONDS:-60}

if ! command -v clang-14 >/dev/null && ! command -v clang >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null
    else
        echo "fuzz/ci.sh: clang-14 and libclang-rt-14-dev are required"; exit 2
    fi
fi
if ! python -c "import atheris" 2>/dev/null; then
    python -m pip install -q "atheris>=2.3"
fi
exec bash "$ROOT/fuzz/run.sh" "$SECS" all
