#!/usr/bin/env bash
# Run the FLORA edge agent's Python stack as a 64-bit Raspberry Pi would: Debian bookworm's arm64
# CPython 3.11 with the aarch64 wheels of the `edge` extra (plain onnxruntime, numpy, pillow,
# paho-mqtt, safetensors), executed on this x86-64 machine under qemu user-mode emulation.
#
# No binfmt_misc, chroot or Docker is needed: qemu-aarch64 is called explicitly with -L ROOTFS and
# the rootfs is just Debian's arm64 .debs unpacked with dpkg-deb. See devices/ARM64-NOTES.md.
#
#   devices/verify-arm64.sh                      default verification (prints verdict lines)
#   devices/verify-arm64.sh --bundle DIR [--out DIR]
#                                                the agent on a bundle exported with the step graph:
#                                                `flora-agent doctor --backend step` and a short step-backend
#                                                training on PNGs made on the spot (saved with the inputs, the
#                                                losses and the adapter to --out, default CACHE/bundle-check)
#   devices/verify-arm64.sh -- ARGS...           run `python3 ARGS...` under emulation, e.g.
#   devices/verify-arm64.sh -- -m flora.edge.cli doctor --bundle bundles/clip-tiny
#   devices/verify-arm64.sh --setup-only         build / refresh the cache, run nothing
#   devices/verify-arm64.sh --refresh [...]      re-download packages and wheels (security updates)
#
# Environment:
#   FLORA_ARM64_CACHE   cache directory (default $HOME/.cache/flora-arm64; about 300 MB)
#   FLORA_ARM64_CPU     emulated CPU: cortex-a72 (default: Raspberry Pi 4/400/CM4), cortex-a76 (Pi 5),
#                       cortex-a53 (Pi 3 / Zero 2 W), max (every feature qemu has)
#   FLORA_ARM64_QEMU    path of a qemu-aarch64 user-mode binary (default: qemu-aarch64-static in PATH)
#   FLORA_ARM64_HOST_PYTHON  host python3 whose pip downloads the wheels (default: python3)
#   FLORA_ARM64_MIRROR, FLORA_ARM64_SECURITY_MIRROR, FLORA_ARM64_KEYRING  Debian archive to use
#
# Exit status: 0 verified / command succeeded; 1 verification failed (or the command's own status);
# 2 usage error; 3 setup failed (download, apt, pip); 77 emulation is impossible on this machine
# (the reason is printed on a line starting with "verify-arm64: EMULATION IMPOSSIBLE:").
set -euo pipefail

