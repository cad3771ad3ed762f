#!/usr/bin/env bash
# On the GPU machine: NVIDIA's cuda-samples as a conformance suite for libvgpu. Builds every
# sample of the carried subset twice, with the static CUDA runtime (CMake's default) and with
# the shared one, runs each build natively (the real libcuda) and then through libvgpu and a
# host-proxy with the cuda backend, and compares the two outputs.
#
# Carried: .device-carry-samples/cuda-samples (device/stage-samples.sh, here) and .device-carry
# (cargo xtask device-build); name both in the device tool's carry, e.g. command
# "bash device/cuda-samples.sh", carry [".device-carry", ".device-carry-samples"], timeout_s 600.
# Without libvgpu carried it runs the samples natively only. It keeps to SAMPLES_DEADLINE (480 s)
# by starting no build or run after it, so it ends inside the tool's 600 s.
#
# Build: with CMake (3.20 or newer, and ninja or make) each sample is configured on its own, as
# upstream's per-sample CMakeLists.txt allow (the subset has no Samples/CMakeLists.txt for the
# top-level project), Release, CMAKE_CUDA_RUNTIME_LIBRARY=Static or Shared. Without CMake, or
# when a first configure fails, each sample is built with nvcc from what its CMakeLists.txt says
# (sources, CUDA:: libraries, separable compilation, architectures, the fatbin a driver-API
# sample loads, the file it copies next to itself): sample_recipe below reads those. Samples
# that link CUDA::cudart or no CUDA runtime at all (the driver-API ones) come out the same in
# both builds. Builds run in /tmp, nproc at a time, each under SAMPLES_BUILD_TIMEOUT.
#
# Runs: each in its build folder (where its fatbin or kernel source lies; ../../../Common is
# there too), stdin from /dev/null, under timeout SAMPLES_RUN_TIMEOUT, stdout and stderr to
# files (kept up to 16 MiB each), line-buffered (stdbuf) so a run that hangs or crashes still
# shows how far it got. No sample of the subset waits for a key or needs arguments (none calls
# getchar or waitForKey); simpleIPC starts itself again as its child processes; simpleAssert's
# kernel fails on purpose and the sample checks it did. The remoted runs use lib.sh's stage_remoting,
# start_daemon and require_libvgpu as libvgpu-gpu.sh does, with the toolkit's library folder
# last on LD_LIBRARY_PATH (as for the native runs) for libcudart.so, libcublas.so, libnvrtc.so;
# a host-proxy that dies fails the sample that was running and is started again.
#
# Compared: stdout, then stderr, each through normalise() (the one place), which replaces
#   - the numbers on lines that report time or throughput ("ms", "msec", "Time=", "GB/s",
#     "GFlop/s", "Performance=", "time spent", "Processing time", "Elapsed time", and the bare
#     timing table of simpleStreams): they change from run to run;
#   - asyncAPI's count of CPU iterations while it waited for the GPU, and clock's average
#     clocks per block, both measured;
#   - simpleIPC's shared-memory name, which holds the parent's pid;
#   - hex numbers of 8 digits or more (addresses).
# libvgpu's own log lines ("libvgpu: ...", VGPU_LOG=warn) are left out of the comparison and
# noted. Nothing else is: names, versions, properties and results come from the same GPU and
# must match. Outputs that hold the same lines in another order (device printf from several
# blocks, simpleIPC's processes) pass, with a note.
#
# Verdicts, per sample and build: PASS; DIFF (both exit 0, outputs differ); FAIL-LIBVGPU (native
# exit 0, libvgpu not, or host-proxy died); FAIL-NATIVE (libvgpu is still run, for the table);
# BUILD-FAIL; SKIP (not run: time budget, or libcuda.so.1 not resolving to libvgpu); NATIVE-OK
# (native passed, libvgpu not carried). Exit status 0 only when every one is PASS or NATIVE-OK.
# Results: one line per sample and build, totals, short diffs; logs in $work/logs. With $OUT
# set (the tool brings back at most 8 files): conformance.md (the table), summary.txt,
# samples-logs/failures.txt (the logs of every result but PASS, one after another) and
# samples-logs/all-logs.tgz (every log).
#
# Knobs: SAMPLES_ONLY=name1,name2  SAMPLES_SHARED=0 (static build only)  SAMPLES_BUILD=cmake|nvcc
# SAMPLES_ARCHS="90" (instead of the CMakeLists' list)  SAMPLES_DRY_RUN=1 (print the build
# commands, build and run nothing)  SAMPLES_BUILD_TIMEOUT=120  SAMPLES_RUN_TIMEOUT=60
# SAMPLES_DEADLINE=480  SAMPLES_JOBS=$(nproc)  SAMPLES_DIR  SAMPLES_WORK  CARRY  SAMPLES_VGPU_LOG.
set -uo pipefail

