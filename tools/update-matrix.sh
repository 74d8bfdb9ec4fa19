#!/usr/bin/env bash
# Regenerate the README's monitor coverage matrix from the tests: runs
# tests/monitor_matrix.rs (each source x path in a child process) and pastes the
# table it prints between the README's matrix markers.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/monitor-matrix.md
USERPTR_MATRIX_OUT="$out" cargo test -q --test monitor_matrix coverage_matrix >/dev/null
python3 - "$out" <<'PY'
import sys, re
table = open(sys.argv[1]).read().strip()
readme = open("README.md").read()
new = re.sub(r"<!-- matrix:begin -->.*?<!-- matrix:end -->",
             lambda m: "<!-- matrix:begin -->\n" + table + "\n<!-- matrix:end -->", readme, flags=re.S)
open("README.md", "w").write(new)
PY
echo "README matrix updated from $out"
