#!/usr/bin/env bash
# CI: the newest torch the registry serves, installed the way a user installs spurfast (build
# isolation, no flags), must compile the C++ extension (with the C++ standard that torch's
# headers ask for) and pass a smoke subset of the tests. The main run pins an older torch, so
# without this a new torch release can break the build unseen.
#
# Everything lives in a temporary folder (venv, build cache) that is removed on exit.
# Needs network access to the registry (about 4 GB for a CUDA build of torch and its libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/spurfast-newest-torch.XXXXXX")
trap 'rm -rf "$work"' EXIT

python -m venv "$work/venv"
py="$work/venv/bin/python"
# This machine's pip config caps torch through a constraint file. A venv's own pip.conf
# overrides the global one for that venv only (pip reads global, then user, then site).
printf '[global]\nconstraint =\n' > "$work/venv/pip.conf"
"$py" -m pip install --quiet --upgrade torch
"$py" -m pip install --quiet -e "$repo[test]"
"$py" -c "import torch; print('newest-torch smoke: torch', torch.__version__, 'CUDA', torch.version.cuda)"

export SPURFAST_CACHE_DIR="$work/cache"  # a cold cache: this run must compile
"$py" -c "from spurfast._extension import build_extension; print(build_extension(force=True))"
echo "newest-torch smoke: compiled with $(grep -oh -- '-std=c++[0-9]*' "$SPURFAST_CACHE_DIR"/*/build.ninja | sort -u | tr '\n' ' ')"
"$py" -m pytest -q -p no:cacheprovider tests/test_extension.py tests/test_ops.py tests/test_capture.py

echo "newest-torch smoke: passed in $(( $(date +%s) - started )) s"
