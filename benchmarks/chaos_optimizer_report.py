"""The report of benchmarks/chaos_optimizer.py: per-trainer table, late joiners' state, leaks and log warnings."""

import collections
import math
import os
import statistics
from typing import List

from chaos_common import MIB, first_peak_last, print_warnings


def distance(a: List[float], b: List[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def median_vector(vectors: List[List[float]]) -> List[float]:
    return [statistics.median(values) for values in zip(*vectors)]


def report(chaos, settings: dict) -> dict:
    """Print the tables of one setting's run (a ``Chaos`` of chaos_optimizer.py); returns its summary counts."""
    args, trainers = chaos.args, list(chaos.trainers.values())
    limit = args.averaging_timeout + args.matchmaking_time + args.hang_slack
    print(f"\n### setting `{chaos.setting}`: {settings[chaos.setting] or 'defaults'}")
    actions = collections.Counter(action for _, action, _ in chaos.events if action != "thaw")
    done = ", ".join(f"{a} x{c}" for a, c in sorted(actions.items())) or "none"
    print(f"chaos: {done}; logs in {chaos.workdir}")
    # parameters of each epoch, as reported by the trainers right after the step that entered it
    by_epoch = collections.defaultdict(list)
    for trainer in trainers:
        for record in trainer.epochs:
            by_epoch[record["epoch"]].append((trainer.label, record["params"]))
    medians = {e: median_vector([p for _, p in entries]) for e, entries in by_epoch.items() if len(entries) >= 2}
    changes = [distance(medians[e], medians[e + 1]) for e in medians if e + 1 in medians]
    epoch_change = statistics.median(changes) if changes else float("nan")
    max_epoch = max((r["epoch"] for t in trainers for r in t.epochs), default=0)
    print(
        f"swarm reached epoch {max_epoch} in {chaos.ended - chaos.started:.0f} s; median parameter change per epoch "
        f"{epoch_change:.4f} (L2)"
    )
    print(
        "\n| trainer | late | fate | epochs (first-last) | step() of global steps: median / max s | hangs "
        "| behind the swarm at the end | loss first / last epochs | params finite | spread to others (epochs) "
        "| USS first/peak/last MiB (p2pd) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary, all_spreads = collections.Counter(), []
    for trainer in trainers:
        epochs = trainer.epochs
        fate = "SIGKILL" if trainer.killed else ("exited" if trainer.exited_cleanly else "NO EXIT")
        span = f"{epochs[0]['epoch']}-{epochs[-1]['epoch']} ({len(epochs)})" if epochs else "none"
        global_steps = sorted(r["step_seconds"] for r in epochs)
        steps = f"{statistics.median(global_steps):.2f} / {global_steps[-1]:.2f}" if global_steps else "-"
        for hang in trainer.hangs:  # (the watchdog is frozen too: a step that was frozen is reported after SIGCONT)
            start = hang["time"] - hang["seconds"] - 2
            hang["frozen"] = any(s < hang["time"] and (e is None or e > start) for s, e in trainer.freezes)
        hangs = [h for h in trainer.hangs if not h["frozen"]]
        summary["hangs"] += len(hangs)
        behind = "-"
        if trainer.alive and epochs:
            behind = max_epoch - epochs[-1]["epoch"]
            summary["lost"] += behind >= 2
        losses = [r["loss"] for r in epochs]
        loss = "-"
        if len(losses) >= 6:
            first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
            loss = f"{first:.3f} / {last:.3f}"
            summary["loss not decreasing"] += not (last < first) and not trainer.late
        summary["non-finite loss"] += sum(not math.isfinite(v) for v in losses)
        finite = all(r["params_finite"] for r in epochs)
        summary["non-finite params"] += not finite
        spreads = []
        for record in epochs:
            others = [p for label, p in by_epoch[record["epoch"]] if label != trainer.label]
            if others and epoch_change > 0:
                spreads.append(distance(record["params"], median_vector(others)) / epoch_change)
        spread = "-"
        if spreads:
            apart = sum(value > 0.5 for value in spreads)  # gradient averaging: identical unless a round failed
            spread = f"{statistics.median(spreads):.2f} / {max(spreads):.2f} ({apart} apart)"
            all_spreads.extend(spreads)
        samples = trainer.rss[2:] or trainer.rss
        rss = "-"
        if samples:
            python, p2pd = (first_peak_last([s[i] / MIB for s in samples], "/") for i in (1, 2))
            rss = f"{python} ({p2pd})"
        print(
            f"| {trainer.label} | {'yes' if trainer.late else ''} | {fate} | {span} | {steps} | {len(hangs)} "
            f"| {behind} | {loss} | {finite} | {spread} | {rss} |"
        )
    print("\n(spread: median / max distance of the trainer's parameters to the median of the others' of the same")
    print(" epoch, in units of the median change per epoch, and in how many epochs it was over 0.5; hangs: step()")
    print(" calls over the limit while not frozen)")
    print(f"\nlate joiners (load_state_from_peers before training), limit of a step {limit:.0f} s:")
    for trainer in trainers:
        if trainer.loaded is None:
            continue
        loaded = trainer.loaded
        candidates = []
        for epoch in (loaded["epoch"], loaded["epoch"] + 1):
            others = [p for _, p in by_epoch.get(epoch, [])]
            if others and epoch_change > 0:
                candidates.append((distance(loaded["params"], median_vector(others)) / epoch_change, epoch))
        closest = min(candidates) if candidates else None
        usual = statistics.median(all_spreads) if all_spreads else 0.0  # (local updates: peers always differ)
        summary["late joiner far from swarm"] += closest is not None and closest[0] > max(0.5, 2 * usual)
        summary["late joiner behind after load"] += loaded["epoch"] < loaded["swarm_epoch"]
        where = f"{closest[0]:.3f} epochs from the swarm's epoch-{closest[1]} parameters" if closest else "no data"
        print(
            f"  {trainer.label}: loaded epoch {loaded['epoch']} (swarm epoch {loaded['swarm_epoch']}) in "
            f"{loaded['seconds']:.1f} s; {where}"
        )
    for trainer in trainers:
        for hang in trainer.hangs:
            print(f"  HANG {trainer.label}: a step() over {hang['seconds']:.0f} s (frozen: {hang['frozen']})")
    print(f"leaked processes: {chaos.leaked or 'none'}")
    summary["leaked processes"] += len(chaos.leaked)
    for trainer in trainers:
        left = chaos.files_left.get(trainer.label, [])
        if left:
            kind = "killed" if trainer.killed else "EXITED CLEANLY"
            summary["files left by clean exits"] += 0 if trainer.killed else len(left)
            shown = [os.path.relpath(p, trainer.tmpdir) if p.startswith(trainer.tmpdir) else p for p in left[:4]]
            print(f"files left by {trainer.label} ({kind}): {len(left)} {shown}")
    print_warnings([trainer.log_path for trainer in trainers], "trainers", most=12, limit=150)
    print(f"\nsummary: {dict(summary)}")
    return dict(summary)
