"""Every hivemind name that petals 2.2.0 and lightning-hivemind 0.1.0 use resolves here.

The two wheels are fetched with ``pip download`` (cached under ~/.cache, so the network is needed once) and their
sources scanned for ``from hivemind... import name``, ``import hivemind.x.y`` and ``hivemind.x.y.name`` attribute
chains. Any name that does not resolve fails the test (the mixture-of-experts, averaging and optimizer names
included).
"""

import ast
import importlib
import inspect
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

DOWNSTREAM = {"petals==2.2.0": "petals-2.2.0-", "lightning-hivemind==0.1.0": "lightning_hivemind-0.1.0-"}
DOWNLOAD_TIMEOUT = 120  # seconds for pip download of both wheels

Reference = Tuple[str, str]  # (dotted path of the name, where it is used: file:line)


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hivemind-tests" / "downstream-wheels"


def _find_wheel(directory: Path, prefix: str) -> Optional[Path]:
    matches = [path for path in directory.glob("*.whl") if path.name.lower().startswith(prefix.lower())]
    return matches[0] if matches else None


def _fetch_wheels() -> List[Path]:
    directory = _cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    missing = [spec for spec, prefix in DOWNSTREAM.items() if _find_wheel(directory, prefix) is None]
    if missing:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--timeout",
            "15",
            "--retries",
            "2",
            *missing,
        ]
        try:
            result = subprocess.run(
                command + ["-d", str(directory)], capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {' '.join(missing)} took over {DOWNLOAD_TIMEOUT} s (registry unreachable?)")
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot download {' '.join(missing)} (registry unreachable?): {reason[0]}")
    return [_find_wheel(directory, prefix) for prefix in DOWNSTREAM.values()]


def _attribute_chain(node: ast.Attribute, roots: Dict[str, str]) -> Optional[str]:
    """The dotted name of ``a.b.c`` whose ``a`` is a local name bound to a hivemind name (``roots``), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in roots:
        return ".".join([roots[node.id], *reversed(parts)])
    return None


def _references_in_source(source: str, where: str) -> Iterator[Reference]:
    with warnings.catch_warnings():  # invalid escape sequences in the scanned sources are not our concern
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    roots = {}  # local name -> the hivemind name it is bound to (attributes read through aliases are checked too)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "hivemind" or node.module.startswith("hivemind."):
                for alias in node.names:
                    roots[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    yield f"{node.module}.{alias.name}", f"{where}:{node.lineno}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "hivemind" or alias.name.startswith("hivemind."):
                    if alias.asname is not None:
                        roots[alias.asname] = alias.name
                    else:  # import hivemind.x.y binds hivemind
                        roots["hivemind"] = "hivemind"
                    yield alias.name, f"{where}:{node.lineno}"
    if not roots:
        return
    chains = {}  # only the longest chain of each attribute expression: hivemind.a.b, not also hivemind.a
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in chains:
            chain = _attribute_chain(node, roots)
            if chain is not None:
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    chains[id(inner)] = None
                    inner = inner.value
                chains[id(node)] = (chain, f"{where}:{node.lineno}")
    yield from (reference for reference in chains.values() if reference is not None)


def downstream_references(wheels: List[Path]) -> List[Reference]:
    references = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.endswith(".py"):
                    source = archive.read(name).decode("utf-8", errors="replace")
                    references.extend(_references_in_source(source, f"{wheel.name}/{name}"))
    return references


def resolve(dotted: str) -> Optional[str]:
    """None if ``dotted`` names something here, otherwise why not. Attributes are followed through modules and
    one step into whatever a module holds (a class attribute), not further (instance attributes are unknowable)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if not inspect.ismodule(obj):
            return None if hasattr(obj, part) else f"{'.'.join(parts[:index])} has no attribute {part!r}"
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: index + 1]))
        except ImportError as e:
            return f"{'.'.join(parts[:index])} has no {part!r} ({e})"
    return None


def test_resolve_reports_missing_names_and_accepts_present_ones():
    assert resolve("hivemind.utils.timed_storage.get_dht_time") is None
    assert resolve("hivemind.p2p.P2P.create") is None
    assert "no attribute" in resolve("hivemind.p2p.P2P.no_such_method")
    assert "no 'no_such_module'" in resolve("hivemind.utils.no_such_module.name")


def test_scanner_finds_from_imports_module_imports_and_attribute_chains():
    source = (
        "import hivemind\nimport hivemind.dht.node\nfrom hivemind.utils import (\n    get_logger,\n    anext,\n)\n"
        "x = hivemind.utils.mpfuture.ALL_STATES\n"
        "from hivemind.utils import logging as hm_logging\nimport hivemind.p2p as p2p\n"
        "y = hm_logging.loglevel, p2p.PeerID.from_base58\n"
    )
    found = {name for name, _ in _references_in_source(source, "example.py")}
    assert found == {
        "hivemind",
        "hivemind.dht.node",
        "hivemind.utils.get_logger",
        "hivemind.utils.anext",
        "hivemind.utils.mpfuture.ALL_STATES",
        "hivemind.utils.logging",
        "hivemind.p2p",
        "hivemind.utils.logging.loglevel",
        "hivemind.p2p.PeerID.from_base58",
    }


@pytest.mark.timeout(DOWNLOAD_TIMEOUT + 60)
def test_every_name_used_by_petals_and_lightning_hivemind_resolves():
    references = downstream_references(_fetch_wheels())
    assert len(references) > 50, "the scan found suspiciously few hivemind references"
    unresolved = {}
    for name, where in references:
        problem = resolve(name)
        if problem is not None:
            unresolved.setdefault(name, (problem, where))
    report = "\n".join(
        f"  {name} (used at {where}): {problem}" for name, (problem, where) in sorted(unresolved.items())
    )
    assert not unresolved, f"names used downstream that do not resolve:\n{report}"


def test_unreachable_registry_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # empty cache: a download is needed
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    with pytest.raises(pytest.skip.Exception, match="cannot download petals==2.2.0"):
        _fetch_wheels()