# ---- the normaliser: what may differ between a native and a libvgpu run (see the top) ----
normalise() {
    sed -E \
        -e '/(Time=|msec|[0-9] ?ms\b|\(ms\)|GB\/s|GFlop\/s|Performance=|time spent|Processing time|Elapsed time)/ s/[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/N/g' \
        -e 's/^(memcopy|kernel|non-streamed|[0-9]+ streams):([[:space:]]+)[0-9.]+$/\1:\2N/' \
        -e 's/^(CPU executed )[0-9]+( iterations)/\1N\2/' \
        -e 's/^(Average clocks\/block = ).*/\1N/' \
        -e 's/(lshmName = [A-Za-z_]*)[0-9]+/\1PID/' \
        -e 's/0x[0-9a-fA-F]{8,}/0xADDR/g'
}

# comparable <log dir> <native|libvgpu>: the run's output as compared, in <mode>.cmp.
comparable() {
    {
        normalise <"$1/$2.out"
        echo "---- stderr ----"
        grep -av '^libvgpu: ' "$1/$2.err" | normalise
    } >"$1/$2.cmp"
}

# ---- reading a sample's CMakeLists.txt (for the nvcc fallback) ----
# sample_recipe <CMakeLists.txt>: one fact a line: "exe NAME", "src FILE...", "lib CUDA::X...",
# "archs N...", "rdc" (CUDA_SEPARABLE_COMPILATION), "ndebug_off" (the sample strips -DNDEBUG
# from its CUDA flags), "fatbin OUT KERNEL" (a custom command builds OUT from KERNEL),
# "copy FILE" (copied next to the executable), "warn TEXT" (something the fallback ignores).
sample_recipe() {
    awk '
    { sub(/#.*/, ""); text = text " " $0 }
    function words(s) { gsub(/[ \t]+/, " ", s); sub(/^ /, "", s); sub(/ $/, "", s); return s }
    function srcrel(s) { sub(/^"/, "", s); sub(/"$/, "", s); sub(/^\$\{CMAKE_CURRENT_(SOURCE|BINARY)_DIR\}\//, "", s); return s }
    END {
        if (match(text, /add_executable\([^)]*\)/)) {
            s = words(substr(text, RSTART + 15, RLENGTH - 16)); n = index(s, " ")
            print "exe " substr(s, 1, n - 1); print "src " substr(s, n + 1)
        }
        t = text; libs = ""
        while (match(t, /target_link_libraries\([^)]*\)/)) {
            s = substr(t, RSTART, RLENGTH); t = substr(t, RSTART + RLENGTH)
            while (match(s, /CUDA::[A-Za-z0-9_]+/)) { libs = libs " " substr(s, RSTART, RLENGTH); s = substr(s, RSTART + RLENGTH) }
        }
        if (libs != "") print "lib" libs
        if (match(text, /set\(CMAKE_CUDA_ARCHITECTURES[^)]*\)/)) print "archs " words(substr(text, RSTART + 29, RLENGTH - 30))
        if (text ~ /CUDA_SEPARABLE_COMPILATION[ \t]+ON/) print "rdc"
        if (text ~ /string\(REPLACE[ \t]+"-DNDEBUG"/) print "ndebug_off"
        if (match(text, /set\(CUDA_FATBIN_FILE[ \t]+[^)]*\)/)) {
            out = srcrel(words(substr(text, RSTART + 20, RLENGTH - 21)))
            if (match(text, /set\(CUDA_KERNEL_SOURCE[ \t]+[^)]*\)/)) print "fatbin " out " " srcrel(words(substr(text, RSTART + 23, RLENGTH - 24)))
            else print "warn CUDA_FATBIN_FILE without CUDA_KERNEL_SOURCE"
        }
        t = text
        while (match(t, /copy_if_different[ \t]+[^ \t)]+/)) { s = substr(t, RSTART, RLENGTH); t = substr(t, RSTART + RLENGTH); sub(/^copy_if_different[ \t]+/, "", s); print "copy " srcrel(s) }
        t = text
        while (match(t, /find_package\([A-Za-z0-9_]+/)) { s = substr(t, RSTART + 13, RLENGTH - 13); t = substr(t, RSTART + RLENGTH); if (s != "CUDAToolkit") print "warn find_package(" s ") is not handled by the nvcc fallback" }
    }' "$1"
}

