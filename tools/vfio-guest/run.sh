#!/usr/bin/env bash
# Runs one program inside a QEMU guest that has a real kernel VFIO stack
# (intel-iommu, vfio-pci, type1) and two PCI devices to drive with it: QEMU's
# `edu` (1234:11e8) and an NVMe controller (1b36:0010) backed by a scratch disk, with
# a 2 MiB controller memory buffer (BAR2: the aperture test of tests/vfio.rs).
#
#   tools/vfio-guest/run.sh [OPTIONS] [--] PROGRAM [ARGS...]
#
# The repository root is shared into the guest over virtio-9p and mounted at the
# same absolute path, so host paths under it (target/debug/deps/...) work as is.
# The guest runs PROGRAM as root, from the host's working directory when that is
# inside the repository (else from the repository root), with stdin /dev/null.
# The guest console streams to stdout; run.sh exits with PROGRAM's exit code.
#
# Options:
#   --timeout SECS     whole-run limit, boot included (default 300, or $USERPTR_GUEST_TIMEOUT)
#   --env NAME=VALUE   set NAME in the guest (repeatable); --env NAME passes the host's value
#   --no-bind          leave edu and nvme unbound (vfio modules still loaded), so a
#                      bring-up tool can do its own bind/unbind
#   --nvme-driver      load the guest's nvme driver first: with --no-bind the controller
#                      stays on it; without, it is unbound from it and moved to vfio-pci
#   --uid UID          run PROGRAM as UID:UID instead of root, owning the /dev/vfio group
#                      files (RLIMIT_MEMLOCK then applies: 8 MiB by default)
#   --with PATH        also make host executable PATH runnable in the guest: copy its
#                      libraries (and PATH itself when it is outside the repository)
#   --mem SIZE         guest memory (default 1G)      --smp N   guest CPUs (default 2)
#   --verbose          show the guest kernel's boot log (default: quiet)
#   --keep             keep the run directory (initramfs, disk image, console log)
#
# In the guest: USERPTR_IN_GUEST=1, USERPTR_VFIO_EDU=<BDF>, USERPTR_VFIO_NVME=<BDF>
# (e.g. 0000:00:02.0), USERPTR_GUEST_BOUND=1 (0 with --no-bind), USERPTR_GUEST_ACCEL=kvm|tcg,
# RUST_BACKTRACE=1,
# TMPDIR=/tmp (a tmpfs). Forwarded from the host when set: RUST_LOG, RUST_BACKTRACE,
# RUST_LIB_BACKTRACE, RUST_MIN_STACK, RUST_TEST_*, CARGO_MANIFEST_DIR, CARGO_PKG_NAME,
# CARGO_CRATE_NAME, and every name listed in $USERPTR_GUEST_PASS_ENV (space-separated).
#
# Accelerator: KVM (`-accel kvm -cpu host`) when /dev/kvm opens read-write and is backed
# by kvm_intel or kvm_amd, else TCG (`-accel tcg -cpu max`), with the reason on stderr;
# USERPTR_GUEST_ACCEL=tcg|kvm forces one (kvm then fails when /dev/kvm cannot be opened).
# run.sh prints which on stderr, and the guest sees it as
# USERPTR_GUEST_ACCEL (`bench --device` prints it and writes it into its JSON).
# The emulated intel-iommu (with kernel-irqchip=split, which it needs for interrupt
# remapping under KVM) is the same under both.
#
# Debugging: USERPTR_GUEST_QEMU_EXTRA (extra QEMU arguments, word-split),
# USERPTR_GUEST_APPEND_EXTRA (extra kernel command line).
#
# Exit status: PROGRAM's; 124 when the timeout struck first; 125 when the guest
# never reported an exit code (kernel panic, failed bring-up, QEMU error).
set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd "$script_dir/../.." && pwd -P)
cache="$repo_root/target/vfio-guest"

die() { echo "vfio-guest: error: $*" >&2; exit 125; }
usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

