#!/usr/bin/env bash
# Wheels (Python 3.12, manylinux x86-64) of the packages lorafleet needs that the GPU machine's
# image lacks, into .whl/ (git-ignored through .git/info/exclude), for bench_gpu.sh to install
# offline there. Versions: the ones this checkout's venv runs with.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PY=${PY:-.venv/bin/python}
pkgs=$("$PY" - <<'EOF'
from importlib.metadata import version
names = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "pydantic-settings",
         "python-dotenv", "redis", "structlog", "typing_extensions"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pkgs
ls .whl