readonly EXIT_FAIL=1 EXIT_USAGE=2 EXIT_SETUP=3 EXIT_IMPOSSIBLE=77

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
# What the emulated python runs: the default verification, and the training check of --bundle.
VERIFY_PY=$SCRIPT_DIR/arm64/verify_default.py
TRAIN_PY=$SCRIPT_DIR/arm64/train_check.py
CACHE=${FLORA_ARM64_CACHE:-${HOME:-/tmp}/.cache/flora-arm64}
CPU=${FLORA_ARM64_CPU:-cortex-a72}
MIRROR=${FLORA_ARM64_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${FLORA_ARM64_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=${FLORA_ARM64_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
HOST_PYTHON=${FLORA_ARM64_HOST_PYTHON:-python3}

# Raspberry Pi OS 64-bit is Debian bookworm: glibc 2.36, CPython 3.11.2.
readonly SUITE=bookworm GLIBC_MINOR=36 PYVER=3.11
# The arm64 packages to unpack; apt adds their dependency closure (libc6, libssl3, zlib1g, libffi8, ...).
DEB_PACKAGES=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1)
# The `edge` extra of pyproject.toml evaluated for aarch64 + CPython 3.11. pip evaluates environment
# markers for the host even with --platform, so they are resolved here by hand;
# tests/test_arm64.py::test_requirements_match_pyproject keeps this list in sync.
EDGE_REQUIREMENTS=("numpy>=1.21" "pillow>=9.0" "paho-mqtt>=2.0,<3" "safetensors>=0.4" "onnxruntime>=1.16.3" "prometheus_client>=0.17" "cryptography>=42" "pycryptodome>=3.19")
# Bumped whenever the layout of the cache changes, so old caches are rebuilt.
readonly LAYOUT=1

ROOTFS=$CACHE/rootfs
SITE=$CACHE/site
WHEELS=$CACHE/wheels
APTDIR=$CACHE/apt
LOGDIR=$CACHE/logs

log() { printf 'verify-arm64: %s\n' "$*" >&2; }
impossible() {
    printf 'verify-arm64: EMULATION IMPOSSIBLE: %s\n' "$*" >&2
    printf 'VERDICT: SKIP (aarch64 emulation impossible on this machine)\n'
    exit "$EXIT_IMPOSSIBLE"
}
setup_failed() {
    printf 'verify-arm64: SETUP FAILED: %s\n' "$*" >&2
    printf 'VERDICT: FAIL (setup)\n'
    exit "$EXIT_SETUP"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Single-quote a string for /bin/sh.
shquote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
# Run a logged command; on failure show the end of its log.
run_logged() {
    local logfile=$1; shift
    if ! "$@" >>"$logfile" 2>&1; then
        tail -n 25 "$logfile" >&2
        return 1
    fi
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

SETUP_ONLY=0
REFRESH=0
BUNDLE=
OUT=
CMD=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        --refresh) REFRESH=1; shift ;;
        --bundle | --out)
            (($# >= 2)) || { log "$1 needs a folder"; exit "$EXIT_USAGE"; }
            if [[ $1 == --bundle ]]; then BUNDLE=$2; else OUT=$2; fi
            shift 2 ;;
        --) shift; CMD=("$@"); break ;;
        *) log "unknown argument: $1 (python arguments go after --)"; usage >&2; exit "$EXIT_USAGE" ;;
    esac
done

if [[ -n $BUNDLE ]]; then
    [[ -f $BUNDLE/manifest.json ]] || { log "--bundle $BUNDLE: no manifest.json there"; exit "$EXIT_USAGE"; }
    BUNDLE=$(cd -- "$BUNDLE" && pwd)
    ((${#CMD[@]} == 0)) || { log "--bundle and -- ARGS are exclusive"; exit "$EXIT_USAGE"; }
fi

case $CPU in
    cortex-a72) CPU_PART=0xd08; CPU_FEATURES="fp asimd evtstrm crc32 cpuid"; CPU_VARIANT=0x0; CPU_REV=3 ;;
    cortex-a76) CPU_PART=0xd0b; CPU_VARIANT=0x4; CPU_REV=1
        CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    cortex-a53) CPU_PART=0xd03; CPU_FEATURES="fp asimd evtstrm crc32 cpuid"; CPU_VARIANT=0x0; CPU_REV=4 ;;
    max) CPU_PART=0xd0b; CPU_VARIANT=0x4; CPU_REV=1
        CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm sb paca pacg dcpodp flagm2 frint i8mm bf16" ;;
    *) log "FLORA_ARM64_CPU=$CPU is not one of cortex-a72, cortex-a76, cortex-a53, max"; exit "$EXIT_USAGE" ;;
esac

T_START=$(now)

# ---------------------------------------------------------------------------------------------
# 1. Host prerequisites: qemu-aarch64 user-mode, apt-get + dpkg-deb, a host python3 with pip.
# ---------------------------------------------------------------------------------------------
find_qemu() {
    local c
    if [[ -n ${FLORA_ARM64_QEMU:-} ]]; then
        [[ -x $FLORA_ARM64_QEMU ]] || impossible "FLORA_ARM64_QEMU=$FLORA_ARM64_QEMU is not an executable file"
        QEMU=$FLORA_ARM64_QEMU
        return
    fi
    for c in qemu-aarch64-static qemu-aarch64; do
        if QEMU=$(command -v "$c"); then return; fi
    done
    QEMU=
}

