"""The user documentation (README.md, docs/*.md, examples/*/README.md) says only what is true of the code.

Cheap checks that keep the docs honest without a network: links and file paths resolve, every command-line flag the
docs show exists in the tool's parser, the documented defaults are the code's, Python snippets are valid Python, the
log lines and error messages the docs quote are still produced by the code, and the README's quickstart runs.
"""

import ast
import asyncio
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*/README.md")])
# measurement tables: reviewed separately, they quote benchmark output verbatim
REVIEWED_DOCS = [path for path in DOCS if path.name != "benchmarks.md"]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str, language: str) -> Iterator[str]:
    for match in FENCE.finditer(text):
        if match.group(1) == language:
            yield match.group(2)


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level (not in code)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, inside, in_fence = [], False, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        is_heading = not in_fence and re.match(r"#{1," + str(level) + "} ", line)
        if inside and is_heading:
            break
        if line.strip() == heading:
            inside = True
        if inside:
            lines.append(line)
    assert lines, f"no heading {heading!r}"
    return "".join(lines)


def test_docs_are_found():
    names = {doc_id(path) for path in DOCS}
    assert {"README.md", "docs/dht.md", "docs/moe.md", "docs/optimizer.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_relative_links_resolve(path: Path):
    text = path.read_text()
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if link.startswith(("http://", "https://", "mailto:", "#")):
            continue
        target = (path.parent / link.split("#")[0]).resolve()
        if not target.exists():
            broken.append(link)
    assert not broken, f"{doc_id(path)} links to files that do not exist: {broken}"


def heading_anchors(text: str) -> Set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, in_fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_link_anchors_resolve(path: Path):
    """A link to a section (`page.md#heading`, `#heading`) names a heading that the page has."""
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if link.startswith(("http://", "https://", "mailto:")) or "#" not in link:
            continue
        page, fragment = link.split("#", 1)
        target = (path.parent / page).resolve() if page else path
        if target.suffix == ".md" and target.is_file() and fragment not in heading_anchors(target.read_text()):
            broken.append(link)
    assert not broken, f"{doc_id(path)} links to sections that do not exist: {broken}"


# a file (with an extension) under one of the repository's top-level directories, or .ci/run
REPO_PATH = re.compile(r"(?<![\w./-])((?:examples|benchmarks|tests|hivemind|p2pd|docs)/[\w./*-]*\.\w+|\.ci/run)")


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_repository_paths_exist(path: Path):
    """Every path into the repository that a doc names (in text, commands or links) exists."""
    text = path.read_text()
    missing = sorted(
        {
            candidate
            for candidate in REPO_PATH.findall(text)
            if not (ROOT / candidate).exists() and not (path.parent / candidate).exists()
        }
    )
    # files the build creates (never committed) and names of files that a run writes
    generated = {"hivemind/hivemind_cli/p2pd", "hivemind/proto/*_pb2.py"}
    missing = [name for name in missing if name not in generated and not name.startswith("checkpoints/")]
    assert not missing, f"{doc_id(path)} names repository paths that do not exist: {missing}"


@pytest.mark.parametrize("path", REVIEWED_DOCS, ids=doc_id)
def test_no_references_to_the_private_specification(path: Path):
    """The contract's text is not in the repository: docs explain in their own words instead of citing it."""
    text = path.read_text()
    found = re.findall(r"API\.md|WIRE\.md|BEHAVIOUR(?:\.md)?|CLI\.md|§\s*\d", text)
    assert not found, f"{doc_id(path)} cites the private specification: {found}"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_python_snippets_are_valid_python(path: Path):
    for block in code_blocks(path.read_text(), "python"):
        ast.parse(block)  # raises SyntaxError naming the line


def cli_flags() -> Dict[str, Set[str]]:
    from hivemind.hivemind_cli import run_dht, run_server

    return {
        "hivemind-dht": set(run_dht.make_parser()._option_string_actions),
        "hivemind-server": set(run_server.make_parser()._option_string_actions),
    }


def flags_in(text: str) -> Set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z_]*)", text))


