#!/usr/bin/env bash
# Runs every fuzz target (Fuzz/targets/*.swift) for SECONDS each (default 30), one after
# the other, and fails if any target fails to build or finds a crash, hang, leak or OOM.
#
#   Fuzz/ci.sh [SECONDS]
#
# Builds everything first (one compile at a time), then runs each target with
# Fuzz/run.sh and prints a table of exec/s and coverage. Logs and artifacts of failing
# targets stay in their scratch directories (printed), never in the repository.
set -uo pipefail

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SECONDS_EACH=${1:-30}
[[ $SECONDS_EACH =~ ^[0-9]+$ ]] || { echo "ci.sh: SECONDS must be a whole number" >&2; exit 2; }

# Canonical-encoding checks on unless asked otherwise (see README, "Strict mode").
export LOGPOOL_FUZZ_STRICT=${LOGPOOL_FUZZ_STRICT:-1}

start=$(date +%s)
mapfile -t targets < <("$FUZZ_DIR/build.sh" --list)
failed=()
declare -A build_ok=()
for t in "${targets[@]}"; do
    if "$FUZZ_DIR/build.sh" "$t"; then build_ok[$t]=1; else failed+=("$t (build)"); fi
done
built=$(date +%s)
echo "ci.sh: built ${#build_ok[@]}/${#targets[@]} targets in $((built - start))s"

results=()
for t in "${targets[@]}"; do
    [[ -n ${build_ok[$t]:-} ]] || continue
    out=$("$FUZZ_DIR/run.sh" "$t" "$SECONDS_EACH" 2>&1)
    rc=$?
    echo "$out" | grep -v '^RESULT '
    results+=("$(grep '^RESULT ' <<<"$out" | tail -n 1)")
    [[ $rc -eq 0 ]] || failed+=("$t")
done

echo
printf '%-16s %-7s %10s %10s %6s %6s %9s\n' TARGET STATUS EXECS EXEC/S COV FT RSS_MB
for r in "${results[@]}"; do
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$r"; }
    printf '%-16s %-7s %10s %10s %6s %6s %9s\n' \
        "$(get target)" "$(get status)" "$(get execs)" "$(get exec_per_s)" "$(get cov)" "$(get ft)" "$(get peak_rss_mb)"
done
echo "ci.sh: total $(( $(date +%s) - start ))s (builds $((built - start))s, ${SECONDS_EACH}s per target)"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "ci.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "ci.sh: all ${#targets[@]} targets OK"
