#!/usr/bin/env bash
# Builds libFuzzer targets with swiftc directly (SwiftPM executables do not link
# libFuzzer on this toolchain). Never touches /.build (SwiftPM's directory).
#
#   Fuzz/build.sh TARGET...     build Fuzz/.build/TARGET from Fuzz/targets/TARGET.swift
#   Fuzz/build.sh --all         build every target
#   Fuzz/build.sh --list        print the target names
#   Fuzz/build.sh --corpus      build Fuzz/tools/gen-corpus.swift (uninstrumented) and
#                               regenerate the seed corpora in Fuzz/Corpus/
#
# How: LogPoolFormat (Sources/LogPoolFormat/*.swift, importing the system modules CLZ4
# and CXXHash) is compiled once as a separate module (whole-module, one object file) in
# Fuzz/.build/modules-fuzz/, instrumented with -sanitize=fuzzer,address. Each target file
# plus Fuzz/support/*.swift is then compiled as its own module and linked against it,
# with libFuzzer providing main. A target opts into more with header comments:
#
#   // fuzz-modules: LogPool            also build and link the engine (Sources/LogPool,
#                                       which imports LogPoolFormat and Foundation)
#   // fuzz-sources: path/a.swift ...   extra files (relative to the repository) compiled
#                                       into the target's own module, e.g.
#                                       Sources/LogPoolTesting/SimulatedDevice.swift
#   // fuzz-max-len: N                  read by run.sh
#
# Environment: SWIFTC (default swiftc), FUZZ_OPT (default -O; -Onone compiles faster).
# Builds are incremental (sources newer than the product, or changed flags) and
# serialized with a lock, so at most one swiftc runs at a time from these scripts.
set -euo pipefail

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$FUZZ_DIR")
OUT="$FUZZ_DIR/.build"
SWIFTC=${SWIFTC:-swiftc}
OPT=${FUZZ_OPT:--O}
CMODULES=(-I "$ROOT/Sources/CLZ4" -I "$ROOT/Sources/CXXHash")
CLIBS=(-llz4 -lxxhash)

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

log() { printf 'build.sh: %s\n' "$*" >&2; }

list_targets() {
    local f
    for f in "$FUZZ_DIR"/targets/*.swift; do basename "$f" .swift; done
}

# up_to_date PRODUCT STAMP_TEXT INPUT...: the product exists, was built with the same
# flags, and no input is newer.
up_to_date() {
    local product=$1 stamp=$2; shift 2
    [[ -e $product && -e $product.flags ]] || return 1
    [[ $(cat "$product.flags") == "$stamp" ]] || return 1
    local input
    for input in "$@"; do [[ $input -nt $product ]] && return 1; done
    return 0
}

# build_module FLAVOR NAME SOURCE_DIR: compiles SOURCE_DIR/*.swift into
# $OUT/modules-FLAVOR/NAME.{swiftmodule,o}. Modules it imports must already be there.
build_module() {
    local flavor=$1 name=$2 srcdir=$3
    local dir="$OUT/modules-$flavor"
    mkdir -p "$dir"
    local flags
    if [[ $flavor == fuzz ]]; then flags=(-sanitize=fuzzer,address "$OPT"); else flags=(-Onone); fi
    local sources=("$srcdir"/*.swift)
    local deps=()
    [[ $name == LogPool ]] && deps=("$dir/LogPoolFormat.o")
    local stamp="${SWIFTC} ${flags[*]}"
    if up_to_date "$dir/$name.o" "$stamp" "${sources[@]}" "${deps[@]}" "$FUZZ_DIR/build.sh"; then return 0; fi
    log "compiling module $name ($flavor: ${flags[*]}, ${#sources[@]} files)"
    rm -f "$dir/$name.o" "$dir/$name.o.flags"
    "$SWIFTC" "${flags[@]}" -parse-as-library -wmo -module-name "$name" -package-name logpool \
        -emit-module -emit-module-path "$dir/$name.swiftmodule" \
        -c -o "$dir/$name.o" -I "$dir" "${CMODULES[@]}" "${sources[@]}"
    printf '%s' "$stamp" >"$dir/$name.o.flags"
}

# directive FILE KEY: the words after "// fuzz-KEY:" in FILE's header comments.
directive() {
    sed -n "s|^// fuzz-$2:[[:space:]]*||p" "$1" | head -n 1
}

build_target() {
    local name=$1
    local src="$FUZZ_DIR/targets/$name.swift"
    [[ -f $src ]] || { log "no such target: $name (have: $(list_targets | tr '\n' ' '))"; exit 2; }
    local dir="$OUT/modules-fuzz"
    local modules extra
    modules=$(directive "$src" modules)
    extra=$(directive "$src" sources)

    build_module fuzz LogPoolFormat "$ROOT/Sources/LogPoolFormat"
    local objects=("$dir/LogPoolFormat.o")
    local m
    for m in $modules; do
        case $m in
            LogPool) build_module fuzz LogPool "$ROOT/Sources/LogPool"; objects+=("$dir/LogPool.o") ;;
            *) log "$name: unknown module '$m' in fuzz-modules"; exit 2 ;;
        esac
    done
    local sources=("$src" "$FUZZ_DIR"/support/*.swift)
    local f
    for f in $extra; do sources+=("$ROOT/$f"); done

    local flags=(-sanitize=fuzzer,address "$OPT")
    local stamp="${SWIFTC} ${flags[*]} ${sources[*]}"
    local product="$OUT/$name"
    if up_to_date "$product" "$stamp" "${sources[@]}" "${objects[@]}" "$FUZZ_DIR/build.sh"; then
        return 0
    fi
    log "linking $name"
    rm -f "$product" "$product.flags"
    # The target's own module name must be an identifier and must not clash with an
    # imported module.
    "$SWIFTC" "${flags[@]}" -parse-as-library -module-name "FuzzTarget_${name//-/_}" \
        -I "$dir" "${CMODULES[@]}" "${sources[@]}" "${objects[@]}" "${CLIBS[@]}" -use-ld=lld -o "$product"
    printf '%s' "$stamp" >"$product.flags"
    log "built $product"
}

build_corpus() {
    build_module plain LogPoolFormat "$ROOT/Sources/LogPoolFormat"
    local dir="$OUT/modules-plain"
    local sources=("$FUZZ_DIR/tools/gen-corpus.swift" "$FUZZ_DIR"/support/*.swift)
    local product="$OUT/gen-corpus"
    local stamp="${SWIFTC} -Onone"
    if ! up_to_date "$product" "$stamp" "${sources[@]}" "$dir/LogPoolFormat.o" "$FUZZ_DIR/build.sh"; then
        log "linking gen-corpus"
        rm -f "$product" "$product.flags"
        "$SWIFTC" -Onone -parse-as-library -module-name GenCorpus -I "$dir" "${CMODULES[@]}" \
            "${sources[@]}" "$dir/LogPoolFormat.o" "${CLIBS[@]}" -use-ld=lld -o "$product"
        printf '%s' "$stamp" >"$product.flags"
    fi
    "$product" "$FUZZ_DIR/Corpus"
}

[[ $# -gt 0 ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
case $1 in
    --list) list_targets ;;
    --all) for t in $(list_targets); do build_target "$t"; done ;;
    --corpus) build_corpus ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) for t in "$@"; do build_target "$t"; done ;;
esac
