#!/usr/bin/env bash
# Regenerate the README's monitor coverage matrix from the tests: runs
# tests/monitor_matrix.rs (each (source, path) pair in a child process of its own)
# and pastes the table it prints between the README's matrix markers. A failing
# matrix test leaves the README as it is (the table it measured is still written to
# target/monitor-matrix.md, for a look).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/monitor-matrix.md
rm -f "$out"
cargo build -q -p userptr-preload    # the LD_PRELOAD shim the preload column loads
if ! USERPTR_MATRIX_OUT="$out" cargo test -q --test monitor_matrix coverage_matrix >/dev/null 2>&1; then
    echo "the matrix test failed: README not updated (the measured table is in $out);" >&2
    echo "run: cargo test --test monitor_matrix coverage_matrix" >&2
    exit 1
fi
python3 - "$out" <<'PY'
import sys, re
table = open(sys.argv[1]).read().strip()
readme = open("README.md").read()
new = re.sub(r"<!-- matrix:begin -->.*?<!-- matrix:end -->",
             lambda m: "<!-- matrix:begin -->\n" + table + "\n<!-- matrix:end -->", readme, flags=re.S)
open("README.md", "w").write(new)
PY
echo "README matrix updated from $out"
