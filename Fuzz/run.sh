#!/usr/bin/env bash
# Runs one fuzz target for a while.
#
#   Fuzz/run.sh TARGET SECONDS [libFuzzer flags...]
#
# Builds the target if needed (Fuzz/build.sh), copies the committed seed corpus
# Fuzz/Corpus/TARGET/ into a scratch working corpus (so the committed one does not grow),
# and runs libFuzzer with -max_total_time=SECONDS, the target's -max_len (its
# "// fuzz-max-len:" line), -timeout=10 -rss_limit_mb=2048. Crash, timeout and OOM
# artifacts go to the scratch directory, never into the repository.
#
# Prints libFuzzer's final line (cov:, ft:, exec/s) and one "RESULT ..." summary line.
# Exits non-zero when libFuzzer found a crash, hang, leak or OOM (the scratch directory is
# then kept, and the log's error report and each artifact in hex are printed) or when the
# target does not build.
#
# Environment: FUZZ_SCRATCH (scratch parent, default $TMPDIR or /tmp), FUZZ_KEEP=1 (keep
# the scratch directory after a clean run), LOGPOOL_FUZZ_STRICT=1 (see README).
set -euo pipefail

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -lt 2 ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
TARGET=$1
SECONDS_TO_RUN=$2
shift 2
[[ $SECONDS_TO_RUN =~ ^[0-9]+$ ]] || { echo "run.sh: SECONDS must be a whole number" >&2; exit 2; }

SRC="$FUZZ_DIR/targets/$TARGET.swift"
if ! "$FUZZ_DIR/build.sh" "$TARGET"; then
    echo "RESULT target=$TARGET status=BUILD-FAILED"
    exit 1
fi
BIN="$FUZZ_DIR/.build/$TARGET"
MAX_LEN=$(sed -n 's|^// fuzz-max-len:[[:space:]]*||p' "$SRC" | head -n 1)
MAX_LEN=${MAX_LEN:-4096}

SCRATCH_PARENT=${FUZZ_SCRATCH:-${TMPDIR:-/tmp}}
mkdir -p "$SCRATCH_PARENT"
WORK=$(mktemp -d "$SCRATCH_PARENT/logpool-fuzz-$TARGET.XXXXXX")
mkdir -p "$WORK/corpus" "$WORK/artifacts"
if [[ -d $FUZZ_DIR/Corpus/$TARGET ]]; then
    cp "$FUZZ_DIR/Corpus/$TARGET"/. "$WORK/corpus/" -R
fi
LOG="$WORK/fuzz.log"

# libFuzzer + ASan print the stack of a crash. The Swift runtime's own backtracer would
# run first on a fatalError and can leave the run waiting on it, so it is off.
export SWIFT_BACKTRACE=enable=no
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:symbolize=1:detect_leaks=1}

echo "run.sh: $TARGET for ${SECONDS_TO_RUN}s, -max_len=$MAX_LEN, scratch $WORK"
start=$(date +%s)
set +e
(cd "$WORK" && "$BIN" -max_total_time="$SECONDS_TO_RUN" -max_len="$MAX_LEN" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$WORK/artifacts/" -print_final_stats=1 "$@" "$WORK/corpus") >"$LOG" 2>&1
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))

final=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|INITED|NEW|REDUCE)' "$LOG" | tail -n 1 || true)
field() { sed -n "s/.*[[:space:]]$1:[[:space:]]*\([^[:space:]]*\).*/\1/p" <<<"$final"; }
final_stat() { sed -n "s/^stat::$1:[[:space:]]*//p" "$LOG" | tail -n 1; }
execs=$(final_stat number_of_executed_units); eps=$(final_stat average_exec_per_sec); rss=$(final_stat peak_rss_mb)
artifacts=("$WORK"/artifacts/*)
[[ -e ${artifacts[0]} ]] || artifacts=()

[[ -n $final ]] && echo "$final"
status=OK
if [[ $rc -ne 0 || ${#artifacts[@]} -gt 0 ]]; then
    status=FAILED
    echo "run.sh: $TARGET FAILED (libFuzzer exit $rc); log: $LOG"
    echo "----- error report -----"
    # From the first error line to the end, without the progress lines.
    awk '/ERROR: |Fatal error|deadly signal|==[0-9]+==|SUMMARY:|out-of-memory|timeout after/ {p=1} p' "$LOG" \
        | grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' | head -n 120
    for a in "${artifacts[@]}"; do
        echo "----- artifact $a ($(wc -c <"$a") bytes), hex -----"
        od -An -tx1 -v "$a" | head -n 64
    done
    echo "reproduce: SWIFT_BACKTRACE=enable=no $BIN ${artifacts[0]:-<artifact>}"
elif [[ ${FUZZ_KEEP:-0} != 1 ]]; then
    rm -rf "$WORK"
fi
echo "RESULT target=$TARGET status=$status seconds=$elapsed execs=${execs:-?} exec_per_s=${eps:-$(field exec/s)} cov=$(field cov) ft=$(field ft) corpus=$(field corp) peak_rss_mb=${rss:-?}"
[[ $status == OK ]]
