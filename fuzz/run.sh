#!/usr/bin/env bash
# Runs the fuzz targets with cargo-fuzz (nightly), one at a time.
#
#   fuzz/run.sh TARGET SECONDS [LIBFUZZER_FLAGS...]
#
# TARGET is vring, bus, mmio, elf, checks, hypercalls, dma, sharenet, or `all` for each in
# turn. Each runs for SECONDS, starting from its committed seeds
# (fuzz/seeds/TARGET) and what earlier runs found (fuzz/corpus/TARGET, not
# committed). Extra flags go to libFuzzer: `fuzz/run.sh vring 0
# -runs=10000000` runs ten million inputs instead of for a time (SECONDS 0 means no time limit). A finding stops the
# run with a non-zero status and leaves its input in fuzz/artifacts/TARGET/.
#
# Needs the nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly --profile minimal
#   cargo install cargo-fuzz --locked
#
# FUZZ_SANITIZER picks the sanitizer (default none: see docs/reliability.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
TARGETS=(vring bus mmio elf checks hypercalls dma sharenet)

usage() {
  echo "usage: fuzz/run.sh {$(IFS='|'; echo "${TARGETS[*]}")|all} SECONDS [LIBFUZZER_FLAGS...]" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
target=$1
seconds=$2
shift 2
[[ $seconds =~ ^[0-9]+$ ]] || usage
if [[ $target == all ]]; then
  run=("${TARGETS[@]}")
elif [[ " ${TARGETS[*]} " == *" $target "* ]]; then
  run=("$target")
else
  usage
fi

sanitizer=${FUZZ_SANITIZER:-none}
# Built once for every target: release, with debug assertions and overflow
# checks on (cargo-fuzz's default), so an overflow is a finding too.
cargo +nightly fuzz build --sanitizer "$sanitizer"
for t in "${run[@]}"; do
  printf '\n== fuzz %s (%ss)\n' "$t" "$seconds"
  mkdir -p "corpus/$t" "seeds/$t"
  # -timeout: an input that takes 10 s is a hang, and a finding.
  cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "$@"
done