# ---- build commands ----
# quoted <word>...: the words as one command line, quoted where the shell needs it.
quoted() {
    local w sep=""
    for w in "$@"; do
        if [[ $w =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then
            printf '%s%s' "$sep" "$w"
        else
            printf "%s'%s'" "$sep" "${w//\'/\'\\\'\'}"
        fi
        sep=" "
    done
    echo
}

# write_build <kind> <group/name> <script>: the commands that build one sample into its folder
# under $work/build-<kind>, as a small shell script (printed as it is by SAMPLES_DRY_RUN).
write_build() {
    local kind=$1 s=$2 out=$3 sdir=$work/src/Samples/$2 bdir=$work/build-$1/Samples/$2
    local exe="" srcs=() libs=() archs=() rdc=0 ndebug=1 fatbin="" kernel="" copies=() key rest
    while read -r key rest; do
        case $key in
        exe) exe=$rest ;;
        src) read -ra srcs <<<"$rest" ;;
        lib) read -ra libs <<<"$rest" ;;
        archs) read -ra archs <<<"$rest" ;;
        rdc) rdc=1 ;;
        ndebug_off) ndebug=0 ;;
        fatbin) read -r fatbin kernel <<<"$rest" ;;
        copy) copies+=("$rest") ;;
        warn) echo "  WARN $s: $rest" >&2 ;;
        esac
    done < <(sample_recipe "$sdir/CMakeLists.txt")
    if [ -z "$exe" ] || [ "${#srcs[@]}" -eq 0 ]; then
        printf 'echo "no add_executable in %q" >&2\nexit 1\n' "$sdir/CMakeLists.txt" >"$out"
        return
    fi
    echo "$exe" >"$work/logs/$kind/${s#*/}/exe"
    {
        echo "set -eux"
        printf 'mkdir -p %q\ncd %q\n' "$bdir" "$bdir"
        if [ "$build_mode" = cmake ]; then
            local rt=Static
            [ "$kind" = shared ] && rt=Shared
            quoted cmake -S "$sdir" -B "$bdir" "${cmake_gen[@]}" -DCMAKE_BUILD_TYPE=Release \
                "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCUDAToolkit_ROOT=$cuda_home" "-DCMAKE_CUDA_RUNTIME_LIBRARY=$rt"
            quoted cmake --build "$bdir" -j 2
        else
            local has_cu=0 f cudart flags=() link=() a
            for f in "${srcs[@]}"; do case $f in *.cu) has_cu=1 ;; esac; done
            [ "${#archs[@]}" -gt 0 ] || archs=(90)
            if [ -n "$fatbin" ]; then
                local gen=()
                for a in "${archs[@]}"; do gen+=("-gencode=arch=compute_$a,code=sm_$a"); done
                quoted "$nvcc" -Wno-deprecated-gpu-targets "${gen[@]}" -o "$bdir/$fatbin" -fatbin "$sdir/$kernel"
            fi
            # CMake's Release flags, the samples' CUDA flags, and the runtime CMake would link.
            flags=(-std=c++17 -O3 -Wno-deprecated-gpu-targets "-I$work/src/Common")
            [ "$ndebug" = 1 ] && flags+=(-DNDEBUG)
            if [ "$has_cu" = 1 ]; then
                flags+=(-lineinfo --extended-lambda)
                [ "$rdc" = 1 ] && flags+=(-rdc=true)
                for a in "${archs[@]}"; do flags+=("--generate-code=arch=compute_$a,code=[compute_$a,sm_$a]"); done
                cudart=$kind
            else
                cudart=none # a C++-only target: CMake links no CUDA runtime unless it names one
            fi
            for f in "${libs[@]}"; do
                case $f in
                CUDA::cuda_driver) link+=("-L$stubs" -lcuda) ;;
                CUDA::cudart) cudart=shared ;;
                CUDA::cudart_static) cudart=static ;;
                CUDA::*) link+=("-l${f#CUDA::}") ;;
                esac
            done
            link+=(-Xlinker "-rpath=$cuda_lib") # as CMake's build RPATH: the toolkit's shared libraries
            local abs=()
            for f in "${srcs[@]}"; do abs+=("$sdir/$f"); done
            quoted "$nvcc" "${flags[@]}" -o "$bdir/$exe" "${abs[@]}" -cudart "$cudart" "${link[@]}"
            for f in "${copies[@]}"; do quoted cp "$sdir/$f" "$bdir/"; done
        fi
        printf 'test -x %q\n' "$bdir/$exe"
    } >"$out"
}

# A pool of at most $njobs background jobs, each waited for by its pid.
pool=()
pool_start() {
    if [ "${#pool[@]}" -ge "$njobs" ]; then
        wait "${pool[0]}"
        pool=("${pool[@]:1}")
    fi
    "$@" &
    pool+=($!)
}
pool_drain() {
    local p
    for p in "${pool[@]}"; do wait "$p"; done
    pool=()
}

