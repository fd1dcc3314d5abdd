#!/usr/bin/env bash
# Creates (idempotently) a separate Python environment holding the ORIGINAL hivemind 1.1.12 from PyPI, used only as
# a black-box peer by the interop tests (tests/interop) and by benchmarks/compare.py.
#
#   bash tests/interop/setup_original_env.sh          # create or reuse  <repo>/.interop/venv
#   bash tests/interop/setup_original_env.sh --force  # rebuild from scratch
#
# Torch is several GB, so it is not installed again: the environment reuses the torch of an existing interpreter
# (HIVEMIND_TORCH_PYTHON, default <repo>/.venv/bin/python) through a .pth file appended AFTER the environment's own
# site-packages, so the original's own pins (numpy<2.4, protobuf, pydantic, ...) always take precedence there.
# Only torch's site-packages directory is appended, never the repository root: our hivemind cannot be imported.
# Without such an interpreter, torch is installed into the environment from PyPI (slow, several GB).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
interop_dir=${HIVEMIND_INTEROP_DIR:-$repo/.interop}
venv=$interop_dir/venv
stamp=$interop_dir/ready.stamp
original_spec="hivemind==1.1.12"
stamp_text="$original_spec numpy<2.4 v1"
torch_python=${HIVEMIND_TORCH_PYTHON:-$repo/.venv/bin/python}
force=0
[ "${1:-}" = "--force" ] && force=1

mkdir -p "$interop_dir"
# several pytest workers or helpers may run this at once: one builds, the others wait and reuse
exec 9>"$interop_dir/.setup.lock"
flock -w 1200 9 || { echo "setup_original_env: timed out waiting for $interop_dir/.setup.lock" >&2; exit 1; }

check_env() {
  # runs in a neutral directory so that no hivemind package in the working directory can shadow the installed one
  (cd / && env -u PYTHONPATH PYTHONWARNINGS=ignore "$venv/bin/python" -s - "$venv" <<'EOF'
import os, sys
venv = os.path.realpath(sys.argv[1])
import hivemind, numpy, torch
from hivemind.proto import test_pb2  # noqa: F401
assert hivemind.__version__ == "1.1.12", f"expected the original hivemind 1.1.12, got {hivemind.__version__}"
assert os.path.realpath(hivemind.__file__).startswith(venv + os.sep), f"hivemind imported from {hivemind.__file__}"
p2pd = os.path.join(os.path.dirname(hivemind.__file__), "hivemind_cli", "p2pd")
assert os.access(p2pd, os.X_OK), f"the original's p2pd binary is missing: {p2pd}"
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4), f"numpy {numpy.__version__} is not < 2.4"
print(f"original hivemind {hivemind.__version__} at {os.path.dirname(hivemind.__file__)}; "
      f"torch {torch.__version__}, numpy {numpy.__version__}")
EOF
  )
}

if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ] && check_env; then
  exit 0
fi

start=$(date +%s)
rm -f "$stamp"
echo "setup_original_env: creating $venv with $original_spec" >&2

torch_site=""
if [ -x "$torch_python" ]; then
  torch_site=$(cd / && "$torch_python" -s -c \
    "import os, torch; print(os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__))))" 2>/dev/null || true)
fi
if [ -n "$torch_site" ]; then
  base_python=$torch_python  # same interpreter version, so torch's compiled extensions load
else
  base_python=${PYTHON:-python3}
  echo "setup_original_env: no torch found via $torch_python; torch will be installed from PyPI" >&2
fi

rm -rf "$venv"
"$base_python" -m venv "$venv"
log=$interop_dir/setup.log
: >"$log"
pip() {
  # output goes to the log (pip warns that torch is "not installed" before the .pth below exists); shown on failure
  "$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@" >>"$log" 2>&1 || {
    tail -n 40 "$log" >&2
    echo "setup_original_env: 'pip $*' failed (full log: $log)" >&2
    exit 1
  }
}
pip install --upgrade pip

# the package alone first, then its requirements minus torch (read from the wheel's metadata by importlib.metadata)
pip install --no-deps "$original_spec"
reqs=$interop_dir/requirements-original.txt
(cd / && "$venv/bin/python" -s - "$torch_site" >"$reqs" <<'EOF'
import re, sys
from importlib.metadata import requires
keep_torch = not sys.argv[1]
for req in requires("hivemind") or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if "extra ==" in req or (name == "torch" and not keep_torch):
        continue
    print(req)
print("numpy<2.4")  # the original's 8-bit codecs break on numpy >= 2.4
EOF
)
pip install -r "$reqs"

if [ -n "$torch_site" ]; then
  site=$(cd / && "$venv/bin/python" -s -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # .pth lines are appended to sys.path after site-packages: the environment's own packages win
  echo "$torch_site" >"$site/zzz_interop_torch.pth"
fi

check_env
echo "$stamp_text" >"$stamp"

cat >"$interop_dir/README.txt" <<EOF
Original hivemind 1.1.12 (black box, for interop tests and benchmark comparisons). Created by
  bash tests/interop/setup_original_env.sh      (add --force to rebuild; idempotent otherwise)

Run anything under the ORIGINAL library with this interpreter, from a directory that has no 'hivemind' package
(not the repository root, because python -c / -m put the working directory first on sys.path):
  cd /tmp && env -u PYTHONPATH $venv/bin/python -s -c 'import hivemind; print(hivemind.__version__, hivemind.__file__)'
  cd /tmp && env -u PYTHONPATH $venv/bin/python -s $repo/benchmarks/benchmark_tensor_compression.py
Scripts run by path are fine as long as their own directory has no 'hivemind' package (benchmarks/ has none).
Its p2pd binary is inside the package (hivemind/hivemind_cli/p2pd), and 'hivemind-dht' is $venv/bin/hivemind-dht.
Torch is borrowed from $torch_site (appended to sys.path after this environment's packages, which win).

Side by side with ours:  $repo/.venv/bin/python $repo/benchmarks/compare.py benchmarks/benchmark_p2p.py [args...]
Do not read the original's source; drive it only through its public API.
EOF

echo "setup_original_env: ready in $(($(date +%s) - start)) s" >&2
