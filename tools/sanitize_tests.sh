#!/usr/bin/env bash
# Run the test suite against an ASan + UBSan build of packfmt._core.
#
#   tools/sanitize_tests.sh [--in-place] [PYTEST ARGS...]
#
# Default: the checkout (tracked and untracked, not ignored, files) is copied to a temporary directory
# and the sanitized extension is built there (python setup.py build_ext --inplace), so the developer's
# own build -- which other processes may be importing -- is left alone.  --in-place (for CI's fresh
# clone) does what the issue says literally: PACKFMT_SANITIZE=1 pip install -e . --no-build-isolation,
# runs the tests, then rebuilds the normal extension.
#
# The interpreter is not instrumented, so libasan must be loaded first (LD_PRELOAD); leak detection is
# off (CPython keeps memory until exit by design); any UBSan report aborts the test process.  Test
# helpers that start their own sanitized or valgrind binaries drop LD_PRELOAD for them.  Tests that bound
# a child with RLIMIT_AS skip themselves (ASan's shadow memory needs terabytes of address space).
# SANITIZE_TIMEOUT (default 2400 s) bounds the pytest run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IN_PLACE=0
if [[ ${1:-} == --in-place ]]; then IN_PLACE=1; shift; fi
LIBASAN=$(gcc -print-file-name=libasan.so)
[[ -e $LIBASAN ]] || { echo "sanitize_tests: libasan not found (apt-get install gcc)"; exit 2; }

if [[ $IN_PLACE == 1 ]]; then
    WORK=$ROOT
    cd "$WORK"
    trap 'echo "sanitize_tests: rebuilding the normal extension"; (cd "$ROOT" && python -m pip install -q -e . --no-build-isolation)' EXIT
    PACKFMT_SANITIZE=1 python -m pip install -q -e . --no-build-isolation
else
    WORK=$(mktemp -d /tmp/packfmt-sanitize.XXXXXX)/packfmt
    mkdir -p "$WORK"
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | (cd "$WORK" && tar -xf -)
    cd "$WORK"
    PACKFMT_SANITIZE=1 python setup.py -q build_ext --inplace >build-sanitize.log 2>&1 \
        || { tail -30 build-sanitize.log; exit 2; }
    echo "sanitize_tests: sanitized build in $WORK"
fi
nm -D packfmt/_core*.so | grep __asan_init >/dev/null \
    || { echo "sanitize_tests: packfmt/_core is not an ASan build"; exit 2; }

export PYTHONPATH=$WORK${PYTHONPATH:+:$PYTHONPATH}
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
LD_PRELOAD=$LIBASAN python -c "import packfmt, packfmt._core as c; assert c.__file__.startswith('$WORK'), c.__file__" \
    || { echo "sanitize_tests: the sanitized packfmt does not import"; exit 2; }
# A hard time limit: a tool that hangs under the preloaded ASan runtime (procps' `uptime` does) must fail
# the run, not stall CI.
LD_PRELOAD=$LIBASAN timeout "${SANITIZE_TIMEOUT:-2400}" python -m pytest -p no:cacheprovider "$@"
