#!/usr/bin/env bash
# Prepares what tools/vfio-guest/run.sh needs to boot a QEMU guest with a real
# kernel VFIO stack: QEMU and a static busybox (Debian packages), plus a guest
# kernel and just the modules it needs, taken out of Debian's kernel package.
#
# Everything goes into target/vfio-guest/ under the repository root. Idempotent:
# when the cache is complete and was made by this version of the script, it
# returns at once without touching apt.
#
#   tools/vfio-guest/setup.sh            # prepare (no-op when already done)
#   tools/vfio-guest/setup.sh --refresh  # re-resolve and re-extract the kernel
#
# Environment:
#   USERPTR_GUEST_KERNEL_PKG  kernel package to use instead of the one that
#                             linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
cache="$repo_root/target/vfio-guest"
stamp="$cache/setup.stamp"

refresh=0
for arg in "$@"; do
    case "$arg" in
        --refresh) refresh=1 ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "vfio-guest setup: $*" >&2; }
die() { echo "vfio-guest setup: error: $*" >&2; exit 1; }

# The stamp records the hash of this script: editing the module list or the
# layout below invalidates the cache.
self_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

tools_present() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 && [ -x /bin/busybox ] &&
        ! ldd /bin/busybox >/dev/null 2>&1   # must be the static one
}

cache_complete() {
    [ -f "$stamp" ] && [ "$(sed -n 's/^setup=//p' "$stamp")" = "$self_hash" ] &&
        [ -f "$cache/$(sed -n 's/^kernel_image=//p' "$stamp")" ] && [ -f "$cache/base.cpio.gz" ] &&
        [ -f "$cache/modules/core.list" ]
}

if [ "$refresh" = 0 ] && tools_present && cache_complete; then
    exit 0
fi

# One setup at a time (two test runs may start together): the second waits,
# then finds the work done.
mkdir -p "$cache"
exec 9>"$cache/.setup.lock"
flock 9
if [ "$refresh" = 0 ] && tools_present && cache_complete; then
    exit 0
fi

if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
apt_lists_fresh=0
apt_update_once() {
    if [ "$apt_lists_fresh" = 0 ]; then
        log "apt-get update"
        "${sudo[@]}" apt-get update -qq >&2
        apt_lists_fresh=1
    fi
}

# --- host packages -----------------------------------------------------------
if ! tools_present; then
    log "installing qemu-system-x86 busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static >&2; then
        apt_update_once
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static >&2
    fi
    tools_present || die "qemu-system-x86_64 or a static /bin/busybox is still missing after apt-get install"
fi

# --- guest kernel --------------------------------------------------------------
mkdir -p "$cache"
kpkg=${USERPTR_GUEST_KERNEL_PKG:-}
resolve_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
if [ -z "$kpkg" ]; then
    kpkg=$(resolve_kpkg)
    if [ -z "$kpkg" ]; then
        apt_update_once
        kpkg=$(resolve_kpkg)
    fi
    [ -n "$kpkg" ] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-cache depends linux-image-amd64)"
fi
log "guest kernel package: $kpkg"

dl=$(mktemp -d "$cache/dl.XXXXXX")
trap 'rm -rf "$dl"' EXIT
apt_opts=()
[ "$(id -u)" = 0 ] && apt_opts=(-o APT::Sandbox::User=root)   # silence the _apt sandbox warning
if ! (cd "$dl" && apt-get download -qq "${apt_opts[@]}" "$kpkg" >&2); then
    apt_update_once
    (cd "$dl" && apt-get download -qq "${apt_opts[@]}" "$kpkg" >&2) || die "apt-get download $kpkg failed"
