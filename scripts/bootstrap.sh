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

# The install takes about 6 GB (torch's CUDA libraries most of it). Nothing is kept in
# pip's cache: the wheels would take as much again on the same disk.
need_gb=7
free_gb=$(df -Pk "$venv" | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "${free_gb:-0}" -lt "$need_gb" ]; then
    echo "bootstrap: warning: ${free_gb} GB free on the disk of $venv; the install needs about $need_gb GB" >&2
fi
pip_install() {
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q "$@" ||
        die "pip install $* failed ($(df -Pk "$venv" | awk 'NR == 2 { print int($4 / 1048576) }') GB now free on the disk of $venv, about $need_gb GB needed); its message is above"
}
echo "bootstrap: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv (first time: a few minutes, ~6 GB)" >&2
pip_install -r "$req"
pip_install --no-deps -r "$nodeps"

# A relative link, so the checkout can move.
site=$("$venv/bin/python" -c 'import torch, os, sys; print(os.path.relpath(os.path.dirname(torch.__file__), sys.prefix))')
ln -sfn "$site" "$venv/libtorch"
echo "$want" > "$stamp"
echo "bootstrap: libtorch at $site" >&2
