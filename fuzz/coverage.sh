#!/usr/bin/env bash
# Line coverage of the Host's code by one fuzz target's corpus and seeds:
#
#   fuzz/coverage.sh TARGET
#
# Replays fuzz/corpus/TARGET and fuzz/seeds/TARGET through a build with
# LLVM's source-based coverage, then prints llvm-cov's report for the Host
# files that target is about. Needs, besides what fuzz/run.sh needs:
#   rustup component add llvm-tools-preview --toolchain nightly
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
host=$(cd ../host/src && pwd)
case ${1:-} in
  vring) files=(virtio/queue.rs) ;;
  bus) files=(bus.rs virtio/mod.rs virtio/queue.rs) ;;
  mmio) files=(virtio/mmio.rs virtio/mod.rs virtio/queue.rs) ;;
  elf) files=(boot.rs) ;;
  checks) files=(interrupts.rs pagewalk.rs memory.rs) ;;
  *)
    echo "usage: fuzz/coverage.sh {vring|bus|mmio|elf|checks}" >&2
    exit 2
    ;;
esac
target=$1
mkdir -p "corpus/$target" "seeds/$target"
cargo +nightly fuzz coverage --sanitizer none "$target" "corpus/$target" "seeds/$target" >/dev/null
sysroot=$(rustc +nightly --print sysroot)
llvm_cov=$(find "$sysroot/lib/rustlib" -name llvm-cov -type f | head -n 1)
[[ -n $llvm_cov ]] || {
  echo "no llvm-cov: rustup component add llvm-tools-preview --toolchain nightly" >&2
  exit 1
}
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
"$llvm_cov" report "target/$triple/coverage/$triple/release/$target" \
  -instr-profile="coverage/$target/coverage.profdata" "${files[@]/#/$host/}"