fi
deb=$(ls "$dl"/*.deb)
kver=${kpkg#linux-image-}
stage="$dl/x"
mkdir -p "$stage"

# Module names as given to the guest's insmod, in the groups run.sh loads.
# core: the VFIO stack and the virtio-9p share of the repository.
# nvme: the guest's own NVMe driver, loaded only on request (run.sh --nvme-driver)
#       so a bring-up tool's unbind-from-kernel-driver path can be exercised.
core_roots=(vfio vfio_iommu_type1 vfio_pci virtio_pci 9pnet_virtio 9p)
nvme_roots=(crct10dif_generic crc64_rocksoft_generic nvme)

norm() { echo "${1//-/_}"; }

# Extract with tar wildcards (one pass over the .deb each time).
extract() { dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$stage" --wildcards "$@" 2>/dev/null || true; }

log "extracting vmlinuz and modules from $(basename "$deb")"
extract "./boot/vmlinuz-$kver" "./boot/config-$kver" "./lib/modules/$kver/modules.builtin" \
    "./lib/modules/$kver/kernel/drivers/vfio/*" "./lib/modules/$kver/kernel/virt/*" \
    "./lib/modules/$kver/kernel/drivers/virtio/*" "./lib/modules/$kver/kernel/net/9p/*" \
    "./lib/modules/$kver/kernel/fs/9p/*" "./lib/modules/$kver/kernel/fs/netfs/*" \
    "./lib/modules/$kver/kernel/fs/fscache/*" "./lib/modules/$kver/kernel/drivers/nvme/host/*" \
    "./lib/modules/$kver/kernel/block/*" "./lib/modules/$kver/kernel/lib/*" \
    "./lib/modules/$kver/kernel/crypto/crc*"
[ -f "$stage/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
moddir="$stage/lib/modules/$kver"
builtin_list="$moddir/modules.builtin"

# find_ko NAME -> path of NAME.ko[.xz|.zst|.gz] in the stage (names compare with - == _)
declare -A ko_index=()
index_stage() {
    local f b
    ko_index=()
    while read -r f; do
        b=$(basename "$f"); b=${b%%.ko*}; b=${b//-/_}
        ko_index[$b]="$f"
    done < <(find "$moddir" -name '*.ko*' 2>/dev/null)
}
index_stage
find_ko() { echo "${ko_index[$(norm "$1")]:-}"; }
is_builtin() {
    [ -f "$builtin_list" ] && sed 's#.*/##; s#\.ko$##; s#-#_#g' "$builtin_list" | grep -qx "$(norm "$1")"
}

# Decompressed copy of a module in $dl/ko/NAME.ko
declare -A ko_path=()
declare -A visiting=() done_=()
ordered=()
mkdir -p "$dl/ko"
load_ko() {   # NAME [SEARCH_ALL] -> sets ko_path[NAME] or returns 1 (caller handles built in / missing)
    local name="$1" search_all="${2:-1}" n f out
    n=$(norm "$name")
    [ -n "${ko_path[$n]:-}" ] && return 0
    f=$(find_ko "$name")
    if [ -z "$f" ] && [ "$search_all" = 1 ] && ! is_builtin "$name"; then
        log "  $name: not in the usual directories, searching the whole package"
        # Not in the subtrees extracted above: look for it anywhere in the package.
        extract "./lib/modules/$kver/kernel/*/$name.ko*" "./lib/modules/$kver/kernel/*/$(norm "$name").ko*" \
            "./lib/modules/$kver/kernel/*/${name//_/-}.ko*"
        index_stage
        f=$(find_ko "$name")
    fi
    [ -n "$f" ] || return 1
    out="$dl/ko/$n.ko"
    case "$f" in
        *.ko) cp "$f" "$out" ;;
        *.ko.xz) xz -dc "$f" > "$out" ;;
        *.ko.zst) zstd -qdc "$f" > "$out" ;;
        *.ko.gz) gzip -dc "$f" > "$out" ;;
        *) die "unknown module compression: $f" ;;
    esac
    ko_path[$n]="$out"
}
modinfo_field() { tr '\0' '\n' < "$1" | sed -n "s/^$2=//p"; }

# Depth-first post-order: dependencies come before their users.
visit() {
    local name="$1" optional="${2:-0}" n deps d soft
    n=$(norm "$name")
    [ -n "${done_[$n]:-}" ] && return 0
    [ -n "${visiting[$n]:-}" ] && die "module dependency cycle at $n"
    if ! load_ko "$name" "$([ "$optional" = 1 ] && echo 0 || echo 1)"; then
        if is_builtin "$name"; then log "  $n: built into the kernel"; done_[$n]=builtin; return 0; fi
        [ "$optional" = 1 ] && { done_[$n]=absent; return 0; }
        die "module $name is neither in $kpkg nor built in"
    fi
    visiting[$n]=1
    # softdep "pre:" names first, where they are real module files (aliases are skipped)
    soft=$(modinfo_field "${ko_path[$n]}" softdep | sed -n 's/^pre: *//p')
    for d in $soft; do visit "$d" 1; done
    deps=$(modinfo_field "${ko_path[$n]}" depends | tr ',' ' ')
    for d in $deps; do visit "$d"; done
    unset "visiting[$n]"
    done_[$n]=module
    ordered+=("$n")
}

