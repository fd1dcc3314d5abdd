"""benchmarks/compare.py: aligning two benchmark outputs and comparing every figure (pure text, no processes)."""

import importlib.util
import sys

from .harness import REPO

_spec = importlib.util.spec_from_file_location("benchmarks_compare", REPO / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("benchmarks_compare", compare)
_spec.loader.exec_module(compare)


def run(implementation, stdout):
    return compare.BenchmarkRun(implementation, stdout, 1.0, "1.1.12" if implementation == "original" else "dev")


def test_numbers_inside_words_are_labels_not_figures():
    assert compare.numbers_in("hivemind.p2p p50 0.403 ms, 1M x -2.5e3") == [0.403, 1.0, -2500.0]


def test_rows_split_into_label_and_figures():
    assert compare.split_row("| stream 1 MiB in 1 MiB messages | 9 MB/s |") == (
        "stream 1 MiB in 1 MiB messages",
        "9 MB/s",
    )
    assert compare.split_row("store p50 / p90      1.55 / 6.36 ms") == ("store p50 / p90", "1.55 / 6.36 ms")
    assert compare.split_row("title with 3 words") == ("", "title with 3 words")


def test_outputs_are_aligned_line_by_line_and_every_figure_gets_a_ratio():
    ours = "DHT (hivemind 1.2.0.dev0)\n-----\nstore p50 / p90    1.00 / 4.00 ms\nsuccess    100.0 %\n"
    original = "DHT (hivemind 1.1.12)\n-----\nstore p50 / p90    2.00 / 4.00 ms\nsuccess    100.0 %\n"
    rows = compare.compare_text(run("ours", ours), run("original", original))
    labels = [row["label"] for row in rows]
    assert "[ours] DHT (hivemind 1.2.0.dev0)" in labels and "[original] DHT (hivemind 1.1.12)" in labels
    store = next(row for row in rows if row["label"] == "store p50 / p90")
    assert store["numbers"] == {"ours": [1.0, 4.0], "original": [2.0, 4.0]}
    assert [compare.ratio_text(a, b) for a, b in zip(store["numbers"]["ours"], store["numbers"]["original"])] == [
        "0.50",
        "=",
    ]
    success = next(row for row in rows if row["label"] == "success")
    assert success["figures"] == {"ours": "100.0 %", "original": "100.0 %"}


def test_ratios_are_placed_under_their_numbers():
    line = "NONE     1048576     3.33     4.85"
    assert compare.ratios_under(line, ["=", "0.94", "1.24"]) == "               =     0.94     1.24"


def test_json_figures_are_compared_key_by_key():
    ours = run("ours", 'table\n{"latency_ms": 0.5, "rss": {"p2pd": 40}, "loop": "uvloop"}\n')
    original = run("original", 'table\n{"latency_ms": 1.0, "rss": {"p2pd": 80}, "loop": "uvloop"}\n')
    rows = {row["label"]: row for row in compare.compare_json(ours, original)}
    assert rows["latency_ms"]["numbers"] == {"ours": [0.5], "original": [1.0]}
    assert rows["rss.p2pd"]["figures"] == {"ours": "40", "original": "80"}
    assert rows["loop"]["numbers"] == {"ours": [], "original": []}


def test_rounds_are_merged_into_medians_with_per_round_ratios():
    def round_rows(ours_mbps, original_mbps):
        ours = run("ours", f"title\nstream 64 MiB    {ours_mbps} MB/s\nrss    40 MiB\n")
        original = run("original", f"title\nstream 64 MiB    {original_mbps} MB/s\nrss    80 MiB\n")
        return compare.compare_text(ours, original)

    merged = compare.merge_rounds([round_rows(900, 450), round_rows(1000, 400), round_rows(800, 500)])
    stream = next(row for row in merged if row["label"] == "stream 64 MiB")
    assert stream["numbers"] == {"ours": [900], "original": [450]}
    assert stream["figures"] == {"ours": "900 MB/s", "original": "450 MB/s"}
    assert stream["round_ratios"] == [[2.0], [2.5], [1.6]]
    rss = next(row for row in merged if row["label"] == "rss")
    assert rss["figures"] == {"ours": "40 MiB", "original": "80 MiB"}


def test_rounds_that_print_other_rows_are_left_out_of_the_medians():
    first = compare.compare_text(run("ours", "x    1.50 ms\n"), run("original", "x    3.00 ms\n"))
    odd = compare.compare_text(run("ours", "x    9.00 ms\ny    1 s\n"), run("original", "x    9.00 ms\n"))
    merged = compare.merge_rounds([first, odd])
    assert merged[0]["figures"] == {"ours": "1.50 ms", "original": "3.00 ms"}
    assert merged[0]["round_ratios"] == [[0.5]]
