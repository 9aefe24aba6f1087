#!/usr/bin/env bash
# The release build that ships: `cargo build --release`, optimised with the profile the
# gateway's own traffic left in pgo/wsgate.profdata (profile-guided optimisation).
# The Docker image and the benchmarks are built with it.
#
#   pgo/build.sh                                        # target/release/wsgate
#   pgo/build.sh --target x86_64-unknown-linux-gnu      # any other cargo build argument
#
# RUSTFLAGS set by the caller are kept. A profile older than the code still builds: a
# function whose code changed since the profile was made is optimised without counts,
# as in a plain release build, and named in a "function control flow change detected"
# warning (pgo/train.sh makes the profile anew).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-Cprofile-use=$HERE/wsgate.profdata"
exec cargo build --release --manifest-path "$HERE/../Cargo.toml" "$@"