# build_job <kind> <group/name>: runs the sample's build script; status in build.rc.
build_job() {
    local d=$work/logs/$1/${2#*/} rc=0
    timeout -k 10 "$build_timeout" bash "$d/build.sh" >"$d/build.log" 2>&1 || rc=$?
    echo "$rc" >"$d/build.rc"
    printf '  %-7s %-24s %s\n' "$1" "${2#*/}" "$(exit_text "$rc" "$build_timeout")"
}

# ---- runs ----
# cap_file <file>: cuts a run's output at 16 MiB, so that the logs stay small enough to bring back.
cap_file() {
    local max=$((16 * 1024 * 1024))
    if [ -f "$1" ] && [ "$(stat -c %s "$1")" -gt "$max" ]; then
        truncate -s "$max" "$1"
        printf '\n[cut at 16 MiB by cuda-samples.sh]\n' >>"$1"
    fi
}

# run_sample <native|libvgpu> <kind> <group/name>: one run in the sample's build folder;
# output in <mode>.out/.err, exit status in <mode>.rc.
run_sample() {
    local mode=$1 d=$work/logs/$2/${3#*/} bdir=$work/build-$2/Samples/$3 exe rc=0 vars
    exe=$(cat "$d/exe")
    if [ "$mode" = native ]; then
        vars=("LD_LIBRARY_PATH=$native_ld")
    else
        vars=("LD_LIBRARY_PATH=$guest_ld:$cuda_lib" "VGPU_SOCKET=$sock" "VGPU_LOG=${SAMPLES_VGPU_LOG:-warn}")
    fi
    (
        cd "$bdir" || exit 125
        # No file-size limit here: it would also bound libvgpu's memfd window (256 MiB by
        # default; ftruncate past RLIMIT_FSIZE is SIGXFSZ). The run timeout bounds output, and
        # cap_file what is kept of it.
        env "${vars[@]}" timeout -k 5 "$run_timeout" "${stdbuf[@]}" "./$exe" </dev/null >"$d/$mode.out" 2>"$d/$mode.err"
    ) || rc=$?
    echo "$rc" >"$d/$mode.rc"
    cap_file "$d/$mode.out"
    cap_file "$d/$mode.err"
    printf '  %-7s %-7s %-24s %s\n' "$mode" "$2" "${3#*/}" "$(exit_text "$rc" "$run_timeout")"
}

# run_remoted <kind> <group/name>: run_sample libvgpu, with the checks around it: libcuda.so.1
# must resolve to libvgpu where the binary links it, host-proxy must be up before and is
# noted if it is not after; the host-proxy log lines of the run go to host-proxy.log.
run_remoted() {
    local d=$work/logs/$1/${2#*/} exe resolved n0
    exe=$work/build-$1/Samples/$2/$(cat "$d/exe")
    resolved=$(LD_LIBRARY_PATH=$guest_ld:$cuda_lib ldd "$exe" 2>/dev/null | awk '/libcuda\.so\.1/ {print ($3 == "not" ? "nothing" : $3)}')
    if [ -n "$resolved" ] && [ "${resolved#"$lib"/}" = "$resolved" ]; then
        echo "libcuda.so.1 resolves to $resolved, not to libvgpu" >"$d/skip"
        return
    fi
    if ! kill -0 "$hp" 2>/dev/null; then
        daemon_starts=$((daemon_starts + 1))
        daemon_log=$work/host-proxy.$daemon_starts.log
        echo "== host-proxy is not running: starting it again ($daemon_log)"
        start_daemon "$daemon_log"
    fi
    n0=$(wc -l <"$daemon_log")
    run_sample libvgpu "$1" "$2"
    tail -n +"$((n0 + 1))" "$daemon_log" >"$d/host-proxy.log"
    if ! kill -0 "$hp" 2>/dev/null; then
        echo "host-proxy exited during this run" >"$d/daemon-died"
        hp=""
    fi
}

# ---- verdicts and the report ----
# exit_text <status> <limit>: an exit status, short: ok, exit N, timeout Ns, SIGNAME.
exit_text() {
    case $1 in
    0) echo "ok" ;;
    124) echo "timeout ${2}s" ;;
    *)
        if [ "$1" -gt 128 ]; then
            echo "SIG$(kill -l "$(($1 - 128))" 2>/dev/null || echo "$(($1 - 128))")"
        else
            echo "exit $1"
        fi
        ;;
    esac
}