out_mods="$dl/modules"
mkdir -p "$out_mods"
for group in core nvme; do
    ordered=()
    if [ "$group" = core ]; then roots=("${core_roots[@]}"); else roots=("${nvme_roots[@]}"); fi
    for r in "${roots[@]}"; do visit "$r" "$([ "$group" = nvme ] && echo 1 || echo 0)"; done
    : > "$out_mods/$group.list"
    for n in "${ordered[@]}"; do
        cp "${ko_path[$n]}" "$out_mods/$n.ko"
        echo "$n" >> "$out_mods/$group.list"
    done
    log "  $group modules (load order): $(tr '\n' ' ' < "$out_mods/$group.list")"
done

# --- base initramfs: static busybox + the modules (run.sh appends /init, the
# program's libraries and its command line as a second cpio archive) ----------
root="$dl/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$out_mods"/* "$root/lib/modules/"
# No /dev/console node (mknod needs root): /init mounts devtmpfs and reopens it.
(cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$dl/base.cpio"
gzip -6 -n -c "$dl/base.cpio" > "$dl/base.cpio.gz"

# --- kernel image: the uncompressed ELF vmlinux when the kernel has a PVH entry
# point (QEMU then loads it directly: ~4 s faster than letting the bzImage
# decompress itself under TCG); otherwise the bzImage as is. -------------------
kernel_image=vmlinuz
if grep -qx 'CONFIG_PVH=y' "$stage/boot/config-$kver" 2>/dev/null; then
    bz="$stage/boot/vmlinuz-$kver"
    for magic in xz:'\xfd\x37\x7a\x58\x5a' zstd:'\x28\xb5\x2f\xfd' gzip:'\x1f\x8b\x08'; do
        tool=${magic%%:*}
        # byte offsets of the magic (grep -b on binary data); the first that
        # decompresses to an ELF file is the kernel
        for off in $(LC_ALL=C grep -abo "$(printf "${magic#*:}")" "$bz" 2>/dev/null | cut -d: -f1 | head -n 5 || true); do
            # (the compressed stream is followed by more of the bzImage: the
            # decompressor complains about trailing garbage after writing it all)
            case "$tool" in
                xz) tail -c +$((off + 1)) "$bz" | xz -dc > "$dl/vmlinux" 2>/dev/null || true ;;
                zstd) tail -c +$((off + 1)) "$bz" | zstd -qdc > "$dl/vmlinux" 2>/dev/null || true ;;
                gzip) tail -c +$((off + 1)) "$bz" | gzip -dc > "$dl/vmlinux" 2>/dev/null || true ;;
            esac
            if [ "$(head -c 4 "$dl/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                kernel_image=vmlinux; break 2
            fi
        done
    done
fi
log "  kernel image: $kernel_image"

# --- publish ---------------------------------------------------------------------
rm -rf "$cache/modules" "$cache/vmlinuz" "$cache/vmlinux" "$cache/base.cpio.gz" "$stamp"
if [ "$kernel_image" = vmlinux ]; then mv "$dl/vmlinux" "$cache/vmlinux"; else cp "$stage/boot/vmlinuz-$kver" "$cache/vmlinuz"; fi
mv "$out_mods" "$cache/modules"
mv "$dl/base.cpio.gz" "$cache/base.cpio.gz"
{
    echo "setup=$self_hash"
    echo "kernel_pkg=$kpkg"
    echo "kernel_deb=$(basename "$deb")"
    echo "kernel_image=$kernel_image"
    echo "qemu=$(qemu-system-x86_64 --version | head -n1)"
    echo "busybox=$(busybox 2>&1 | head -n1)"
} > "$stamp"
log "ready in $cache ($(du -shc "$cache/$kernel_image" "$cache/base.cpio.gz" "$cache/modules" | tail -n1 | cut -f1)): $(sed -n 's/^kernel_deb=//p' "$stamp")"
