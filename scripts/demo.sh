#!/usr/bin/env bash
# The x2x demo: a 256 MiB source replicated through a local Apache Kafka, changed by 1%,
# replicated again; source and target digests compared. Every number printed is measured.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${X2X_DEMO_DIR:-$here/demo-data}
rm -rf "$work" && mkdir -p "$work"
export X2X_HOME="$work/home"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
trap 'x2x broker down >/dev/null 2>&1 || true' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ %s\n' "$*"; "$@"; }

step "start the broker (Apache Kafka in KRaft mode, log on disk under \$X2X_HOME)"
run x2x broker up --port "$port"

step "make a 256 MiB source image: 40% random data, the rest zeros"
python - "$work/source.img" <<'PY'
import random, sys
rng = random.Random(42)
with open(sys.argv[1], "wb") as f:
    f.truncate(256 << 20)
    for off in range(0, 256 << 20, 1 << 20):
        if rng.random() < 0.4:
            f.seek(off); f.write(rng.randbytes(1 << 20))
PY

step "create the pair"
run x2x pair create demo --source "$work/source.img" --target "$work/target.img" --create-target
run x2x pair list

step "baseline: capture, then apply"
run x2x capture demo --once
run x2x apply demo --until-caught-up

step "change 1% of the source (random 4 KiB blocks)"
python - "$work/source.img" <<'PY'
import random, sys
rng = random.Random(7)
blocks = (256 << 20) // 4096
with open(sys.argv[1], "r+b") as f:
    for i in rng.sample(range(blocks), blocks // 100):
        f.seek(i * 4096); f.write(rng.randbytes(4096))
print(f"changed {blocks // 100} blocks = {blocks // 100 * 4096 / 2**20:.1f} MiB")
PY

step "incremental: only changed blocks travel"
run x2x capture demo --once
run x2x apply demo --until-caught-up

step "status: lag and RPO from journal seqs and heartbeats"
run x2x status

step "compare digests"
src=$(x2x volume digest "$work/source.img" | cut -d' ' -f1)
dst=$(x2x volume digest "$work/target.img" | cut -d' ' -f1)
echo "source $src"
echo "target $dst"
if [ "$src" = "$dst" ]; then echo "OK: target equals source byte for byte"; else echo "MISMATCH"; exit 1; fi