# first_line <file>...: the first line that looks like an error, else the last non-empty one.
first_line() {
    local l
    l=$(cat "$@" 2>/dev/null | grep -a -m1 -iE 'error|fail|abort|assert|segmentation|not supported|cannot|unable|not found|returned [0-9]')
    [ -n "$l" ] || l=$(cat "$@" 2>/dev/null | grep -a -v '^[[:space:]]*$' | tail -n 1)
    printf '%s' "$l"
}

# why <what> <file>...: "<what>: <first_line of the files>", or <what> alone.
why() {
    local what=$1 l
    shift
    l=$(first_line "$@")
    printf '%s%s' "$what" "${l:+: $l}"
}

# first_diff <a> <b>: the first lines that differ in the first hunk of diff.
first_diff() {
    diff "$1" "$2" | awk '
        /^[0-9]/ { if (++h > 1) exit; next }
        /^</ && a == "" { a = substr($0, 3) }
        /^>/ && b == "" { b = substr($0, 3) }
        END { printf "native \"%s\" vs libvgpu \"%s\"", (a == "" ? "(no line)" : a), (b == "" ? "(no line)" : b) }'
}

# verdict <kind> <group/name>: "VERDICT<tab>native<tab>libvgpu<tab>what differs".
verdict() {
    local d=$work/logs/$1/${2#*/} v n="-" l="-" note="" brc nrc lrc
    brc=$(cat "$d/build.rc" 2>/dev/null || echo none)
    nrc=$(cat "$d/native.rc" 2>/dev/null || echo none)
    lrc=$(cat "$d/libvgpu.rc" 2>/dev/null || echo none)
    [ "$nrc" = none ] || n=$(exit_text "$nrc" "$run_timeout")
    [ "$lrc" = none ] || l=$(exit_text "$lrc" "$run_timeout")
    if [ "$brc" = none ]; then
        v=SKIP note="not built (${stop_reason:-the script stopped first})"
    elif [ "$brc" != 0 ]; then
        v=BUILD-FAIL note=$(why "$(exit_text "$brc" "$build_timeout")" "$d/build.log")
    elif [ "$nrc" = none ]; then
        v=SKIP note="not run (${stop_reason:-the script stopped first})"
    elif [ "$nrc" != 0 ]; then
        v=FAIL-NATIVE note=$(why "native $n" "$d/native.err" "$d/native.out")
    elif [ "$remoting" = 0 ]; then
        v=NATIVE-OK note="libvgpu not carried"
    elif [ -f "$d/skip" ]; then
        v=SKIP note=$(cat "$d/skip")
    elif [ "$lrc" = none ]; then
        v=SKIP note="not run through libvgpu (${stop_reason:-the script stopped first})"
    elif [ "$lrc" != 0 ]; then
        v=FAIL-LIBVGPU note=$(why "libvgpu $l" "$d/libvgpu.err" "$d/libvgpu.out")
    else
        comparable "$d" native
        comparable "$d" libvgpu
        if cmp -s "$d/native.cmp" "$d/libvgpu.cmp"; then
            v=PASS
        elif cmp -s <(sort "$d/native.cmp") <(sort "$d/libvgpu.cmp"); then
            v=PASS note="same lines in another order"
        else
            v=DIFF note=$(first_diff "$d/native.cmp" "$d/libvgpu.cmp")
            diff -u "$d/native.cmp" "$d/libvgpu.cmp" >"$d/diff" 2>&1
        fi
        if grep -aq '^libvgpu: ' "$d/libvgpu.err" 2>/dev/null; then
            note="${note:+$note; }$(grep -a -m1 '^libvgpu: ' "$d/libvgpu.err")"
        fi
    fi
    if [ -f "$d/daemon-died" ]; then # a guest must never bring host-proxy down, whatever the sample printed
        case $v in PASS | DIFF) v=FAIL-LIBVGPU ;; esac
        note="$(cat "$d/daemon-died")${note:+; $note}"
    fi
    note=${note//$work\//} # paths in the work folder, shorter
    note=$(printf '%s' "$note" | tr '\t\r\n' '   ' | cut -c1-200)
    printf '%s\t%s\t%s\t%s\n' "$v" "$n" "$l" "$note"
}

# md_cell <text>: text fit for a markdown table cell ("|" would end the cell, "<x>" would vanish as HTML).
md_cell() {
    printf '%s' "$1" | sed -e 's/|/\\|/g' -e 's/</\&lt;/g'
}

# report: verdicts of every sample and build from the logs, to the console, summary.txt,
# results.tsv and, with $OUT set, conformance.md and samples-logs/. Safe to call at any point.
reported=0
report() {
    [ "$reported" = 0 ] || return 0
    reported=1
    local s k v n l note tsv=$work/results.tsv sum=$work/summary.txt fails=$work/failures.txt
    local -A total=()
    : >"$tsv"
    : >"$fails"
    for s in "${selected[@]}"; do
        for k in "${kinds[@]}"; do
            IFS=$'\t' read -r v n l note < <(verdict "$k" "$s")
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${s#*/}" "$k" "$v" "$n" "$l" "$note" >>"$tsv"
            total[$v]=$((${total[$v]:-0} + 1))
            if [ "$v" != PASS ] && [ "$v" != NATIVE-OK ]; then
                local d=$work/logs/$k/${s#*/} f
                {
                    echo "======== ${s#*/} ($k): $v  $note"
                    local files=(diff native.out native.err libvgpu.out libvgpu.err host-proxy.log)
                    [ "$v" = BUILD-FAIL ] && files=(build.log)
                    for f in "${files[@]}"; do
                        [ -s "$d/$f" ] || continue
                        echo "---- $f (last 60 lines)"
                        tail -n 60 "$d/$f"
                    done
                } >>"$fails"
            fi
        done
    done
    # The short diffs first: the device tool returns only the end of the output, which should
    # be the table.
    for s in "${selected[@]}"; do
        for k in "${kinds[@]}"; do
            local dd=$work/logs/$k/${s#*/}/diff
            [ -f "$dd" ] || continue
            echo "== diff ${s#*/} ($k), normalised native vs libvgpu (first 15 lines)"
            tail -n +3 "$dd" | head -n 15
        done
    done
    local counts=""
    for v in PASS DIFF FAIL-LIBVGPU FAIL-NATIVE BUILD-FAIL SKIP NATIVE-OK; do
        [ -n "${total[$v]:-}" ] && counts="${counts:+$counts, }$v ${total[$v]}"
    done
    {
        echo "== cuda-samples conformance ($build_mode build, $(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS} s)"
        printf '%-24s %-7s %-13s %-11s %-11s %s\n' sample build verdict native libvgpu "what differs"
        while IFS=$'\t' read -r s k v n l note; do
            printf '%-24s %-7s %-13s %-11s %-11s %s\n' "$s" "$k" "$v" "$n" "$l" "$note"
        done <"$tsv"
        echo "totals ($(wc -l <"$tsv") runs): $counts"
    } >"$sum"
    cut -c1-190 "$sum"
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        {
            echo "# cuda-samples through libvgpu"
            echo
            echo "$(head -n 1 "$sum" | sed 's/^== //'); $(tail -n 1 "$sum")"
            echo
            echo "| sample | build | verdict | native | libvgpu | what differs |"
            echo "| --- | --- | --- | --- | --- | --- |"
            while IFS=$'\t' read -r s k v n l note; do
                printf '| %s | %s | %s | %s | %s | %s |\n' "$s" "$k" "$v" "$n" "$l" "$(md_cell "$note")"
            done <"$tsv"
        } >"$OUT/conformance.md"
        cp "$sum" "$OUT/summary.txt"
        mkdir -p "$OUT/samples-logs"
        cp "$fails" "$OUT/samples-logs/failures.txt"
        local extra=() f
        for f in "$work"/host-proxy*.log "$work"/cmake-probe.log; do [ -f "$f" ] && extra+=("${f##*/}"); done
        tar czf "$OUT/samples-logs/all-logs.tgz" -C "$work" logs summary.txt results.tsv "${extra[@]}" || true
        echo "== wrote \$OUT/conformance.md, summary.txt, samples-logs/failures.txt and all-logs.tgz"
    fi
}

on_exit() {
    stop_daemon
    if [ "${phase:-setup}" != setup ] && [ "$dry_run" != 1 ]; then report; fi
}

# ---- main ----
main() {
    cd "$(dirname "$0")/.." || exit 1
    root=$PWD
    carry=${CARRY:-.device-carry}
    [ "${carry#/}" != "$carry" ] || carry=$root/$carry
    samples=${SAMPLES_DIR:-$root/.device-carry-samples/cuda-samples}
    dry_run=${SAMPLES_DRY_RUN:-0}
    build_timeout=${SAMPLES_BUILD_TIMEOUT:-120}
    run_timeout=${SAMPLES_RUN_TIMEOUT:-60}
    deadline=$((SECONDS + ${SAMPLES_DEADLINE:-480}))
    njobs=${SAMPLES_JOBS:-$(nproc)}
    kinds=(static)
    [ "${SAMPLES_SHARED:-1}" = 0 ] || kinds+=(shared)
    phase=setup remoting=0 stop_reason=""
    # shellcheck source=device/lib.sh
    . device/lib.sh # find_cuda_toolkit, stage_remoting, start_daemon/stop_daemon ($hp), require_libvgpu
    trap on_exit EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    ulimit -c 0

    local t
    for t in awk sed sort cmp diff timeout ldd tar stat truncate; do
        command -v "$t" >/dev/null 2>&1 || { echo "FAIL: $t not found" >&2; exit 1; }
    done
    if [ ! -f "$samples/CMakeLists.txt" ] || [ ! -d "$samples/Samples" ]; then
        echo "FAIL: no cuda-samples at $samples: run device/stage-samples.sh here and carry .device-carry-samples" >&2
        exit 1
    fi
    # The samples: Samples/<group>/<name>/CMakeLists.txt, restricted by SAMPLES_ONLY.
    local all=() s f want wants=()
    for f in "$samples"/Samples/*/*/CMakeLists.txt; do
        s=${f#"$samples/Samples/"}
        [ -f "$f" ] && all+=("${s%/CMakeLists.txt}")
    done
    selected=()
    if [ -n "${SAMPLES_ONLY:-}" ]; then
        IFS=, read -ra wants <<<"$SAMPLES_ONLY"
        for want in "${wants[@]}"; do
            local found=0
            for s in "${all[@]}"; do
                if [ "${s#*/}" = "$want" ]; then selected+=("$s"); found=1; fi
            done
            [ "$found" = 1 ] || echo "WARN: SAMPLES_ONLY names $want, which is not in $samples/Samples" >&2
        done
    else
        selected=("${all[@]}")
    fi
    if [ "${#selected[@]}" -eq 0 ]; then echo "FAIL: no sample selected" >&2; exit 1; fi
    echo "== ${#selected[@]} samples, builds: ${kinds[*]}"

    # ---- toolkit and build mode ----
    if [ "$dry_run" = 1 ] && ! (find_cuda_toolkit) >/dev/null 2>&1; then
        nvcc=nvcc cuda_home=/usr/local/cuda stubs=/usr/local/cuda/lib64/stubs
        echo "== dry run without a CUDA toolkit: nvcc and $cuda_home stand in"
    else
        find_cuda_toolkit
    fi
    cuda_lib=$(dirname "$stubs")
    native_ld=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$cuda_lib
    build_mode=${SAMPLES_BUILD:-auto}
    cmake_gen=()
    if [ "$build_mode" = auto ]; then
        build_mode=nvcc
        local v
        if command -v cmake >/dev/null 2>&1 && { command -v ninja >/dev/null 2>&1 || command -v make >/dev/null 2>&1; }; then
            v=$(cmake --version | awk 'NR == 1 {print $3}')
            if printf '3.20\n%s\n' "$v" | sort -V -C; then build_mode=cmake; else echo "== cmake $v is older than 3.20"; fi
        fi
    fi
    if [ "$build_mode" = cmake ] && command -v ninja >/dev/null 2>&1; then cmake_gen=(-G Ninja); fi
    echo "== build with $build_mode${cmake_gen[*]:+ (${cmake_gen[*]})}"

    # ---- sources into the work folder, build scripts ----
    work=${SAMPLES_WORK:-$(mktemp -d /tmp/vgpu-samples.XXXXXX)}
    mkdir -p "$work" || exit 1
    if [ ! -f "$work/.vgpu-samples" ] && [ -n "$(ls -A "$work")" ]; then
        echo "FAIL: $work is not empty and not an earlier work folder of this script" >&2
        exit 1
    fi
    touch "$work/.vgpu-samples"
    rm -rf "$work/src" "$work/logs" "$work"/build-* "$work/cmake-probe" || exit 1
    cp -a "$samples" "$work/src" || exit 1
    if [ -n "${SAMPLES_ARCHS:-}" ]; then
        if ! [[ $SAMPLES_ARCHS =~ ^[0-9a-z\ ]+$ ]]; then echo "FAIL: SAMPLES_ARCHS must be like \"90 100\"" >&2; exit 1; fi
        sed -i -E "s/set\(CMAKE_CUDA_ARCHITECTURES[^)]*\)/set(CMAKE_CUDA_ARCHITECTURES $SAMPLES_ARCHS)/" \
            "$work"/src/Samples/*/*/CMakeLists.txt
        echo "== CUDA architectures: $SAMPLES_ARCHS (SAMPLES_ARCHS)"
    fi
    local k
    for k in "${kinds[@]}"; do
        mkdir -p "$work/build-$k/Samples" && ln -s ../src/Common "$work/build-$k/Common" || exit 1
        for s in "${selected[@]}"; do
            mkdir -p "$work/logs/$k/${s#*/}" || exit 1
            write_build "$k" "$s" "$work/logs/$k/${s#*/}/build.sh"
        done
    done
    echo "== work folder: $work"
    if [ "$dry_run" = 1 ]; then
        for k in "${kinds[@]}"; do
            for s in "${selected[@]}"; do
                echo "#### ${s#*/} ($k)"
                grep -v '^set -eux$' "$work/logs/$k/${s#*/}/build.sh"
            done
        done
        exit 0
    fi

    echo "== GPU"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "nvidia-smi failed"
    stdbuf=()
    if stdbuf -oL -eL true >/dev/null 2>&1; then stdbuf=(stdbuf -oL -eL); else echo "== no stdbuf: outputs stay block-buffered"; fi

    # ---- build ----
    phase=build
    if [ "$build_mode" = cmake ] && [ -z "${SAMPLES_BUILD:-}" ]; then
        # One configure first: where CMake cannot configure a sample here, fall back to nvcc.
        local probe=$work/cmake-probe
        if ! timeout -k 10 "$build_timeout" cmake -S "$work/src/Samples/${selected[0]}" -B "$probe" "${cmake_gen[@]}" \
            "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCUDAToolkit_ROOT=$cuda_home" >"$work/cmake-probe.log" 2>&1; then
            echo "== CMake could not configure ${selected[0]} (last lines below): building with nvcc instead"
            tail -n 15 "$work/cmake-probe.log"
            build_mode=nvcc
            for k in "${kinds[@]}"; do
                for s in "${selected[@]}"; do write_build "$k" "$s" "$work/logs/$k/${s#*/}/build.sh"; done
            done
        fi
    fi
    echo "== build ($build_mode, $njobs at a time, ${build_timeout} s each)"
    for k in "${kinds[@]}"; do
        for s in "${selected[@]}"; do
            if [ "$SECONDS" -ge "$deadline" ]; then stop_reason="time budget"; break 2; fi
            pool_start build_job "$k" "$s"
        done
    done
    pool_drain
    echo "== built in ${SECONDS} s"

    # ---- native ----
    phase=native
    echo "== native runs"
    for k in "${kinds[@]}"; do
        for s in "${selected[@]}"; do
            [ "$(cat "$work/logs/$k/${s#*/}/build.rc" 2>/dev/null)" = 0 ] || continue
            if [ "$SECONDS" -ge "$deadline" ]; then stop_reason="time budget"; echo "== time budget spent: no more native runs"; break 2; fi
            run_sample native "$k" "$s"
        done
    done

    # ---- through libvgpu ----
    remoting=0
    if [ ! -f "$carry/libvgpu/libcuda.so.1" ] || [ ! -f "$carry/host-proxy" ]; then
        echo "== no $carry/libvgpu/libcuda.so.1 or $carry/host-proxy carried: native runs only"
    else
        remoting=1
        phase=libvgpu
        sock=$work/sock/host-proxy.sock
        stage_remoting "$carry" "$work" # sets $lib and $guest_ld (cuda backend unless HOST_PROXY_BACKEND says otherwise)
        daemon_starts=1
        daemon_log=$work/host-proxy.1.log
        echo "== starting host-proxy (${HOST_PROXY_BACKEND:-cuda} backend)"
        start_daemon "$daemon_log"
        # One binary that links libcuda.so.1 itself must load libvgpu (static-cudart ones dlopen it).
        local probe_bin="" b
        for k in "${kinds[@]}"; do
            for s in "${selected[@]}"; do
                b=$work/build-$k/Samples/$s/$(cat "$work/logs/$k/${s#*/}/exe" 2>/dev/null)
                if [ -f "$b" ] && ldd "$b" 2>/dev/null | grep -q 'libcuda\.so\.1'; then probe_bin=$b; break 2; fi
            done
        done
        if [ -n "$probe_bin" ]; then require_libvgpu "$probe_bin" "$lib"; fi
        echo "== runs through libvgpu"
        for k in "${kinds[@]}"; do
            for s in "${selected[@]}"; do
                [ "$(cat "$work/logs/$k/${s#*/}/build.rc" 2>/dev/null)" = 0 ] || continue
                [ -f "$work/logs/$k/${s#*/}/native.rc" ] || continue
                if [ "$SECONDS" -ge "$deadline" ]; then stop_reason="time budget"; echo "== time budget spent: no more libvgpu runs"; break 2; fi
                run_remoted "$k" "$s"
            done
        done
        stop_daemon
    fi

    phase=report
    report
    if awk -F'\t' '$3 != "PASS" && $3 != "NATIVE-OK" { bad = 1 } END { exit !bad }' "$work/results.tsv"; then
        echo "cuda-samples conformance: FAIL"
        exit 1
    fi
    echo "cuda-samples conformance: PASS"
    exit 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
