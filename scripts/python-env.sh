#!/usr/bin/env bash
# Builds a virtualenv with uv, from the lock or from the newest releases, and refreshes the lock.
#
#   scripts/python-env.sh locked VENV   what CI and `make` use: exactly requirements.txt
#   scripts/python-env.sh install VENV  the same set with this checkout installed as a copy
#                                       (not editable): the plugin as another repository sees it
#   scripts/python-env.sh latest VENV   newest releases pyproject.toml allows (make test-latest)
#   scripts/python-env.sh lock [--upgrade]  re-resolve requirements.txt: keep the pins that
#                                       still fit (make lock), or take the newest (make lock-upgrade)
#
# uv is itself pinned by hash (requirements-uv.txt) and installed with the venv's pip. uv
# reads no pip.conf, so the index, extra indexes, find-links and CA file that this
# machine's pip is configured for are handed to it: the lock installs wherever pip would.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: python-env.sh locked|install|latest VENV | lock}
python=${PYTHON:-python3}

pip_setting() {  # the value pip would use for a setting: environment first, then its config files
  "$python" -m pip config list 2>/dev/null |
    sed -n "s/^\(:env:\|global\|install\)\.$1='\(.*\)'\$/\2/p" | head -n 1
}
export_pip_index_to_uv() {
  local index extra links cert
  index=$(pip_setting index-url)
  extra=$(pip_setting extra-index-url)
  links=$(pip_setting find-links)
  cert=$(pip_setting cert)
  [ -n "$index" ] && export UV_INDEX_URL="$index"
  [ -n "$extra" ] && export UV_EXTRA_INDEX_URL="$extra"
  [ -n "$links" ] && export UV_FIND_LINKS="${links// /,}"
  [ -n "$cert" ] && [ -z "${SSL_CERT_FILE:-}" ] && export SSL_CERT_FILE="$cert"
  # Several indexes may carry the same release; the hashes in the lock decide which file is
  # acceptable, so let uv take the pinned version from whichever index has it.
  export UV_INDEX_STRATEGY=unsafe-best-match
  return 0
}

make_venv() {  # a new venv with pip (fq fetches models with `python -m pip download`) and uv
  local venv=$1
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
    -r requirements-uv.txt
}

export_pip_index_to_uv
case "$mode" in
  locked)
    venv=${2:?usage: python-env.sh locked VENV}
    make_venv "$venv"
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --require-hashes \
      -r requirements.txt
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps -e .
    ;;
  install)  # what a user of another repository gets: the locked set, this checkout copied in
    venv=${2:?usage: python-env.sh install VENV}
    make_venv "$venv"
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --require-hashes \
      -r requirements.txt
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps .
    ;;
  latest)
    venv=${2:?usage: python-env.sh latest VENV}
    make_venv "$venv"
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --upgrade -e '.[test]'
    echo "newest releases installed in $venv; differences from the lock:" >&2
    "$venv/bin/uv" pip freeze --quiet --python "$venv/bin/python" --exclude-editable |
      grep -v -x -F -f <(sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' requirements.txt) \
      | grep -v -E "^(uv|pip|setuptools)==" >&2 || echo "  none" >&2
    ;;
  lock)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
      -r requirements-uv.txt
    shift
    UV_CUSTOM_COMPILE_COMMAND="make lock" "$tmp/venv/bin/uv" pip compile pyproject.toml \
      --extra test --universal --generate-hashes --quiet -o requirements.txt "$@"
    echo "requirements.txt re-resolved; review with: git diff requirements.txt" >&2
    ;;
  *)
    echo "python-env.sh: unknown mode '$mode' (locked, install, latest or lock)" >&2
    exit 2
    ;;
esac
