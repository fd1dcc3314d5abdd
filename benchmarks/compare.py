"""
Runs one benchmark script under OUR hivemind and under the ORIGINAL hivemind 1.1.12, one after the other in the
same run, and prints both results side by side with the ratio ours / original for every number.

    python benchmarks/compare.py benchmarks/benchmark_p2p.py [benchmark args...]
    python benchmarks/compare.py --order original,ours benchmarks/benchmark_dht.py --mode pair
    python benchmarks/compare.py --rounds 5 benchmarks/benchmark_p2p.py --repeats 10

With ``--rounds N`` both implementations run N times, alternating (and alternating which goes first), and every
figure is the median over the rounds; the ratio column then also shows the range of the per-round ratios. On a
noisy machine this keeps a slow phase of the machine from landing on one implementation only.

The original runs from the separate environment made by `bash tests/interop/setup_original_env.sh` (created here if
missing); ours runs with this interpreter (or HIVEMIND_OURS_PYTHON) and the repository on PYTHONPATH. Each run first
checks which `hivemind` that interpreter imports. Benchmarks need no changes: their printed tables are aligned line
by line (the same script prints the same lines) and every number is compared. A script that accepts `--json` and
prints one JSON object of figures as its last stdout line can be compared by key instead, with `--json`.
"""

import argparse
import difflib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
from harness import (  # noqa: E402  (the harness imports neither hivemind)
    IMPLEMENTATIONS,
    check_implementation,
    ensure_original_env,
    kill_tree,
    process_env,
    process_tree,
    python_command,
)

# a number that is not part of a word ("p2p", "p50", "fp16" are labels, not figures)
NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")


class BenchmarkRun:
    def __init__(self, implementation: str, stdout: str, seconds: float, version: str):
        self.implementation, self.stdout, self.seconds, self.version = implementation, stdout, seconds, version


