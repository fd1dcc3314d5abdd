"""Build script: generates the protobuf modules and compiles the p2pd daemon from the Go sources in ./p2pd.

Both steps run for wheels, sdists-turned-wheels and editable installs (``pip install -e .``), writing into the
source tree so that an editable checkout sees the same files as an installed wheel. Nothing they produce is
committed to git.
"""

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "hivemind", "proto")
GO_SOURCE_DIR = os.path.join(HERE, "p2pd")
P2PD_TARGET = os.path.join(HERE, "hivemind", "hivemind_cli", "p2pd")
P2PD_STAMP = P2PD_TARGET + ".stamp"
P2PD_ENV_VAR = "HIVEMIND_P2PD_PATH"
MIN_GO_VERSION = (1, 20)


class BuildError(Exception):
    """A build step failed for a reason the user can fix; the message says how."""


def fail(message: str) -> None:
    bar = "=" * 100
    sys.stderr.write(f"\n{bar}\nhivemind build failed: {message}\n{bar}\n\n")
    sys.stderr.flush()
    raise SystemExit(1)


def generate_protobuf_modules() -> None:
    """Compile hivemind/proto/*.proto into *_pb2.py with grpcio-tools, using package-relative imports."""
    try:
        from grpc_tools import protoc
    except ImportError:
        fail("grpcio-tools is required to build hivemind (pip install grpcio-tools), or use `pip install .`")

    proto_files = sorted(glob.glob(os.path.join(PROTO_DIR, "*.proto")))
    include_dir = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include_dir}", f"--python_out={PROTO_DIR}", *proto_files]
    if protoc.main(args) != 0:
        fail(f"protoc could not compile {proto_files}")

    # protoc writes `import auth_pb2 as auth__pb2`; inside a package that must be a relative import
    for generated in glob.glob(os.path.join(PROTO_DIR, "*_pb2.py")):
        with open(generated) as f:
            code = f.read()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", code, flags=re.MULTILINE)
        if fixed != code:
            with open(generated, "w") as f:
                f.write(fixed)


# Our daemon (./p2pd) needs Go 1.20+: that is what go.mod declares and what its dependencies (go-libp2p v0.32.1,
# kad-dht v0.25.1, quic-go v0.39) require. It is tested with Go 1.20.14, 1.21.13 and 1.26.
GO_BUILD_FLAGS = ["-trimpath", "-buildvcs=false", "-ldflags=-s -w"]


