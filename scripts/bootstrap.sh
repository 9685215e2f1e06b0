#!/usr/bin/env bash
# Installs what the build and the tests need into the project-local .venv:
# torch==2.11.0 (its libtorch is what tch links) and the Python references the tests
# compare against. Idempotent: when the stamp matches requirements.txt it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
req=scripts/requirements.txt
nodeps=scripts/requirements-nodeps.txt
stamp=$venv/.bootstrap-stamp
want=$(cat "$req" "$nodeps" | cksum)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e "$venv/libtorch/lib" ]; then
    exit 0
fi

die() { echo "bootstrap: $*" >&2; exit 1; }
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "python3 not found; install Python 3.10+ (e.g. 'apt-get install python3 python3-venv python3-pip')"
"$python" -c 'import venv' 2>/dev/null || die "the Python venv module is missing; install it (e.g. 'apt-get install python3-venv')"

if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating $venv" >&2
    "$python" -m venv "$venv" || die "'$python -m venv $venv' failed; install python3-venv"
fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || die "pip is missing in $venv; install python3-pip (or ensurepip)"

echo "bootstrap: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv (first time: a few minutes, ~5 GB)" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps -r "$nodeps"

# A relative link, so the checkout can move.
site=$("$venv/bin/python" -c 'import torch, os, sys; print(os.path.relpath(os.path.dirname(torch.__file__), sys.prefix))')
ln -sfn "$site" "$venv/libtorch"
echo "$want" > "$stamp"
echo "bootstrap: libtorch at $site" >&2