def loaded_version(implementation: str) -> str:
    """The `hivemind.__version__` that `implementation`'s interpreter imports; fails if it is the wrong library."""
    probe = "import os, hivemind; print(hivemind.__version__); print(os.path.realpath(hivemind.__file__))"
    result = subprocess.run(
        python_command(implementation) + ["-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
        env=process_env(implementation),
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot import hivemind for {implementation}:\n{result.stderr[-2000:]}")
    version, file = result.stdout.split()[-2:]
    check_implementation(implementation, version, file)
    return version


def run_benchmark(implementation: str, script: Path, args: Sequence[str], timeout: float) -> BenchmarkRun:
    version = loaded_version(implementation)
    print(f"=== running {script.name} under {implementation} hivemind {version} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        proc = subprocess.Popen(
            python_command(implementation) + [str(script), *args],
            stdout=stdout,
            stderr=None,  # progress and library logs go straight to the terminal
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),  # never a directory holding a `hivemind` package
            env=process_env(implementation),
            start_new_session=True,
        )
        seen, deadline, returncode = {}, time.monotonic() + timeout, None
        try:
            while returncode is None and time.monotonic() < deadline:
                seen.update((p.pid, p) for p in process_tree(proc))  # remembered to clean up orphans later
                try:
                    returncode = proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            kill_tree(proc, known_members=list(seen.values()))  # also DHT processes or daemons left behind
        stdout.seek(0)
        output = stdout.read().decode(errors="replace")
    seconds = time.perf_counter() - started
    if returncode != 0:
        reason = f"timed out after {timeout} s" if returncode is None else f"exited with status {returncode}"
        raise RuntimeError(f"{script.name} under {implementation} {reason}; its output:\n{output[-4000:]}")
    return BenchmarkRun(implementation, output, seconds, version)


# --- comparing printed tables ---


def skeleton(line: str) -> str:
    """The line with numbers replaced and spacing collapsed: equal for the same row printed by both runs."""
    return " ".join(NUMBER.sub("#", line).split())


def numbers_in(text: str) -> List[float]:
    return [float(token) for token in NUMBER.findall(text)]


def ratio_text(ours: float, original: float) -> str:
    if ours == original:
        return "="
    if original == 0 or math.isnan(ours) or math.isnan(original):
        return "n/a"
    return f"{ours / original:.2f}"


def split_row(line: str) -> Tuple[str, str]:
    """('label', 'figures'): a markdown row's first cell and the others, or a 'label  value' row split at its first
    run of two spaces; otherwise the whole line is figures."""
    stripped = line.strip()
    if stripped.startswith("|") and stripped.endswith("|") and stripped.count("|") >= 3:
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        return cells[0], " | ".join(cells[1:])
    gap = re.search(r"\s{2,}(?=\S)", stripped)
    if gap is not None:
        return stripped[: gap.start()], stripped[gap.end() :]
    return "", stripped


def compare_text(first: BenchmarkRun, second: BenchmarkRun) -> List[Dict]:
    """Aligns the two outputs by line skeletons; returns one row per output line (numbers compared pairwise)."""
    lines_a, lines_b = first.stdout.splitlines(), second.stdout.splitlines()
    matcher = difflib.SequenceMatcher(
        a=[skeleton(x) for x in lines_a], b=[skeleton(x) for x in lines_b], autojunk=False
    )
    rows = []
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            for line_a, line_b in zip(lines_a[a0:a1], lines_b[b0:b1]):
                (label, figures_a), (_, figures_b) = split_row(line_a), split_row(line_b)
                if numbers_in(line_a) == numbers_in(line_b) and not (label and numbers_in(figures_a)):
                    rows.append(dict(label=line_a, figures={}, numbers={}))  # titles, headers: shown once
                    continue
                rows.append(
                    dict(
                        label=label,
                        figures={first.implementation: figures_a, second.implementation: figures_b},
                        lines={first.implementation: line_a, second.implementation: line_b},
                        numbers={
                            first.implementation: numbers_in(figures_a),
                            second.implementation: numbers_in(figures_b),
                        },
                    )
                )
        else:  # lines that differ in shape (e.g. a title with the version): shown as they are
            for line in lines_a[a0:a1]:
                rows.append(dict(label=f"[{first.implementation}] {line}", figures={}, numbers={}))
            for line in lines_b[b0:b1]:
                rows.append(dict(label=f"[{second.implementation}] {line}", figures={}, numbers={}))
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare_json(first: BenchmarkRun, second: BenchmarkRun) -> List[Dict]:
    """Compares the last-line JSON objects of both runs key by key (nested keys joined with '.')."""

    def flatten(obj, prefix="") -> Dict[str, object]:
        if isinstance(obj, dict):
            flat = {}
            for key, value in obj.items():
                flat.update(flatten(value, f"{prefix}{key}."))
            return flat
        return {prefix[:-1]: obj}

    figures = {}
    for run in (first, second):
        last = [line for line in run.stdout.splitlines() if line.strip()][-1:]
        try:
            figures[run.implementation] = flatten(json.loads(last[0]))
        except (IndexError, ValueError):
            raise RuntimeError(f"{run.implementation}: the last output line is not a JSON object: {last}") from None
    rows = []
    for key in list(dict.fromkeys([*figures[first.implementation], *figures[second.implementation]])):
        values = {impl: figures[impl].get(key) for impl in figures}
        rows.append(
            dict(
                label=key,
                figures={impl: _short(v) for impl, v in values.items()},
                numbers={
                    impl: [float(v)] if isinstance(v, (int, float)) and not isinstance(v, bool) else []
                    for impl, v in values.items()
                },
            )
        )
    return rows


def _like(token: str, value: float) -> str:
    """``value`` written with as many decimals as ``token`` has."""
    if not math.isfinite(value):
        return str(value)
    decimals = len(token.split(".")[1]) if "." in token and "e" not in token.lower() else 0
    return f"{value:.{decimals}f}"


def _with_numbers(text: str, values: List[float]) -> str:
    """``text`` with its numbers replaced, in order, by ``values`` (written like the numbers they replace)."""
    replacements = iter(values)
    return NUMBER.sub(lambda match: _like(match.group(0), next(replacements)), text)


def merge_rounds(rows_per_round: List[List[Dict]]) -> List[Dict]:
    """Rows of the first round with every figure replaced by its median over the rounds; each row also gets the
    per-round ratios (``round_ratios``). Rounds whose rows do not line up with the first round's are left out."""
    first = rows_per_round[0]
    shapes = [
        [(row["label"], {impl: len(values) for impl, values in row["numbers"].items()}) for row in rows]
        for rows in rows_per_round
    ]
    usable = [rows for rows, shape in zip(rows_per_round, shapes) if shape == shapes[0]]
    merged = []
    for index, row in enumerate(first):
        if not row["figures"]:
            merged.append(row)
            continue
        numbers, figures = {}, {}
        for impl in row["numbers"]:
            columns = list(zip(*(rows[index]["numbers"][impl] for rows in usable)))
            numbers[impl] = [statistics.median(column) for column in columns]
            figures[impl] = _with_numbers(row["figures"][impl], numbers[impl])
        round_ratios = [
            [a / b for a, b in zip(rows[index]["numbers"]["ours"], rows[index]["numbers"]["original"]) if b]
            for rows in usable
        ]
        merged.append(dict(row, numbers=numbers, figures=figures, round_ratios=round_ratios))
    return merged


WIDE_ROW_NUMBERS = 4  # rows with more figures (multi-column tables) are stacked instead of put side by side


def ratios_under(line: str, ratios: List[str]) -> str:
    """A line with each ratio right-aligned under the corresponding number of `line`."""
    out = [" "] * (len(line) + 8)
    cursor = 0
    for match, ratio in zip(NUMBER.finditer(line), ratios):
        begin = max(cursor, match.end() - len(ratio))
        out[begin : begin + len(ratio)] = ratio
        cursor = begin + len(ratio) + 1
    return "".join(out).rstrip()


def print_side_by_side(rows: List[Dict], runs: Dict[str, BenchmarkRun], rounds: int = 1) -> None:
    versions = {impl: f"{impl} ({run.version})" for impl, run in runs.items()}
    header = ["", versions["ours"], versions["original"], "ours / original"]
    rendered = []  # ("plain", text) | ("pair", [label, ours, original, ratios]) | ("stack", [lines])
    for row in rows:
        if not row["figures"]:
            rendered.append(("plain", row["label"]))
            continue
        ours, original = row["numbers"].get("ours", []), row["numbers"].get("original", [])
        ratios = [ratio_text(a, b) for a, b in zip(ours, original)] if len(ours) == len(original) else []
        per_round = [r for r in row.get("round_ratios", []) if len(r) == len(ratios)]
        if len(per_round) > 1:
            ratios = [
                f"{ratio} ({min(rs):.2f}-{max(rs):.2f})" if ratio not in ("=", "n/a") else ratio
                for ratio, rs in zip(ratios, zip(*per_round))
            ]
        if max(len(ours), len(original)) > WIDE_ROW_NUMBERS:
            lines = row["lines"]
            width = max(len(lines["ours"]), len(lines["original"]))
            rendered.append(
                (
                    "stack",
                    [
                        f"{lines['ours'].ljust(width)}   <- {versions['ours']}",
                        f"{lines['original'].ljust(width)}   <- {versions['original']}",
                        f"{ratios_under(lines['ours'], ratios).ljust(width)}   <- ours / original",
                    ],
                )
            )
        else:
            rendered.append(
                ("pair", [row["label"], row["figures"]["ours"], row["figures"]["original"], " / ".join(ratios)])
            )
    pairs = [cells for kind, cells in rendered if kind == "pair"] + [header]
    widths = [max(len(cells[i]) for cells in pairs) for i in range(3)]
    if len(pairs) > 1:
        print("  ".join(cell.ljust(width) for cell, width in zip(header, widths)) + "  " + header[3])
        print("  ".join("-" * width for width in widths) + "  " + "-" * len(header[3]))
    for kind, content in rendered:
        if kind == "plain":
            print(content.rstrip())
        elif kind == "stack":
            print("\n".join(content))
        else:
            print("  ".join(cell.ljust(width) for cell, width in zip(content, widths)) + "  " + content[3])
    print(
        f"\nwall time of the whole script: ours {runs['ours'].seconds:.1f} s, "
        f"original {runs['original'].seconds:.1f} s" + (f" (median of {rounds} rounds)" if rounds > 1 else "")
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", type=Path, help="benchmark script, e.g. benchmarks/benchmark_p2p.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")
    parser.add_argument("--order", default="ours,original", help="which implementation runs first (default: ours)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run both this many times, alternating; figures are medians"
    )
    parser.add_argument("--json", action="store_true", help="pass --json to the script and compare its JSON object")
    parser.add_argument("--save", type=Path, help="also write both raw outputs and the comparison to this JSON file")
    parser.add_argument("--load", type=Path, help="print the comparison saved by --save instead of running anything")
    args = parser.parse_args(argv)

    order = args.order.split(",")
    if sorted(order) != sorted(IMPLEMENTATIONS):
        parser.error(f"--order must name both of {IMPLEMENTATIONS}, e.g. ours,original")
    script = args.script.resolve()
    if not script.is_file():
        parser.error(f"no such benchmark script: {args.script}")
    script_args = [*args.script_args, *(["--json"] if args.json else [])]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    compare = compare_json if args.json else compare_text
    if args.load:
        saved = json.loads(args.load.read_text())
        rounds_runs = [
            {impl: BenchmarkRun(impl, r["stdout"], r["seconds"], r["version"]) for impl, r in saved_round.items()}
            for saved_round in saved.get("rounds", [saved.get("runs")])
        ]
    else:
        problem = ensure_original_env()
        if problem is not None:
            print(f"cannot run the original hivemind: {problem}", file=sys.stderr)
            return 2
        rounds_runs = []
        for round_index in range(args.rounds):
            round_order = order if round_index % 2 == 0 else order[::-1]
            rounds_runs.append({impl: run_benchmark(impl, script, script_args, args.timeout) for impl in round_order})
    rows = merge_rounds([compare(*(runs[impl] for impl in order)) for runs in rounds_runs])
    rounds = len(rounds_runs)
    seconds = {impl: statistics.median(runs[impl].seconds for runs in rounds_runs) for impl in order}
    summary = {impl: BenchmarkRun(impl, "", seconds[impl], rounds_runs[0][impl].version) for impl in order}
    described = " ".join([script.name, *args.script_args])
    where = "one run" if rounds == 1 else f"one run of {rounds} alternating rounds, medians"
    print(f"\n{described}: ours vs original hivemind, same machine, {where}\n")
    print_side_by_side(rows, summary, rounds)
    if args.save and not args.load:
        raw = [
            {impl: dict(version=run.version, seconds=run.seconds, stdout=run.stdout) for impl, run in runs.items()}
            for runs in rounds_runs
        ]
        args.save.write_text(
            json.dumps(dict(script=script.name, args=args.script_args, rounds=raw, rows=rows), indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
