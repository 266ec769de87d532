#!/usr/bin/env bash
# Build and run packfmt's fuzzers for a bounded time each.
#
#   fuzz/run.sh [SECONDS] [which]      SECONDS per fuzzer (default 60); which: all | shard | open
#
# fuzz_shard  libFuzzer + ASan + UBSan over the C shard reader (fuzz/fuzz_shard.c)
# fuzz_open   atheris over packfmt.open + random reads of a mutated dataset (fuzz/fuzz_open.py)
#
# Work files go to build/fuzz/ (corpus kept between runs, so coverage accumulates).  A crash, hang,
# leak or contract violation leaves its input in build/fuzz/artifacts/ and makes this script fail;
# turn it into a regression file with tools in fuzz/README (copy it to tests/data/regress/).
# fuzz_open runs in "survey" mode: every Python exception that is not a packfmt.PackError is logged
# once per (type, file, function) to build/fuzz/open-findings/findings.txt; signatures listed in
# fuzz/known_findings.txt (reported, not yet fixed) do not fail the run, new ones do.  Native crashes
# of the Python process always fail it.
set -uo pipefail
SECONDS_EACH=${1:-60}
WHICH=${2:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/build/fuzz
mkdir -p "$OUT/artifacts" "$OUT/corpus/shard" "$OUT/corpus/open"
cd "$ROOT"
status=0

CLANG=${CLANG:-$(command -v clang-14 || command -v clang || true)}
python fuzz/make_corpus.py "$OUT/seeds" >/dev/null || { echo "fuzz: cannot build the seed corpus (is packfmt built?)"; exit 2; }

if [[ $WHICH == all || $WHICH == shard ]]; then
    if [[ -z $CLANG ]]; then
        echo "fuzz: clang not found (apt-get install clang-14 libclang-rt-14-dev)"; exit 2
    fi
    "$CLANG" -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -Isrc_c \
        fuzz/fuzz_shard.c src_c/format.c src_c/checksum.c src_c/reader.c -lpthread -o "$OUT/fuzz_shard" || exit 2
    echo "== fuzz_shard: ${SECONDS_EACH}s"
    UBSAN_OPTIONS="suppressions=$ROOT/fuzz/ubsan.supp:halt_on_error=1:print_stacktrace=1" \
    ASAN_OPTIONS="detect_leaks=1:abort_on_error=0" \
        "$OUT/fuzz_shard" -max_total_time="$SECONDS_EACH" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$OUT/artifacts/shard-" \
        "$OUT/corpus/shard" "$OUT/seeds/shard" >"$OUT/fuzz_shard.log" 2>&1
    rc=$?
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$OUT/fuzz_shard.log"
    grep -E "^#[0-9]+ +DONE" "$OUT/fuzz_shard.log" | tail -1
    if [[ $rc -ne 0 ]]; then
        echo "fuzz_shard: FINDING (exit $rc); see $OUT/fuzz_shard.log and $OUT/artifacts/"
        grep -E "ERROR|SUMMARY|runtime error|contract violated" "$OUT/fuzz_shard.log" | head -5
        status=1
    fi
fi

if [[ $WHICH == all || $WHICH == open ]]; then
    if ! python -c "import atheris" 2>/dev/null; then
        echo "fuzz: atheris not installed (pip install atheris)"; exit 2
    fi
    echo "== fuzz_open: ${SECONDS_EACH}s"
    rm -rf "$OUT/open-findings"
    PK_FUZZ_SURVEY="$OUT/open-findings" python fuzz/fuzz_open.py -max_total_time="$SECONDS_EACH" -timeout=60 \
        -rss_limit_mb=6000 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/open-" \
        "$OUT/corpus/open" "$OUT/seeds/open" >"$OUT/fuzz_open.log" 2>&1
    rc=$?
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$OUT/fuzz_open.log"
    if [[ $rc -ne 0 ]]; then
        echo "fuzz_open: FINDING (exit $rc); see $OUT/fuzz_open.log and $OUT/artifacts/"
        grep -E "ERROR|SUMMARY|Error" "$OUT/fuzz_open.log" | head -5
        status=1
    fi
    if [[ -f $OUT/open-findings/findings.txt ]]; then
        new=0
        while read -r sig; do
            if grep -qxF -- "$sig" <(grep -v '^#' fuzz/known_findings.txt); then
                echo "fuzz_open: known finding: $sig"
            else
                echo "fuzz_open: NEW FINDING: $sig"; new=1
            fi
        done < <(sed -n 's/^== \(.*\) finding-.*$/\1/p' "$OUT/open-findings/findings.txt")
        [[ $new -eq 0 ]] || { echo "inputs and tracebacks: $OUT/open-findings/"; status=1; }
    fi
fi
exit $status
