#!/usr/bin/env bash
# The Python module as ./test.sh runs it: a virtualenv in target/pyenv with the pinned
# tools (python/requirements.txt: maturin, pytest, numpy; installed again only when that
# file changes), `maturin develop` of python/ into it, then pytest on python/tests.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$PWD/target/pyenv
stamp=$venv/requirements.installed
if [[ ! -x $venv/bin/python ]] || ! cmp -s python/requirements.txt "$stamp"; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements.txt
    cp python/requirements.txt "$stamp"
fi
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH
maturin develop --quiet -m python/Cargo.toml
python -m pytest -q -p no:cacheprovider python/tests
