#!/usr/bin/env bash
# Regenerates the golden app images in testdata/images/ from main.rs with the
# vendor tools (espflash, esptool). Needs rustc with the riscv32imc target,
# espflash and esptool on PATH. The .bin and .txt outputs are committed; the
# ELFs are not (they are rebuilt here in a temporary directory).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../images"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

elf() { # chip version project secure_version -> ELF path
  local chip=$1
  GOLDEN_VERSION=$2 GOLDEN_PROJECT=$3 GOLDEN_SECURE_VERSION=$4 \
    rustc --edition 2021 --target riscv32imc-unknown-none-elf -C panic=abort \
    -C opt-level=s -C link-arg="-T$here/link-$chip.x" -C link-arg=--gc-sections \
    --crate-type bin "$here/main.rs" -o "$tmp/$chip-$2.elf"
  echo "$tmp/$chip-$2.elf"
}

info() { # bin -> bin.txt (esptool's report, without its version banner)
  esptool image-info "$1" | grep -v '^esptool v' > "${1%.bin}.txt"
}

e=$(elf esp32c3 1.2.3 golden-esp32c3 2)
espflash save-image --chip esp32c3 "$e" "$out/esp32c3-espflash.bin"
esptool --chip esp32c3 elf2image -o "$out/esp32c3-esptool.bin" "$e"
esptool --chip esp32c3 elf2image --dont-append-digest -o "$out/esp32c3-esptool-nodigest.bin" "$e"

e=$(elf esp32c6 2.0.0-rc.1 golden-esp32c6 7)
espflash save-image --chip esp32c6 "$e" "$out/esp32c6-espflash.bin"

e=$(elf esp32c3 0.1.0 mqota-sample 0)
espflash save-image --chip esp32c3 "$e" "$out/sample-esp32c3.bin"

for b in "$out"/*.bin; do info "$b"; done
