#!/usr/bin/env bash
# Install the C API under PREFIX: lib/libuserptr_capi.{so,a}, include/userptr.h and the
# pkg-config files lib/pkgconfig/userptr.pc (shared) and userptr-static.pc (static).
#
#   capi/install.sh [--debug] [--no-build] PREFIX
#
# Builds userptr-capi with `cargo build --release` first (--debug: the dev profile;
# --no-build: take the libraries already in the target directory, left there by an
# earlier `cargo build -p userptr-capi`; `cargo test` leaves only the rlib). Then, e.g.:
#   PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc app.c $(pkg-config --cflags --libs userptr)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release build=1
while [[ $# -gt 1 ]]; do
    case $1 in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        *) echo "usage: capi/install.sh [--debug] [--no-build] PREFIX" >&2; exit 2 ;;
    esac
    shift
done
[[ $# -eq 1 && $1 != -* ]] || { echo "usage: capi/install.sh [--debug] [--no-build] PREFIX" >&2; exit 2; }
prefix=$(realpath -m "$1")
if [[ $build == 1 ]]; then
    if [[ $profile == release ]]; then cargo build --release -p userptr-capi; else cargo build -p userptr-capi; fi
fi
libs=${CARGO_TARGET_DIR:-target}/$profile
for f in libuserptr_capi.so libuserptr_capi.a; do
    [[ -f $libs/$f ]] || { echo "capi/install.sh: $libs/$f is missing (build userptr-capi first)" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
# What a Rust staticlib needs from the system on Linux/glibc (rustc --print native-static-libs).
native_static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$libs/libuserptr_capi.so" "$prefix/lib/"
install -m 0644 "$libs/libuserptr_capi.a" "$prefix/lib/"
install -m 0644 include/userptr.h "$prefix/include/"
for pc in userptr userptr-static; do
    sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" \
        -e "s|@NATIVE_STATIC_LIBS@|$native_static_libs|" "capi/$pc.pc.in" >"$prefix/lib/pkgconfig/$pc.pc"
done
echo "capi/install.sh: installed userptr $version ($profile) under $prefix"
