#!/usr/bin/env bash
# The C API from C and C++, as ./test.sh runs it: build the libraries with the dev profile
# (`cargo test` builds the crate's rlib only: it never leaves the cdylib and the staticlib
# in target/debug) and install them under target/capi (capi/install.sh --debug), build the
# C example against the shared library and against the static one, both through
# pkg-config, and the C++ check against the shared one, with the system compilers and
# every warning an error; run them (the example also with the seccomp and the
# userfaultfd monitor).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$PWD/target/capi
capi/install.sh --debug "$prefix"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
bin=$prefix/bin
mkdir -p "$bin"
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -O1 -ffp-contract=off)
# shellcheck disable=SC2046  # pkg-config prints several words on purpose
cc "${cflags[@]}" capi/examples/userptr_example.c $(pkg-config --cflags --libs userptr) \
    -Wl,-rpath,"$prefix/lib" -o "$bin/userptr_example"
# shellcheck disable=SC2046
cc "${cflags[@]}" capi/examples/userptr_example.c $(pkg-config --cflags --libs userptr-static) \
    -o "$bin/userptr_example_static"
# shellcheck disable=SC2046
c++ -std=c++17 -Wall -Wextra -Werror -pedantic capi/examples/compile_check.cpp \
    $(pkg-config --cflags --libs userptr) -Wl,-rpath,"$prefix/lib" -o "$bin/compile_check"
if ldd "$bin/userptr_example_static" | grep -q userptr_capi; then
    echo "capi/test-c.sh: the static example links the shared library" >&2
    exit 1
fi
"$bin/userptr_example"
"$bin/userptr_example_static"
"$bin/userptr_example" seccomp
"$bin/userptr_example" uffd
"$bin/compile_check"
echo "capi/test-c.sh: 5 passed, 0 failed"