def go_sources_digest(go_version: str) -> str:
    """A fingerprint of everything the daemon binary is built from: our Go sources, go.mod/go.sum, the toolchain."""
    digest = hashlib.sha256(go_version.encode())
    digest.update(" ".join(GO_BUILD_FLAGS).encode())
    for path in sorted(glob.glob(os.path.join(GO_SOURCE_DIR, "**", "*"), recursive=True)):
        if os.path.isfile(path) and (path.endswith(".go") or os.path.basename(path) in ("go.mod", "go.sum")):
            digest.update(os.path.relpath(path, GO_SOURCE_DIR).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def find_go_toolchain() -> str:
    """The `go` command to build p2pd with; stops the installation with a clear message if it is missing or old."""
    go = shutil.which("go")
    if go is None:
        fail(
            "the Go toolchain was not found on PATH; it is needed to compile the p2pd daemon.\n"
            f"Install Go {MIN_GO_VERSION[0]}.{MIN_GO_VERSION[1]}+ from https://go.dev/dl/ and retry, "
            f"or set {P2PD_ENV_VAR}=/path/to/p2pd to use a daemon binary you already have."
        )
    try:
        version_output = subprocess.run([go, "version"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"`{go} version` failed: {e}")
    match = re.search(r"go(\d+)\.(\d+)", version_output)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_GO_VERSION:
        fail(
            f"Go {MIN_GO_VERSION[0]}.{MIN_GO_VERSION[1]}+ is required to compile p2pd, "
            f"found: {version_output.strip()}.\n"
            f"Upgrade Go (https://go.dev/dl/) or set {P2PD_ENV_VAR}=/path/to/p2pd."
        )
    return go


def install_p2pd_binary() -> None:
    """Place a p2pd binary at hivemind/hivemind_cli/p2pd: a user-provided one, a fresh build, or a reused build.

    The first build downloads the Go modules listed in p2pd/go.sum through the Go module proxy (about a minute on
    a fresh machine, then cached in the Go module cache); later builds from the same sources and toolchain reuse
    the binary (see the stamp file next to it).
    """
    user_binary = os.environ.get(P2PD_ENV_VAR)
    if user_binary:
        if not (os.path.isfile(user_binary) and os.access(user_binary, os.X_OK)):
            fail(f"{P2PD_ENV_VAR}={user_binary!r} is not an executable file")
        if os.path.abspath(user_binary) != P2PD_TARGET:
            shutil.copy2(user_binary, P2PD_TARGET)
        with open(P2PD_STAMP, "w") as f:
            f.write(f"user-provided:{user_binary}\n")
        return

    if not os.path.isfile(os.path.join(GO_SOURCE_DIR, "go.mod")):
        fail(f"the daemon's Go sources are missing ({GO_SOURCE_DIR}/go.mod); use a complete source tree or sdist")
    go = find_go_toolchain()
    go_version = subprocess.run([go, "version"], capture_output=True, text=True).stdout.strip()
    digest = go_sources_digest(go_version)
    if os.path.isfile(P2PD_TARGET) and os.path.isfile(P2PD_STAMP):
        with open(P2PD_STAMP) as f:
            if f.read().strip() == digest:
                return  # the binary was built from exactly these sources with this toolchain

    sys.stderr.write(f"hivemind: compiling p2pd with {go_version} (the first build downloads Go modules)...\n")
    env = dict(os.environ, CGO_ENABLED=os.environ.get("CGO_ENABLED", "0"))
    temporary_target = P2PD_TARGET + ".tmp"
    command = [go, "build", *GO_BUILD_FLAGS, "-o", temporary_target, "."]
    try:
        result = subprocess.run(command, cwd=GO_SOURCE_DIR, env=env, capture_output=True, text=True)
    except OSError as e:
        fail(f"cannot run `{' '.join(command)}`: {e}")
    if result.returncode != 0:
        if os.path.exists(temporary_target):
            os.remove(temporary_target)
        output = (result.stdout + result.stderr).strip()
        fail(
            f"`{' '.join(command)}` in {GO_SOURCE_DIR} exited with code {result.returncode}:\n{output[-4000:]}\n"
            "Check that the Go module proxy is reachable (GOPROXY) or set "
            f"{P2PD_ENV_VAR}=/path/to/p2pd to skip the build."
        )
    os.replace(temporary_target, P2PD_TARGET)  # atomic: a running daemon keeps its old file
    with open(P2PD_STAMP, "w") as f:
        f.write(digest + "\n")


def build_native_parts() -> None:
    generate_protobuf_modules()
    install_p2pd_binary()


class BuildPy(build_py):
    def run(self):
        build_native_parts()
        super().run()


class Develop(develop):
    def run(self):
        build_native_parts()
        super().run()


def runtime_requirements():
    """requirements.txt plus protobuf at least as new as the generator's (generated code checks its runtime)."""
    with open(os.path.join(HERE, "requirements.txt")) as f:
        requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    try:
        import google.protobuf

        major, minor = google.protobuf.__version__.split(".")[:2]
        # generated modules refuse to load on an older runtime or on a different major version
        requirements = [r for r in requirements if not r.startswith("protobuf")]
        requirements.append(f"protobuf>={major}.{minor},<{int(major) + 1}")
    except ImportError:
        pass
    return requirements


def read_extras():
    with open(os.path.join(HERE, "requirements-dev.txt")) as f:
        dev = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return {"dev": dev, "bitsandbytes": ["bitsandbytes>=0.45"], "all": dev + ["bitsandbytes>=0.45"]}


setup(
    cmdclass={"build_py": BuildPy, "develop": Develop},
    install_requires=runtime_requirements(),
    extras_require=read_extras(),
)