def commands_of(tool: str) -> List[Tuple[str, str]]:
    """(doc, command) for every shell line that runs the tool (continuation lines joined)."""
    commands = []
    for path in DOCS:
        for language in ("sh", "bash", ""):
            for block in code_blocks(path.read_text(), language):
                for line in block.replace("\\\n", " ").splitlines():
                    line = line.split("#")[0] if not line.lstrip().startswith("#") else ""
                    if line.strip().startswith(tool + " ") or line.strip() == tool:
                        commands.append((doc_id(path), line.strip()))
        # inline commands in the prose: `hivemind-server --expert_cls ffn ...`
        commands += [(doc_id(path), span) for span in re.findall(r"`(" + tool + r"(?: [^`]*)?)`", path.read_text())]
    return commands


def test_every_documented_cli_flag_exists():
    known = cli_flags()
    unknown = []
    for tool in ("hivemind-dht", "hivemind-server"):
        commands = commands_of(tool)
        assert commands or tool == "hivemind-server", f"no {tool} command found in the docs"
        for doc, command in commands:
            unknown += [(doc, tool, flag) for flag in flags_in(command) - known[tool]]
    # the prose of each tool's section, and the README's one-line mention of hivemind-server
    dht_prose = section((ROOT / "docs/dht.md").read_text(), "### `hivemind-dht`")
    server_prose = section((ROOT / "docs/moe.md").read_text(), "### `hivemind-server`")
    unknown += [("docs/dht.md", "hivemind-dht", flag) for flag in flags_in(dht_prose) - known["hivemind-dht"]]
    documented_wrong_key = {"--foo"}  # moe.md's example of a config key that is not an option
    server_unknown = flags_in(server_prose) - known["hivemind-server"] - documented_wrong_key
    unknown += [("docs/moe.md", "hivemind-server", flag) for flag in server_unknown]
    assert not unknown, f"flags shown in the docs that the tools do not have: {unknown}"


def test_cli_defaults_stated_in_the_docs():
    from hivemind.hivemind_cli import run_dht, run_server

    dht_defaults = {action.dest: action.default for action in run_dht.make_parser()._actions}
    server_defaults = {action.dest: action.default for action in run_server.make_parser()._actions}
    dht_doc, moe_doc = (ROOT / "docs/dht.md").read_text(), (ROOT / "docs/moe.md").read_text()

    assert dht_defaults["host_maddrs"] == ["/ip4/0.0.0.0/tcp/0"]
    assert "`--host_maddrs` (default `/ip4/0.0.0.0/tcp/0`" in dht_doc
    assert dht_defaults["refresh_period"] == 30
    assert "seconds between status reports, 30;" in dht_doc
    assert (server_defaults["min_batch_size"], server_defaults["max_batch_size"]) == (1, 16384)
    assert "(`hivemind-server`: 1, 16384)" in moe_doc
    assert server_defaults["update_period"] == 30 and server_defaults["expert_cls"] == "ffn"
    assert server_defaults["hidden_dim"] == 1024


def test_documented_library_defaults():
    """Defaults that the docs' option tables state, against the signatures they describe."""
    import hivemind
    from hivemind.averaging import DecentralizedAverager
    from hivemind.dht import DHTNode
    from hivemind.moe.server import Server
    from hivemind.p2p import P2P

    def defaults(function) -> dict:
        return {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }

    node, p2p = defaults(DHTNode.create), defaults(P2P.create)
    assert (node["num_replicas"], node["wait_timeout"], node["cache_refresh_before_expiry"]) == (5, 3, 5)
    assert (node["ensure_bootstrap_success"], node["strict"], node["client_mode"]) == (True, True, False)
    assert tuple(p2p["host_maddrs"]) == ("/ip4/127.0.0.1/tcp/0",)
    assert (p2p["use_relay"], p2p["use_auto_relay"]) == (True, False)
    assert defaults(hivemind.DHT.__init__)["shutdown_timeout"] == 3
    dht_doc = (ROOT / "docs/dht.md").read_text()
    for row in (
        '| `host_maddrs` | `["/ip4/127.0.0.1/tcp/0"]` |',
        "| `num_replicas` | 5 |",
        "| `wait_timeout` | 3 s |",
        "| `shutdown_timeout` | 3 s |",
    ):
        assert row in dht_doc

    averager = defaults(DecentralizedAverager.__init__)
    assert (averager["min_group_size"], averager["min_matchmaking_time"], averager["request_timeout"]) == (2, 5.0, 3.0)
    assert (averager["declare_state_period"], averager["shutdown_timeout"], averager["part_size_bytes"]) == (
        30,
        5,
        512 * 1024,
    )
    averaging_doc = (ROOT / "docs/averaging.md").read_text()
    for row in ("| `min_matchmaking_time` | 5 s |", "| `request_timeout` | 3 s |", "| `part_size_bytes` | 512 KiB |"):
        assert row in averaging_doc

    optimizer = defaults(hivemind.Optimizer.__init__)
    assert (optimizer["matchmaking_time"], optimizer["averaging_timeout"], optimizer["load_state_timeout"]) == (
        15.0,
        60.0,
        600.0,
    )
    assert (optimizer["average_state_every"], optimizer["shutdown_timeout"]) == (1, 5)
    optimizer_doc = (ROOT / "docs/optimizer.md").read_text()
    for cell in ("`matchmaking_time` (15 s)", "`averaging_timeout` (60 s)", "`load_state_timeout` (600 s)"):
        assert cell in optimizer_doc

    server = defaults(Server.create)
    assert (server["min_batch_size"], server["max_batch_size"], server["hidden_dim"]) == (1, 4096, 1024)
    assert "| `min_batch_size`, `max_batch_size` | 1, 4096 |" in (ROOT / "docs/moe.md").read_text()


