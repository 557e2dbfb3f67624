#!/usr/bin/env bash
# Installs the system tools a fresh Debian machine lacks: venv, a C++ toolchain, CMake, Ninja,
# Chromium for the browser test of the HTML report (pytest never installs anything), and a
# font that covers Chinese, so the plan's Chinese prompt and outputs are not tofu boxes:
# fonts-wqy-microhei (1.6 MB download, 5 MB installed; 20,932 of the 20,992 codepoints of
# U+4E00-U+9FFF, simplified and traditional) rather than fonts-noto-cjk (57 MB, 91 MB).
set -euo pipefail
need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v c++ >/dev/null || need+=(g++)
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v make >/dev/null || need+=(make)
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null || need+=(chromium)
command -v fc-list >/dev/null || need+=(fontconfig)
[ -n "$(fc-list :lang=zh 2>/dev/null)" ] || need+=(fonts-wqy-microhei)
[ ${#need[@]} -eq 0 ] && exit 0
echo "bootstrap: installing ${need[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