find_qemu
if [[ -z $QEMU ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "qemu-aarch64-static not found; installing qemu-user-static with apt-get (we are root)"
        mkdir -p "$LOGDIR"
        export DEBIAN_FRONTEND=noninteractive
        if ! run_logged "$LOGDIR/qemu-install.log" apt-get install -y --no-install-recommends qemu-user-static; then
            # Stale package lists: refresh (third-party sources may fail; that is not fatal) and retry.
            apt-get update >>"$LOGDIR/qemu-install.log" 2>&1 || true
            run_logged "$LOGDIR/qemu-install.log" apt-get install -y --no-install-recommends qemu-user-static ||
                impossible "qemu-aarch64-static is missing and 'apt-get install -y qemu-user-static' failed (log: $LOGDIR/qemu-install.log)"
        fi
        find_qemu
        [[ -n $QEMU ]] || impossible "qemu-user-static was installed but no qemu-aarch64-static is in PATH"
    else
        impossible "qemu-aarch64-static (qemu user-mode emulation) is not installed and we are not root to install it; run: sudo apt-get install -y qemu-user-static   (or set FLORA_ARM64_QEMU=/path/to/qemu-aarch64)"
    fi
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null ||
        impossible "'$tool' is not available: the arm64 Python is built from Debian packages with apt-get and dpkg-deb (a Debian/Ubuntu host is needed)"
done
command -v "$HOST_PYTHON" >/dev/null ||
    impossible "no host '$HOST_PYTHON' to run pip with (set FLORA_ARM64_HOST_PYTHON)"
[[ -r $KEYRING ]] ||
    setup_failed "Debian archive keyring $KEYRING is missing: apt-get install debian-archive-keyring (or set FLORA_ARM64_KEYRING)"

mkdir -p "$CACHE" "$LOGDIR"
CACHE=$(cd -- "$CACHE" && pwd)
ROOTFS=$CACHE/rootfs SITE=$CACHE/site WHEELS=$CACHE/wheels APTDIR=$CACHE/apt LOGDIR=$CACHE/logs

# One setup at a time per cache (a second caller waits instead of racing the first).
if command -v flock >/dev/null; then
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "another verify-arm64 is setting up $CACHE; waiting for it"
        flock 9
    fi
fi

# ---------------------------------------------------------------------------------------------
# 2. The arm64 rootfs: a private apt state (arm64 only, Debian mirror only, empty dpkg status)
#    resolves and downloads the .debs, dpkg-deb -x unpacks them. Needs no root, binfmt or chroot.
# ---------------------------------------------------------------------------------------------
write_apt_config() {
    mkdir -p "$APTDIR/etc/preferences.d" "$APTDIR/etc/trusted.gpg.d" "$APTDIR/state/lists/partial" \
        "$APTDIR/cache/archives/partial" "$APTDIR/log"
    touch "$APTDIR/status"
    local opts="arch=arm64 signed-by=$KEYRING"
    cat >"$APTDIR/etc/sources.list" <<EOF
deb [$opts] $MIRROR $SUITE main
deb [$opts] $MIRROR $SUITE-updates main
deb [$opts] $SECURITY_MIRROR $SUITE-security main
EOF
    cat >"$APTDIR/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d";
Dir::Etc::Trusted "$APTDIR/etc/trusted.gpg";
Dir::Etc::TrustedParts "$APTDIR/etc/trusted.gpg.d";
Dir::State "$APTDIR/state";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR/cache";
Dir::Log "$APTDIR/log";
Debug::NoLocking "true";
EOF
}
apt_arm64() { APT_CONFIG=$APTDIR/apt.conf apt-get -q -o APT::Sandbox::User="$(id -un)" "$@"; }

ROOTFS_STAMP="layout=$LAYOUT suite=$SUITE mirror=$MIRROR packages=${DEB_PACKAGES[*]}"
build_rootfs() {
    local t0 deb tmp=$CACHE/rootfs.tmp
    t0=$(now)
    write_apt_config
    : >"$LOGDIR/apt.log"
    log "rootfs: resolving and downloading Debian $SUITE arm64 packages: ${DEB_PACKAGES[*]} (+ dependencies)"
    apt_arm64 clean >/dev/null 2>&1 || true # a rebuild unpacks exactly what is downloaded now
    run_logged "$LOGDIR/apt.log" apt_arm64 update ||
        setup_failed "apt-get update for arm64 failed (log: $LOGDIR/apt.log)"
    run_logged "$LOGDIR/apt.log" apt_arm64 install -y --download-only "${DEB_PACKAGES[@]}" ||
        setup_failed "downloading the arm64 packages failed (log: $LOGDIR/apt.log)"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local n=0
    for deb in "$APTDIR"/cache/archives/*_arm64.deb "$APTDIR"/cache/archives/*_all.deb; do
        [[ -e $deb ]] || continue
        dpkg-deb -x "$deb" "$tmp" || setup_failed "dpkg-deb -x $deb failed"
        n=$((n + 1))
    done
    ((n > 0)) || setup_failed "no .deb was downloaded (log: $LOGDIR/apt.log)"
    [[ -x $tmp/usr/bin/python$PYVER && -e $tmp/lib/ld-linux-aarch64.so.1 ]] ||
        setup_failed "the unpacked rootfs has no usr/bin/python$PYVER or lib/ld-linux-aarch64.so.1"
    mkdir -p "$tmp/proc" "$tmp/tmp"
    printf '%s\n' "$ROOTFS_STAMP" >"$tmp/.flora-rootfs"
    rm -rf "$ROOTFS.old"
    if [[ -e $ROOTFS ]]; then mv "$ROOTFS" "$ROOTFS.old"; fi
    mv "$tmp" "$ROOTFS"
    rm -rf "$ROOTFS.old"
    log "rootfs: $n packages unpacked into $ROOTFS in $(since "$t0") s ($(du -sh "$ROOTFS" | cut -f1))"
}

T_ROOTFS=$(now)
if [[ $REFRESH -eq 0 && -f $ROOTFS/.flora-rootfs && $(<"$ROOTFS/.flora-rootfs") == "$ROOTFS_STAMP" ]]; then
    ROOTFS_STATE=cached
else
    build_rootfs
    ROOTFS_STATE="built in $(since "$T_ROOTFS") s"
fi

# ---------------------------------------------------------------------------------------------
# 3. Runtime files (rewritten every run, they depend on FLORA_ARM64_CPU and the qemu path).
#  - proc/cpuinfo: qemu before 8.1 passes the host's x86 /proc/cpuinfo through; onnxruntime's
#    cpuinfo library then finds no Arm cores and segfaults on import. qemu -L looks files up in
#    the rootfs first, so a Raspberry-Pi-like cpuinfo there fixes it (qemu >= 8.1 emulates it).
#  - usr/bin/python3: a host shell wrapper that starts the arm64 python under qemu; with qemu -0
#    it becomes sys.executable, so subprocess/multiprocessing re-exec works without binfmt_misc.
# ---------------------------------------------------------------------------------------------
write_if_changed() { # path, content
    if [[ ! -f $1 || $(<"$1") != "$2" ]]; then
        printf '%s\n' "$2" >"$1.tmp.$$"
        mv -f "$1.tmp.$$" "$1"
    fi
}
ncpu=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
cpuinfo=
for ((i = 0; i < ncpu; i++)); do
    cpuinfo+=$(printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
        "$i" "$CPU_FEATURES" "$CPU_VARIANT" "$CPU_PART" "$CPU_REV")
    cpuinfo+=$'\n\n'
done
cpuinfo+=$(printf 'Hardware\t: BCM2835\nModel\t\t: qemu-aarch64 %s (FLORA verify-arm64)' "$CPU")
write_if_changed "$ROOTFS/proc/cpuinfo" "$cpuinfo"

PYTHON=$ROOTFS/usr/bin/python3
write_if_changed "$PYTHON" "#!/bin/sh
# Written by devices/verify-arm64.sh: the Debian arm64 python$PYVER under qemu user-mode ($CPU).
exec $(shquote "$QEMU") -L $(shquote "$ROOTFS") -cpu $CPU -0 \"\$0\" $(shquote "$ROOTFS/usr/bin/python$PYVER") \"\$@\""
chmod 0755 "$PYTHON"

# The project as installed: flora.edge and flora.broker are the repo's edge/ and broker/ folders
# (pyproject's package-dir mapping), laid out here as links so the guest imports this checkout.
PKGROOT=$CACHE/pkgroot
mkdir -p "$PKGROOT/flora"
for pkg in edge broker; do ln -sfn "$REPO_ROOT/$pkg" "$PKGROOT/flora/$pkg"; done

# The environment the emulated python sees: the caller's, minus what points at host binaries.
guest() {
    env -u LD_LIBRARY_PATH -u LD_PRELOAD -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONEXECUTABLE \
        -u VIRTUAL_ENV -u PYTHONSAFEPATH -u QEMU_LD_PREFIX -u QEMU_CPU \
        PYTHONNOUSERSITE=1 PYTHONPATH="$SITE:$PKGROOT" "$PYTHON" "$@"
}

# Can this machine run aarch64 code at all? (qemu refused by seccomp, a broken qemu, ...)
smoke_out=$(guest -S -c 'import os; print(os.uname().machine)' 2>"$LOGDIR/smoke.err") && smoke_rc=0 || smoke_rc=$?
if [[ $smoke_rc -ne 0 || $smoke_out != aarch64 ]]; then
    impossible "$QEMU cannot run the arm64 python (exit $smoke_rc, output '$smoke_out'): $(tail -n 5 "$LOGDIR/smoke.err" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------------------------
# 4. aarch64 wheels: downloaded by the host's pip for the target platform, installed with
#    --target (pure file copies, nothing runs), so no pip has to run under emulation.
# ---------------------------------------------------------------------------------------------
PIP_PLATFORMS=(--platform manylinux2014_aarch64)
for ((n = 17; n <= GLIBC_MINOR; n++)); do PIP_PLATFORMS+=(--platform "manylinux_2_${n}_aarch64"); done
PIP_TARGET_ARGS=(--only-binary=:all: --implementation cp --python-version "$PYVER" "${PIP_PLATFORMS[@]}")

choose_pip() {
    # The host's own pip if it is new enough for several --platform values; otherwise Debian's
    # self-contained pip wheel (python3-pip-whl, arch all) run from the zip.
    local v
    if v=$("$HOST_PYTHON" -m pip --version 2>/dev/null) && [[ $v =~ ^pip\ ([0-9]+) ]] && ((BASH_REMATCH[1] >= 21)); then
        PIP=("$HOST_PYTHON" -m pip)
        return
    fi
    local whl
    whl=$(find "$CACHE/pipwhl" -name 'pip-*.whl' 2>/dev/null | head -n 1) || true
    if [[ -z $whl ]]; then
        log "host '$HOST_PYTHON' has no usable pip; fetching Debian's python3-pip-whl"
        write_apt_config
        rm -rf "$CACHE/pipwhl"
        mkdir -p "$CACHE/pipwhl"
        (cd "$CACHE/pipwhl" && run_logged "$LOGDIR/apt.log" apt_arm64 download python3-pip-whl) ||
            setup_failed "apt-get download python3-pip-whl failed (log: $LOGDIR/apt.log)"
        dpkg-deb -x "$CACHE"/pipwhl/python3-pip-whl_*.deb "$CACHE/pipwhl"
        whl=$(find "$CACHE/pipwhl" -name 'pip-*.whl' | head -n 1) || true
        [[ -n $whl ]] || setup_failed "python3-pip-whl holds no pip wheel"
    fi
    PIP=("$HOST_PYTHON" "$whl/pip")
}

SITE_STAMP="layout=$LAYOUT python=$PYVER glibc=2.$GLIBC_MINOR requirements=${EDGE_REQUIREMENTS[*]}"
install_wheels() {
    local t0 tmp=$CACHE/site.tmp
    t0=$(now)
    choose_pip
    : >"$LOGDIR/pip.log"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_REQUIRE_VIRTUALENV=0 PIP_USER=0
    log "wheels: downloading aarch64 cp311 wheels with ${PIP[*]}: ${EDGE_REQUIREMENTS[*]}"
    mkdir -p "$WHEELS"
    run_logged "$LOGDIR/pip.log" "${PIP[@]}" download "${PIP_TARGET_ARGS[@]}" -d "$WHEELS" "${EDGE_REQUIREMENTS[@]}" ||
        setup_failed "pip download of the aarch64 wheels failed (log: $LOGDIR/pip.log)"
    rm -rf "$tmp"
    run_logged "$LOGDIR/pip.log" "${PIP[@]}" install --no-index --find-links "$WHEELS" "${PIP_TARGET_ARGS[@]}" \
        --target "$tmp" "${EDGE_REQUIREMENTS[@]}" ||
        setup_failed "pip install --target of the aarch64 wheels failed (log: $LOGDIR/pip.log)"
    printf '%s\n' "$SITE_STAMP" >"$tmp/.flora-site"
    rm -rf "$SITE.old"
    if [[ -e $SITE ]]; then mv "$SITE" "$SITE.old"; fi
    mv "$tmp" "$SITE"
    rm -rf "$SITE.old"
    log "wheels: installed into $SITE in $(since "$t0") s ($(du -sh "$SITE" | cut -f1))"
}

T_SITE=$(now)
if [[ $REFRESH -eq 0 && -f $SITE/.flora-site && $(<"$SITE/.flora-site") == "$SITE_STAMP" ]]; then
    SITE_STATE=cached
else
    install_wheels
    SITE_STATE="built in $(since "$T_SITE") s"
fi

# The setup is done; release the lock so that several runs can share the cache.
if command -v flock >/dev/null; then flock -u 9; fi
SETUP_S=$(since "$T_START")
log "setup ${SETUP_S} s (rootfs: $ROOTFS_STATE; wheels: $SITE_STATE); qemu: $QEMU ($("$QEMU" --version | head -n 1)); cpu: $CPU"
if [[ -r /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    log "binfmt_misc: qemu-aarch64 is registered (emulated code can also exec other arm64 binaries)"
else
    log "binfmt_misc: no qemu-aarch64 entry (not needed; emulated code can exec python3 and host programs, not other arm64 binaries)"
fi

if ((SETUP_ONLY)); then
    printf 'VERDICT: SETUP OK (cache %s, %s s)\n' "$CACHE" "$SETUP_S"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 5a. A command after --: run it and pass its exit status through (77 is reserved: mapped to 1).
# ---------------------------------------------------------------------------------------------
if ((${#CMD[@]})); then
    T_RUN=$(now)
    guest "${CMD[@]}" && rc=0 || rc=$?
    log "command exited with status $rc after $(since "$T_RUN") s under emulation (setup ${SETUP_S} s)"
    if ((rc == EXIT_IMPOSSIBLE)); then rc=$EXIT_FAIL; fi
    exit "$rc"
fi

# ---------------------------------------------------------------------------------------------
# 5b. --bundle: the agent's doctor and a short step-backend training on the bundle, emulated.
# ---------------------------------------------------------------------------------------------
bundle_checks() {
    local t0 rc failed=()
    OUT=${OUT:-$CACHE/bundle-check/$(basename "$BUNDLE")}
    mkdir -p "$OUT"
    rm -f "$OUT"/doctor.txt "$OUT"/train.npz "$OUT"/class[0-9]*-[0-9]*.png # ours only: --out may hold more
    OUT=$(cd -- "$OUT" && pwd)
    t0=$(now)
    guest -m flora.edge.cli doctor --bundle "$BUNDLE" --backend step --batch-size 8 >"$OUT/doctor.txt" 2>&1 && rc=0 || rc=$?
    sed 's/^/  doctor| /' "$OUT/doctor.txt"
    if ((rc == 0)) && grep -q '^VERDICT: ready' "$OUT/doctor.txt"; then
        printf 'PASS doctor: %s (%s s)\n' "$(grep '^VERDICT' "$OUT/doctor.txt")" "$(since "$t0")"
    else
        printf 'FAIL doctor: exit status %s: %s\n' "$rc" "$(grep '^VERDICT' "$OUT/doctor.txt" || tail -n 1 "$OUT/doctor.txt")"
        failed+=(doctor)
    fi
    guest "$TRAIN_PY" "$BUNDLE" "$OUT" && rc=0 || rc=$?
    if ((rc != 0)); then failed+=(train); fi
    log "bundle checks on $BUNDLE: $(since "$t0") s under emulation (setup ${SETUP_S} s); files in $OUT"
    if ((${#failed[@]})); then
        printf 'VERDICT: FAIL (aarch64 under qemu, %s: %s failed)\n' "$(basename "$BUNDLE")" "${failed[*]}"
        exit "$EXIT_FAIL"
    fi
    printf 'VERDICT: PASS (aarch64 under qemu, %s: doctor ready, step training lowers the loss)\n' "$(basename "$BUNDLE")"
    exit 0
}

if [[ -n $BUNDLE ]]; then bundle_checks; fi

# ---------------------------------------------------------------------------------------------
# 5c. The default verification.
# ---------------------------------------------------------------------------------------------
MQTT_PID=
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() { if [[ -n $MQTT_PID ]]; then kill "$MQTT_PID" 2>/dev/null || true; wait "$MQTT_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

MOSQUITTO=$(command -v mosquitto || true)
if [[ -z $MOSQUITTO && -x /usr/sbin/mosquitto ]]; then MOSQUITTO=/usr/sbin/mosquitto; fi
if [[ -n $MOSQUITTO ]]; then
    port=$("$HOST_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mqdir=$(mktemp -d "$CACHE/mosquitto.XXXXXX")
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$mqdir/mosquitto.conf"
    "$MOSQUITTO" -c "$mqdir/mosquitto.conf" >"$mqdir/mosquitto.log" 2>&1 &
    MQTT_PID=$!
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    export FLORA_ARM64_MQTT_PORT=$port
    trap 'cleanup; rm -rf "$mqdir"' EXIT
fi


T_RUN=$(now)
guest "$VERIFY_PY" && rc=0 || rc=$?
RUN_S=$(since "$T_RUN")
log "timings: setup ${SETUP_S} s (rootfs: $ROOTFS_STATE; wheels: $SITE_STATE), emulated verification ${RUN_S} s, total $(since "$T_START") s"
if ((rc != 0)); then
    log "verification FAILED (exit status $rc)"
    exit "$EXIT_FAIL"
fi
exit 0
