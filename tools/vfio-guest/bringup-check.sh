#!/bin/sh
# Runs INSIDE the guest (busybox sh): the bring-up subcommands against both devices,
# on the real kernel VFIO stack. Usage: bringup-check.sh PATH/TO/userptr
# Every step must succeed; the first failure stops the script with its exit code.
set -e
U="$1"
[ -x "$U" ] || { echo "bringup-check: no userptr binary at '$U'" >&2; exit 2; }
: "${USERPTR_VFIO_EDU:?not in the guest}" "${USERPTR_VFIO_NVME:?not in the guest}"
step() { echo; echo "== userptr $*"; "$U" "$@"; }

# The readiness overview: in the guest every VFIO line is ready.
step status
step status --json > /tmp/status.json
for want in '"ready": true' '"name": "IOMMU"' '"name": "vfio-pci"'; do
  grep -q "$want" /tmp/status.json || { echo "status --json: no $want" >&2; exit 1; }
done
grep -A2 '"name": "IOMMU"' /tmp/status.json | grep -q '"state": "ok"' || { echo "status: the guest's IOMMU groups not seen" >&2; exit 1; }
step list
step list --json > /tmp/list.json
grep -q '"usable": true' /tmp/list.json || { echo "list --json shows no usable device" >&2; exit 1; }
# unbind gives the device back (edu has no guest driver: it ends unbound); bind takes it again.
step unbind "$USERPTR_VFIO_EDU"
if [ -e "/sys/bus/pci/devices/$USERPTR_VFIO_EDU/driver" ]; then
  d=$(basename "$(readlink "/sys/bus/pci/devices/$USERPTR_VFIO_EDU/driver")")
  [ "$d" != vfio-pci ] || { echo "edu still on vfio-pci after unbind" >&2; exit 1; }
fi
step bind "$USERPTR_VFIO_EDU"
d=$(basename "$(readlink "/sys/bus/pci/devices/$USERPTR_VFIO_EDU/driver")")
[ "$d" = vfio-pci ] || { echo "edu on '$d' after bind, not vfio-pci" >&2; exit 1; }
step info "$USERPTR_VFIO_EDU"
step info "$USERPTR_VFIO_NVME" --json
# The kernel prints IOMMU faults rate-limited (10 lines per 5 s) and the fault checks
# read them back: start each fault-producing step with a fresh window.
sleep 5
step dma-test "$USERPTR_VFIO_EDU"
sleep 5
step dma-test "$USERPTR_VFIO_NVME" --json
step ring-test "$USERPTR_VFIO_NVME" --commands 300
# The bench suites in their VFIO form, on the same function: every suite must report,
# under the contract's names, with the raw VFIO map/unmap as the pin baseline.
step bench --device "$USERPTR_VFIO_NVME" --quick --samples 3 --json /tmp/bench.json
for want in '"device": "vfio ' '"suite": "pin"' '"name": "map_unmap_2MiB"' 'vfio_map_unmap_dma_2MiB' \
  '"name": "fence_roundtrip"' '"name": "hit_per_ref"' '"name": "idle_2MiB_discard"' \
  '"name": "busy_2MiB_discard"' '"name": "nvme_read4k_qd1"'; do
  grep -q "$want" /tmp/bench.json || { echo "bench --device: no $want in its JSON" >&2; exit 1; }
done
echo
echo "bringup-check: all steps passed"
