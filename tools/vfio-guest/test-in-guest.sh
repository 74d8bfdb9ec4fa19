#!/usr/bin/env bash
# The VFIO end-to-end suite, run from ./test.sh: this machine's kernel has no VFIO, so
# the integration tests in tests/vfio.rs and the bring-up subcommands run inside a
# QEMU guest that has a real VFIO stack (emulated Intel IOMMU, QEMU's NVMe and edu).
# Installs what it needs (setup.sh), builds the test binary and the tool, boots one
# guest, and exits with the guest's result.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/vfio-guest/setup.sh
cargo build -p userptr-tools
cargo build --example nvme_vfio
out=$(cargo test --test vfio --no-run 2>&1) || { echo "$out" >&2; exit 1; }
bin=$(printf '%s\n' "$out" | sed -n 's/.*Executable tests\/vfio\.rs (\(.*\))$/\1/p' | tail -n 1)
[ -n "$bin" ] && [ -x "$bin" ] || { echo "test-in-guest: cannot find the tests/vfio.rs binary in:" >&2; echo "$out" >&2; exit 1; }
echo "test-in-guest: $bin, target/debug/userptr and examples/nvme_vfio in the guest (run.sh says the accelerator: kvm or tcg)"
exec tools/vfio-guest/run.sh --timeout "${USERPTR_GUEST_TIMEOUT:-420}" -- /bin/sh -c \
  "$bin --test-threads=1 && /bin/sh tools/vfio-guest/bringup-check.sh target/debug/userptr && target/debug/examples/nvme_vfio"