def source_text() -> str:
    return "\n".join(path.read_text() for path in (ROOT / "hivemind").rglob("*.py"))


# phrases the docs quote from the library's log and errors; each must still be in the code (and in the doc)
QUOTED = [
    ("docs/dht.md", "Running a DHT instance. To connect other peers to this one, use "),
    ("docs/dht.md", "Full list of visible multiaddresses"),
    ("docs/dht.md", "DHT nodes (including this one) are in the local routing table"),
    ("docs/dht.md", "Local storage contains"),
    ("docs/dht.md", "DHTNode bootstrap failed: none of"),
    ("docs/dht.md", "initial_peers should be a list of multiaddrs"),
    ("docs/dht.md", "Checking that identity from"),
    ("docs/dht.md", "is already online;"),
    ("docs/dht.md", "DHT was shut down"),
    ("docs/moe.md", "Server started with"),
    ("docs/moe.md", "starting, pid="),
    ("docs/moe.md", "is not a built-in expert class"),
    ("docs/moe.md", "No responding experts found"),
    ("docs/moe.md", "Processed {"),
    ("docs/moe.md", "again, still shutting down"),
    ("docs/averaging.md", "Formed a group of"),
    ("docs/averaging.md", "Joined a group of"),
    ("docs/averaging.md", "Dropped the state download of"),
    ("docs/averaging.md", "Downloaded the state from"),
    ("docs/compression.md", "compresses floating-point tensors only, got"),
    ("docs/p2p.md", "This P2P instance was shut down"),
    ("docs/p2p.md", "p2pd stopped unexpectedly"),
]


def test_quoted_log_lines_and_errors_are_still_produced():
    source = source_text()
    missing_in_code = [phrase for _, phrase in QUOTED if phrase not in source]
    assert not missing_in_code, f"phrases the docs quote that the code no longer produces: {missing_in_code}"

    def flat(text: str) -> str:  # docs wrap lines anywhere
        return " ".join(text.split())

    missing_in_doc = [
        (doc, phrase) for doc, phrase in QUOTED if flat(phrase.split("{")[0]) not in flat((ROOT / doc).read_text())
    ]
    assert not missing_in_doc, f"update QUOTED in this test along with the docs: {missing_in_doc}"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for tool in ("hivemind-dht", "hivemind-server"):
        assert tool in readme and f"{tool} = " in pyproject, f"{tool} is not an installed console script"
    for script in re.findall(r"python (examples/\w+\.py|benchmarks/\w+\.py)", readme):
        assert (ROOT / script).is_file(), script
    assert (ROOT / ".ci/run").is_file() and "python -m pytest -n 2 tests" in (ROOT / ".ci/run").read_text()
    assert "python -m pytest -n 2 tests" in readme