timeout_s=${USERPTR_GUEST_TIMEOUT:-300}
bind=1 nvme_driver=0 uid="" mem=1G smp=2 verbose=0 keep=0
envs=() withs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) [ $# -ge 2 ] || die "--timeout needs a value"; timeout_s=$2; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        --env) [ $# -ge 2 ] || die "--env needs NAME=VALUE"; envs+=("$2"); shift 2 ;;
        --env=*) envs+=("${1#*=}"); shift ;;
        --no-bind) bind=0; shift ;;
        --nvme-driver) nvme_driver=1; shift ;;
        --uid) [ $# -ge 2 ] || die "--uid needs a value"; uid=$2; shift 2 ;;
        --with) [ $# -ge 2 ] || die "--with needs a path"; withs+=("$2"); shift 2 ;;
        --mem) [ $# -ge 2 ] || die "--mem needs a value"; mem=$2; shift 2 ;;
        --smp) [ $# -ge 2 ] || die "--smp needs a value"; smp=$2; shift 2 ;;
        --verbose) verbose=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { usage >&2; die "no PROGRAM given"; }
[[ "$timeout_s" =~ ^[0-9]+$ ]] && [ "$timeout_s" -gt 0 ] || die "bad --timeout: $timeout_s"
[ -z "$uid" ] || [[ "$uid" =~ ^[0-9]+$ ]] || die "bad --uid: $uid"

# --- accelerator: KVM when it can run this guest, else TCG -----------------------------
# KVM needs /dev/kvm open read-write and a hardware-virtualisation backend (kvm_intel or
# kvm_amd). A software backend such as kvm-pvm (nested machines without VMX) opens fine,
# but it only runs PVM-enabled guest kernels: Debian's kernel dies there in its first
# instructions with no console output, so that case falls back to TCG.
accel_why=""
kvm_usable() {
    [ -c /dev/kvm ] || { accel_why="no /dev/kvm"; return 1; }
    ( exec 8<>/dev/kvm ) 2>/dev/null || { accel_why="/dev/kvm cannot be opened read-write"; return 1; }
    if [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; then return 0; fi
    if [ -d /sys/module/kvm_pvm ]; then
        accel_why="/dev/kvm is kvm-pvm (software nested KVM: it boots only PVM guest kernels)"
    else
        accel_why="/dev/kvm has neither kvm_intel nor kvm_amd behind it"
    fi
    return 1
}
case "${USERPTR_GUEST_ACCEL:-}" in
    "") if kvm_usable; then accel=kvm; else accel=tcg; fi ;;
    kvm) ( exec 8<>/dev/kvm ) 2>/dev/null || die "USERPTR_GUEST_ACCEL=kvm but /dev/kvm cannot be opened read-write"
         accel=kvm ;;
    tcg) accel=tcg accel_why="USERPTR_GUEST_ACCEL=tcg" ;;
    *) die "bad USERPTR_GUEST_ACCEL: ${USERPTR_GUEST_ACCEL} (kvm or tcg)" ;;
esac
if [ "$accel" = kvm ]; then accel_args=(-accel kvm -cpu host); else accel_args=(-accel tcg -cpu max); fi

"$script_dir/setup.sh" || die "setup.sh failed"
kernel_image=$(sed -n 's/^kernel_image=//p' "$cache/setup.stamp")
for f in "$kernel_image" base.cpio.gz modules/core.list modules/nvme.list; do
    [ -f "$cache/$f" ] || die "setup left no $cache/$f"
done

# --- guest environment -------------------------------------------------------------
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }   # single-quote for sh
valid_name() { [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; }
env_lines=()
add_env() {   # NAME VALUE
    valid_name "$1" || die "bad environment variable name: $1"
    env_lines+=("export $1=$(sq "$2")")
}
for name in $(compgen -e | grep -E '^(RUST_(LOG|BACKTRACE|LIB_BACKTRACE|MIN_STACK|TEST_[A-Z_]+)|CARGO_(MANIFEST_DIR|PKG_NAME|CRATE_NAME))$') \
            ${USERPTR_GUEST_PASS_ENV:-}; do
    [ -n "${!name+x}" ] && add_env "$name" "${!name}"
done
for e in "${envs[@]}"; do
    case "$e" in
        *=*) add_env "${e%%=*}" "${e#*=}" ;;
        *) valid_name "$e" || die "bad --env $e"
           [ -n "${!e+x}" ] || die "--env $e: not set on the host"
           add_env "$e" "${!e}" ;;
    esac