def test_example_readme_flags_exist():
    """Every flag the collaborative-training README passes to run_trainer.py / run_monitor.py is in its --help."""
    directory = ROOT / "examples/collaborative_training"
    readme = (directory / "README.md").read_text()
    for script in ("run_trainer.py", "run_monitor.py"):
        blocks = code_blocks_list(readme, "bash") + code_blocks_list(readme, "")
        lines = [line for block in blocks for line in block.splitlines()]
        used = set().union(*(flags_in(line.split("#")[0]) for line in lines if f"python {script}" in line))
        assert used, f"the README shows no {script} command"
        help_text = subprocess.run(
            [sys.executable, script, "--help"], cwd=directory, capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert not used - flags_in(help_text), f"{script} has no {sorted(used - flags_in(help_text))}"


def code_blocks_list(text: str, language: str) -> List[str]:
    return list(code_blocks(text, language))


@pytest.mark.timeout(60)
def test_readme_quickstart_runs():
    """The README's quickstart snippet, as printed, stores on one peer and reads on the other."""
    readme = (ROOT / "README.md").read_text()
    quickstart = section(readme, "## Quickstart")
    (snippet,) = code_blocks_list(quickstart, "python")
    script = snippet + "\npeer.shutdown()\ndht.shutdown()\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "To join, use initial_peers = ['/ip4/127.0.0.1/tcp/" in result.stdout
    assert "ValueWithExpiration(value=[1, 2, 3], expiration_time=" in result.stdout


@pytest.mark.timeout(90)
def test_optimizer_quickstart_runs():
    """docs/optimizer.md's first snippet, as printed, given its two placeholders: a first peer and a few batches."""
    (snippet, *_) = code_blocks_list((ROOT / "docs/optimizer.md").read_text(), "python")
    placeholders = (
        "import torch\nINITIAL_PEERS = None\ndata_loader = [(torch.randn(32, 64), torch.randint(0, 10, (32,)))] * 3\n"
    )
    script = placeholders + snippet + "\nopt.shutdown()\ndht.shutdown()\nprint('local epoch', opt.local_epoch)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "local epoch 0" in result.stdout and "my_run" in result.stderr  # verbose=True: its log lines


@pytest.mark.timeout(60)
def test_relays_snippet_runs():
    """docs/relays.md's snippet (on 127.0.0.1, any port) prints the unreachable peer's address through the relay."""
    (snippet,) = code_blocks_list((ROOT / "docs/relays.md").read_text(), "python")
    assert '"/ip4/0.0.0.0/tcp/31337"' in snippet
    script = snippet.replace('"/ip4/0.0.0.0/tcp/31337"', '"/ip4/127.0.0.1/tcp/0"') + "\nbehind_nat.shutdown()\n"
    result = subprocess.run(
        [sys.executable, "-c", script + "relay.shutdown()\n"], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"/p2p/\w+/p2p-circuit/p2p/\w+", result.stdout), result.stdout


@pytest.mark.timeout(120)
def test_moe_snippets_run():
    """docs/moe.md's "Hosting experts" snippet serves, with its "Using experts" snippet as the `...` that uses it."""
    hosting, using = code_blocks_list((ROOT / "docs/moe.md").read_text(), "python")[:2]
    using = using.replace("initial_peers=[...]", "initial_peers=server.dht.get_visible_maddrs()")
    use = (
        "import torch\nx = torch.randn(4, 1024, requires_grad=True)\n"
        + using
        + "\nprint(tuple(output.shape), x.grad.shape)\n"
    )
    script = hosting.replace("\n...\n", "\n" + use + "dht.shutdown()\n").replace(
        "initial_peers=[...]", "initial_peers=[]"
    )
    script = script.replace('"/ip4/0.0.0.0/tcp/31337"', '"/ip4/127.0.0.1/tcp/0"')
    script = script.replace("    ...  # a server", "    print(peer_info.peer_id)  # a server")
    assert script.count("dht.shutdown()") == 1 and "[...]" not in script and "\n...\n" not in script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(4, 1024) torch.Size([4, 1024])" in result.stdout, result.stdout


def resolves(dotted_name: str) -> bool:
    """Whether hivemind.a.b.C names a module, or an attribute reached from the longest importable module prefix."""
    parts = dotted_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


@pytest.mark.parametrize("path", REVIEWED_DOCS, ids=doc_id)
def test_documented_hivemind_names_exist(path: Path):
    """Every dotted name under hivemind (a module, class, function or constant) that a doc mentions exists."""
    names = set(re.findall(r"(?<![\w/.-])(hivemind(?:\.[A-Za-z_]\w*)+)", path.read_text()))
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"{doc_id(path)} mentions names that do not exist: {missing}"


@pytest.mark.parametrize("path", REVIEWED_DOCS, ids=doc_id)
def test_benchmark_commands_use_existing_flags(path: Path):
    """`python benchmarks/x.py --flag ...` (also through compare.py) only passes flags that the script defines."""
    unknown = []
    for match in re.finditer(r"python (benchmarks/\w+\.py)((?: [^\n`|]*)?)", path.read_text()):
        script, arguments = match.group(1), match.group(2).split()
        if script == "benchmarks/compare.py" and arguments and arguments[0].startswith("benchmarks/"):
            script, arguments = arguments[0], arguments[1:]
        source = (ROOT / script).read_text()
        for flag in re.findall(r"(?<![\w-])(--[\w-]+)", " ".join(arguments)):
            if f'"{flag}"' not in source:
                unknown.append((script, flag))
    assert not unknown, f"{doc_id(path)} runs benchmarks with flags they do not define: {unknown}"


def test_documented_exception_kinds():
    """The docs tell users which broader exception to catch for each failure; the classes must be related so."""
    from hivemind.compression import TensorDecodeError
    from hivemind.dht.process_channel import ChannelClosedError
    from hivemind.moe.client.expert_rpc import ExpertResponseTooLarge, MalformedExpertResponse
    from hivemind.p2p import P2PDaemonError, P2PTimeoutError
    from hivemind.p2p.framing import FramingError, MessageTooLargeError
    from hivemind.utils.serializer import MSGPackDecodeError

    assert issubclass(MessageTooLargeError, P2PDaemonError) and issubclass(FramingError, P2PDaemonError)
    assert issubclass(P2PTimeoutError, P2PDaemonError) and issubclass(P2PTimeoutError, asyncio.TimeoutError)
    assert issubclass(ChannelClosedError, RuntimeError)
    assert issubclass(TensorDecodeError, ValueError) and issubclass(MSGPackDecodeError, ValueError)
    assert issubclass(MalformedExpertResponse, ExpertResponseTooLarge)
    assert issubclass(ExpertResponseTooLarge, RuntimeError)


def test_readme_links_every_doc_page():
    readme = (ROOT / "README.md").read_text()
    unlinked = [doc_id(page) for page in sorted((ROOT / "docs").glob("*.md")) if f"]({doc_id(page)})" not in readme]
    assert not unlinked, f"README.md's Documentation list misses {unlinked}"


def test_readme_environment_variables_are_read():
    """Each variable of the README's table is read by the library or by p2pd; the ones it says are ignored are not."""
    readme = (ROOT / "README.md").read_text()
    table = section(readme, "## Environment variables")
    read_here = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, re.MULTILINE))
    variables = {name for pair in read_here for name in pair if name}
    assert {"HIVEMIND_LOGLEVEL", "HIVEMIND_P2PD_PATH", "HIVEMIND_STATE_MIN_RATE"} <= variables
    sources = source_text() + "\n".join(path.read_text() for path in (ROOT / "p2pd").glob("*.go"))
    not_read = sorted(name for name in variables if name not in sources and name != "GOLOG_LOG_LEVEL")
    assert not not_read, f"the README documents variables that nothing reads: {not_read}"
    for ignored in ("HIVEMIND_MEMORY_SHARING_STRATEGY", "HIVEMIND_SHM_BUFFER_SIZE", "QUANTIZATION_THREADS"):
        assert ignored in table and f'"{ignored}"' not in source_text()


def test_no_doc_example_or_message_suggests_a_top_level_alias_that_1_1_12_removed():
    """hivemind.get_dht_time, hivemind.P2P, ... (aliases kept for 1.1.11 scripts) fail on 1.1.12: code meant for both
    reaches them through their modules (hivemind.utils.get_dht_time), and so must what the docs and errors suggest."""
    import hivemind

    aliases = {name for module in hivemind._ALIAS_SOURCES for name in importlib.import_module(module).__all__}
    aliases -= {"DHT", *hivemind._LAZY_EXPORTS, *hivemind._LAZY_SUBPACKAGES}
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.py")]
    texts += [path for path in (ROOT / "hivemind").rglob("*.py") if path != ROOT / "hivemind" / "__init__.py"]
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in texts
        if path.name != "compatibility.md"  # (which says that they were removed)
        for match in re.finditer(r"(?<![\w.])hivemind\.(\w+)", path.read_text())
        if match.group(1) in aliases
    ]
    assert not found, found