done

# --- what PROGRAM is, as the guest will see it -----------------------------------------
run_dir=""
cleanup() { [ -n "$run_dir" ] && [ "$keep" = 0 ] && rm -rf "$run_dir"; }
qpid=""
on_signal() {   # stop QEMU (timeout runs it in its own process group: no tty signals reach it)
    [ -n "$qpid" ] && kill -TERM "$qpid" 2>/dev/null
    wait 2>/dev/null
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
mkdir -p "$cache/runs"
# run directories left by runs that were killed outright
find "$cache/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +720 -exec rm -rf {} + 2>/dev/null
run_dir=$(mktemp -d "$cache/runs/run.XXXXXX")
extra="$run_dir/extra"
mkdir -p "$extra/etc"

applets=$(busybox --list-full | sed 's#^#/#')
is_applet_path() { grep -qxF "$1" <<<"$applets"; }

copy_file() {   # host path -> same path in the initramfs (symlinks followed)
    local p="$1"
    [ -e "$extra$p" ] && return 0
    mkdir -p "$extra$(dirname "$p")"
    cp -L "$p" "$extra$p" || die "cannot copy $p into the initramfs"
}
copy_libs() {   # the dynamic libraries an executable needs, per ldd, plus its interpreter
    local exe="$1" line lib
    ldd "$exe" >/dev/null 2>&1 || return 0   # static, or not an ELF program (a script)
    while read -r line; do
        case "$line" in
            *"=> not found"*) die "ldd $exe: ${line%% *} not found on the host" ;;
            *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
            /*) lib=${line%% (*} ;;
            *) continue ;;
        esac
        copy_file "$lib"
    done < <(ldd "$exe")
}
in_repo() { case "$1" in "$repo_root"|"$repo_root"/*) return 0 ;; *) return 1 ;; esac; }
prepare_exe() {   # PATH-or-name -> prints the path to run in the guest
    local p="$1"
    if [[ "$p" != */* ]]; then
        if busybox --list | grep -qxF "$p"; then echo "$p"; return; fi
        p=$(type -P "$p") || die "$1: not a busybox applet and not on the host's PATH"
    fi
    [[ "$p" == /* ]] || p="$PWD/$p"
    # the guest's own shell (busybox) stays: /init runs on it
    case "$p" in /bin/sh|/bin/busybox) echo "$p"; return ;; esac
    if [ ! -e "$p" ]; then
        if is_applet_path "$p"; then echo "$p"; return; fi   # busybox provides it
        die "$p: no such file on the host"
    fi
    local real; real=$(realpath "$p")
    if in_repo "$real"; then copy_libs "$real"; echo "$real"; return; fi
    copy_file "$p"; copy_libs "$p"; echo "$p"
}
prog=$(prepare_exe "$1") || exit 125
shift
for w in "${withs[@]}"; do prepare_exe "$w" >/dev/null || exit 125; done
# The C runtime that any Rust binary of this repository needs, so that a test
# which spawns another of the repository's programs finds its libraries too.
copy_libs "$(type -P true || echo "$BASH")"   # the ELF interpreter and libc
for lib in libc.so.6 libm.so.6 libgcc_s.so.1; do
    p=$(ldconfig -p 2>/dev/null | sed -n "s/^[[:space:]]*$lib (libc6,x86-64) => //p" | head -n1)
    [ -n "$p" ] && copy_file "$p"
done

guest_cwd=$(pwd -P)
in_repo "$guest_cwd" || guest_cwd=$repo_root
nonce=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
marker="@@vfio-guest-exit $nonce"

{
    echo "# generated by tools/vfio-guest/run.sh"
    echo "REPO_ROOT=$(sq "$repo_root")"
    echo "GUEST_CWD=$(sq "$guest_cwd")"
    echo "BIND=$bind NVME_DRIVER=$nvme_driver RUN_UID=$(sq "$uid") ACCEL=$accel"
    echo "MARKER=$(sq "$marker")"
    printf 'set --'; printf ' %s' "$(sq "$prog")"; for a in "$@"; do printf ' %s' "$(sq "$a")"; done; echo
} > "$extra/etc/vfio-guest.sh"
{
    echo "# generated by tools/vfio-guest/run.sh"
    echo "export RUST_BACKTRACE=1 TMPDIR=/tmp HOME=/tmp"
    for l in "${env_lines[@]}"; do echo "$l"; done
} > "$extra/etc/vfio-guest-env.sh"
{
    printf 'exec'; printf ' %s' "$(sq "$prog")"; for a in "$@"; do printf ' %s' "$(sq "$a")"; done; echo
} > "$extra/etc/vfio-guest-cmd.sh"

cat > "$extra/init" <<'INIT'
#!/bin/sh
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
/bin/busybox --install -s 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
. /etc/vfio-guest.sh

fail() {
    echo "vfio-guest init: $*"
    echo "$MARKER setup-failed@@"
    poweroff -f
}
load_group() {
    for m in $(cat /lib/modules/$1.list); do
        insmod /lib/modules/$m.ko || fail "insmod $m failed"
    done
}
load_group core
[ "$NVME_DRIVER" = 1 ] && load_group nvme

mkdir -p "$REPO_ROOT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose host "$REPO_ROOT" ||
    fail "cannot mount the 9p share at $REPO_ROOT"

find_bdf() {   # VENDOR DEVICE (hex, no 0x)
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/vendor)" = "0x$1" ] && [ "$(cat $d/device)" = "0x$2" ]; then
            echo "${d##*/}"; return 0
        fi
    done
    return 1
}
bind_vfio() {  # BDF
    d=/sys/bus/pci/devices/$1
    echo vfio-pci > $d/driver_override || return 1
    [ -e $d/driver ] && { echo "$1" > $d/driver/unbind || return 1; }
    echo "$1" > /sys/bus/pci/drivers_probe
    g=$(basename "$(readlink $d/iommu_group)")
    i=0
    while [ ! -e /dev/vfio/$g ]; do
        i=$((i + 1)); [ $i -gt 100 ] && return 1; sleep 0.05
    done
}
EDU=$(find_bdf 1234 11e8) || fail "no edu device (1234:11e8)"
NVME=$(find_bdf 1b36 0010) || fail "no nvme device (1b36:0010)"
if [ "$NVME_DRIVER" = 1 ]; then   # the nvme driver probes asynchronously
    i=0
    while [ ! -e /sys/bus/pci/devices/$NVME/driver ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.05; done
fi
if [ "$BIND" = 1 ]; then
    bind_vfio $EDU || fail "cannot bind $EDU (edu) to vfio-pci"
    bind_vfio $NVME || fail "cannot bind $NVME (nvme) to vfio-pci"
fi
export USERPTR_IN_GUEST=1 USERPTR_VFIO_EDU=$EDU USERPTR_VFIO_NVME=$NVME USERPTR_GUEST_BOUND=$BIND
export USERPTR_GUEST_ACCEL="$ACCEL"
. /etc/vfio-guest-env.sh   # RUST_BACKTRACE=1 etc., then the forwarded and --env variables
for b in $EDU $NVME; do
    drv=$(readlink /sys/bus/pci/devices/$b/driver); drv=${drv##*/}
    echo "vfio-guest: $b $(cat /sys/bus/pci/devices/$b/vendor):$(cat /sys/bus/pci/devices/$b/device) iommu_group=$(basename "$(readlink /sys/bus/pci/devices/$b/iommu_group)") driver=${drv:-none}"
done
echo "vfio-guest: accelerator $USERPTR_GUEST_ACCEL; USERPTR_VFIO_EDU=$EDU USERPTR_VFIO_NVME=$NVME; /dev/vfio:"
ls -l /dev/vfio
cd "$GUEST_CWD" || fail "cannot cd to $GUEST_CWD"
echo "vfio-guest: running $* (in $GUEST_CWD)"
if [ -n "$RUN_UID" ]; then
    echo "root:x:0:0:root:/root:/bin/sh" > /etc/passwd
    echo "guest:x:$RUN_UID:$RUN_UID:guest:/tmp:/bin/sh" >> /etc/passwd
    printf 'root:x:0:\nguest:x:%s:\n' "$RUN_UID" > /etc/group
    chown "$RUN_UID:$RUN_UID" /dev/vfio/[0-9]* 2>/dev/null   # as a udev rule would
    su -p -s /bin/sh guest -c '/bin/sh /etc/vfio-guest-cmd.sh' </dev/null
else
    /bin/sh /etc/vfio-guest-cmd.sh </dev/null
fi
rc=$?
sync
echo
echo "$MARKER $rc@@"
echo "$MARKER $rc@@"
poweroff -f
INIT
chmod 755 "$extra/init"

(cd "$extra" && find . | LC_ALL=C sort | busybox cpio -o -H newc -R 0:0 2>/dev/null) | gzip -1 -n > "$run_dir/extra.cpio.gz" ||
    die "cannot build the initramfs"
cat "$cache/base.cpio.gz" "$run_dir/extra.cpio.gz" > "$run_dir/initramfs.cpio.gz"
rm -f "$run_dir/extra.cpio.gz"
rm -rf "$extra"
truncate -s 64M "$run_dir/nvme.img"

append="console=ttyS0 intel_iommu=on panic=-1 oops=panic"
[ "$verbose" = 1 ] || append="$append quiet"
append="$append ${USERPTR_GUEST_APPEND_EXTRA:-}"
qemu=(qemu-system-x86_64
    -machine q35,kernel-irqchip=split "${accel_args[@]}"
    -device intel-iommu,intremap=on,caching-mode=on
    ${USERPTR_GUEST_QEMU_EXTRA:-}
    -m "$mem" -smp "$smp" -nographic -no-reboot -vga none -net none
    -kernel "$cache/$kernel_image" -initrd "$run_dir/initramfs.cpio.gz" -append "$append"
    -device edu
    -drive file="$run_dir/nvme.img",if=none,id=nvm0,format=raw
    -device nvme,serial=userptr0,drive=nvm0,cmb_size_mb=2
    -virtfs local,path="$repo_root",mount_tag=host,security_model=none,multidevs=remap,id=host0)

log="$run_dir/console.log"
[ "$accel" = tcg ] && [ -n "$accel_why" ] && echo "vfio-guest: accelerator tcg: $accel_why" >&2
echo "vfio-guest: booting QEMU ($accel, timeout ${timeout_s}s) for: $prog $*" >&2
# The console is streamed as it comes, less carriage returns and SeaBIOS's
# terminal reset / clear screen / no-wrap sequences.
mkfifo "$run_dir/console"
sed -u 's/\r$//; s/\x1bc//g; s/\x1b\[?7l//g; s/\x1b\[2J//g; s/^\(Booting from ROM\.*\)\(.\)/\1\n\2/' \
    < "$run_dir/console" | tee "$log" &
reader=$!
timeout --kill-after=10 "$timeout_s" "${qemu[@]}" </dev/null >"$run_dir/console" 2>&1 &
qpid=$!
wait "$qpid"
qemu_rc=$?
qpid=""
wait "$reader"

result=$(grep -a -o "$marker [^@]*@@" "$log" | head -n1 | sed "s/^$marker //; s/@@\$//")
case "$result" in
    [0-9]*) exit "$result" ;;
    setup-failed) echo "vfio-guest: error: the guest's bring-up failed (see the console above)" >&2; exit 125 ;;
esac
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    echo "vfio-guest: error: timed out after ${timeout_s}s before the guest reported an exit code" >&2
    exit 124
fi
if grep -aq "Kernel panic" "$log"; then
    echo "vfio-guest: error: the guest kernel panicked (QEMU exit $qemu_rc)" >&2
else
    echo "vfio-guest: error: the guest never reported an exit code (QEMU exit $qemu_rc)" >&2
fi
exit 125
