"""Turning samples into Markdown: medians with min-max, ratios to peers, targets.

Ratio columns read "how many times better than the peer" from medians of the same run:
throughput is this ÷ peer, costs (CPU, memory) are peer ÷ this, so > 1 always means
better.  Targets are reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from scenarios import Counts, Sample, Variant
from serverproc import PEERS, REFERENCES


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    fmt: str
    higher_is_better: bool
    ratio: str = ""  # short name for the ratio columns; empty: no ratio columns


METRICS: dict[str, tuple[Metric, ...]] = {
    "messages": (
        Metric("msgs_per_s", "msgs/s", "{:.0f}", True, "msgs/s"),
        Metric("server_cpu_us_per_msg", "server CPU µs/msg", "{:.0f}", False, "CPU"),
        Metric("main_cpu_us_per_msg", "of it main thread", "{:.0f}", False),
        Metric("client_cpu_us_per_msg", "client CPU µs/msg", "{:.0f}", False),
    ),
    "large": (
        Metric("mib_per_s", "MiB/s", "{:.1f}", True, "MiB/s"),
        Metric("server_cpu_ms_per_mib", "server CPU ms/MiB", "{:.1f}", False, "CPU"),
        Metric("peak_rss_growth_mib", "peak RSS growth MiB", "{:.2f}", False),
    ),
    "idle": (
        Metric("rss_per_conn_kib", "RSS KiB/conn", "{:.2f}", False, "RSS"),
        Metric("conns_per_s", "connections/s", "{:.0f}", True),
    ),
}


@dataclass(frozen=True, slots=True)
class Stat:
    median: float
    low: float
    high: float
    n: int


Summary = dict[tuple[str, str], dict[str, Stat]]
# Per (variant, server, metric): the value of each repetition, by its number.
Repetitions = dict[tuple[str, str, str], dict[int, float]]


def summarize(samples: Iterable[Sample]) -> Summary:
    """Median, min and max of every metric per (variant, server) over repetitions."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for sample in samples:
        if sample.skipped is not None:
            continue
        per = values.setdefault((sample.variant, sample.server), {})
        for key, value in sample.metrics.items():
            per.setdefault(key, []).append(value)
    return {
        where: {
            key: Stat(statistics.median(vs), min(vs), max(vs), len(vs))
            for key, vs in metrics.items()
        }
        for where, metrics in values.items()
    }


def by_repetition(samples: Iterable[Sample]) -> Repetitions:
    """Every metric of every clean sample, keyed by its repetition: one repetition
    measures all servers one after the other, so a ratio within it compares them
    under the same machine state (the medians' ratio mixes states)."""
    found: Repetitions = {}
    for sample in samples:
        if sample.skipped is None and sample.clean:
            for key, value in sample.metrics.items():
                found.setdefault((sample.variant, sample.server, key), {})[
                    sample.repetition] = value
    return found


def _cell(stat: Stat | None, fmt: str) -> str:
    if stat is None:
        return "—"
    if stat.n == 1 or stat.low == stat.high:
        return fmt.format(stat.median)
    return f"{fmt.format(stat.median)} ({fmt.format(stat.low)}-{fmt.format(stat.high)})"


def advantage(mine: float, peer: float, higher_is_better: bool) -> float | None:
    """How many times better ``mine`` is than ``peer`` (> 1 = better)."""
    if higher_is_better:
        return mine / peer if peer > 0 else None
    return peer / mine if mine > 0 else None


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def variant_table(
    variant: Variant,
    counts: Counts,
    servers: Sequence[str],
    summary: Summary,
    samples: Sequence[Sample],
) -> list[str]:
    metrics = METRICS[variant.kind]
    peers = [p for p in PEERS if (variant.key, p) in summary]
    head = ["server", *(m.label for m in metrics)]
    head += [f"{m.ratio} vs {p}" for m in metrics if m.ratio for p in peers]
    head.append("failed")
    rows: list[list[str]] = [head]
    for server in servers:
        mine = [s for s in samples if s.variant == variant.key and s.server == server]
        if not mine:
            continue
        skipped = next((s.skipped for s in mine if s.skipped), None)
        stats = summary.get((variant.key, server), {})
        if skipped is not None:
            rows.append([server, f"skipped: {skipped}"] + [""] * (len(head) - 2))
            continue
        row = [server, *(_cell(stats.get(m.key), m.fmt) for m in metrics)]
        for metric in (m for m in metrics if m.ratio):
            for peer in peers:
                ours = stats.get(metric.key)
                theirs = summary[(variant.key, peer)].get(metric.key)
                ratio = (
                    advantage(ours.median, theirs.median, metric.higher_is_better)
                    if ours and theirs
                    else None
                )
                row.append("—" if ratio is None else f"{ratio:.2f}")
        failures = sum(s.failed + s.session_errors + bool(s.errors) for s in mine)
        row.append("0" if failures == 0 else f"**{failures}**")
        rows.append(row)
    title = variant.title.format(**_counts_fields(counts))
    return [f"### {title} — generator: {variant.generator}", "", *_table(rows), ""]


def _counts_fields(counts: Counts) -> dict[str, object]:
    return dataclasses.asdict(counts)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    variant: str
    metric: str
    required: float
    higher_is_better: bool
    peer: str | None = None  # None: absolute; "self:<variant>": our own other variant
    strict: bool = False  # absolute targets only: < rather than <=
    unit: str = ""

    def requirement(self) -> str:
        if self.peer is not None:
            return f"≥ {self.required:g}x"
        sign = "≥" if self.higher_is_better else "<" if self.strict else "≤"
        return f"{sign} {self.required:g} {self.unit}".strip()

    def met_by(self, value: float) -> bool:
        if self.peer is not None or self.higher_is_better:
            return value >= self.required
        return value < self.required if self.strict else value <= self.required


# (b): server CPU per message at most twisted.mail's divided by this (issue 3).
B_VS_TWISTED_MAIL = 2.5


def _ours(servers: Sequence[str]) -> list[str]:
    """The maitred_tx servers among *servers*: neither a peer nor a reference."""
    return [s for s in servers if s not in PEERS and s not in REFERENCES]


def targets_for(variants: Sequence[Variant]) -> list[Target]:
    keys = {v.key for v in variants}
    found: list[Target] = []
    for key in ("b/py", "b/smtp-source"):
        found += [
            Target(f"({key}) server CPU/msg ≤ twisted-mail ÷ {B_VS_TWISTED_MAIL:g}", key,
                   "server_cpu_us_per_msg", B_VS_TWISTED_MAIL, False, "twisted-mail"),
            Target(f"({key}) server CPU/msg ≤ aiosmtpd ÷ 5", key,
                   "server_cpu_us_per_msg", 5.0, False, "aiosmtpd"),
        ]  # fmt: skip
    found += [
        Target("(c) DATA MiB/s ≥ 4x twisted-mail", "c/data", "mib_per_s", 4.0, True,
               "twisted-mail"),
        Target("(c) DATA MiB/s ≥ 10x aiosmtpd", "c/data", "mib_per_s", 10.0, True,
               "aiosmtpd"),
        Target("(c) BDAT MiB/s ≥ 2x our DATA", "c/bdat", "mib_per_s", 2.0, True,
               "self:c/data"),
        Target("(c) DATA peak RSS growth < 4 MiB", "c/data", "peak_rss_growth_mib", 4.0,
               False, strict=True, unit="MiB"),
        Target("(c) BDAT peak RSS growth < 4 MiB", "c/bdat", "peak_rss_growth_mib", 4.0,
               False, strict=True, unit="MiB"),
        Target("(d) RSS per idle connection ≤ 4 KiB", "d", "rss_per_conn_kib", 4.0,
               False, unit="KiB"),
    ]  # fmt: skip
    speed = {"messages": "msgs_per_s", "large": "mib_per_s"}
    for variant in variants:
        if variant.kind in speed and variant.key != "c/bdat":
            for peer in PEERS:
                found.append(
                    Target(f"({variant.key}) not slower than {peer}", variant.key,
                           speed[variant.kind], 1.0, True, peer)
                )  # fmt: skip
    return [t for t in found if t.variant in keys]


def _paired_range(target: Target, server: str, reps: Repetitions) -> str:
    """" (lo-hi)": the target's ratio within each repetition, lowest and highest."""
    if target.peer is None:
        return ""
    if target.peer.startswith("self:"):
        base = reps.get((target.peer[5:], server, target.metric), {})
    else:
        base = reps.get((target.variant, target.peer, target.metric), {})
    ours = reps.get((target.variant, server, target.metric), {})
    ratios = [
        r for rep in sorted(ours.keys() & base.keys())
        if (r := advantage(ours[rep], base[rep], target.higher_is_better)) is not None
    ]
    if len(ratios) < 2:
        return ""
    return f" ({min(ratios):.2f}-{max(ratios):.2f})"


def evaluate(
    target: Target, server: str, summary: Summary, reps: Repetitions | None = None
) -> tuple[str, str]:
    """(measured, PASS/MISS/n/a) for one target and one server; with *reps*, the
    measured ratio is followed by its range over the repetitions."""
    ours = summary.get((target.variant, server), {}).get(target.metric)
    if ours is None:
        return "—", "n/a"
    if target.peer is None:
        shown = f"{ours.median:.2f} {target.unit}".strip()
        return shown, "PASS" if target.met_by(ours.median) else "MISS"
    if target.peer.startswith("self:"):
        base = summary.get((target.peer[5:], server), {}).get(target.metric)
    else:
        base = summary.get((target.variant, target.peer), {}).get(target.metric)
    if base is None:
        return "—", "n/a"
    ratio = advantage(ours.median, base.median, target.higher_is_better)
    if ratio is None:
        return "—", "n/a"
    spread = _paired_range(target, server, reps) if reps else ""
    return f"{ratio:.2f}x{spread}", "PASS" if target.met_by(ratio) else "MISS"


def targets_table(
    variants: Sequence[Variant], servers: Sequence[str], summary: Summary,
    reps: Repetitions | None = None,
) -> list[str]:
    ours = _ours(servers)
    if not ours:
        return ["_No maitred_tx server was measured: targets not evaluated._", ""]
    rows = [["target", "required", *(f"{s} measured" for s in ours), *ours]]
    for target in targets_for(variants):
        required = target.requirement()
        results = [evaluate(target, s, summary, reps) for s in ours]
        rows.append([target.label, required, *(m for m, _ in results), *(v for _, v in results)])
    legend = (
        "Ratios are from medians: throughput ours ÷ peer, costs peer ÷ ours, so ≥ Nx "
        "means N times better; the verdict is the medians'.  In brackets, with several "
        "repetitions: the lowest and highest ratio within one repetition (one "
        "repetition measures every server in turn, so each pair shares the machine's "
        "state; a verdict that holds across that range does not hang on noise).  "
        "The targets are meant for `maitred` (discarding, like "
        "the peers); `maitred-nolog` is the same server with its log events dropped "
        "(the peers log nothing per message); `maitred-maildir` writes every message "
        "to disk and is shown for information."
    )
    return [legend, "", *_table(rows), "", *floor_lines(servers, summary),
            *checks_lines(servers, summary, reps)]


def floor_lines(servers: Sequence[str], summary: Summary) -> list[str]:
    """(b)'s CPU per message above the floor (servers/twisted_floor_server.py): what the
    target against twisted.mail leaves for the SMTP work itself, what each of ours
    spends on it, and what the fused reference (servers/twisted_fused_server.py) spends
    on the same checks."""
    metric, lines = "server_cpu_us_per_msg", []
    for key in ("b/py", "b/smtp-source"):
        floor = summary.get((key, REFERENCES[0]), {}).get(metric)
        peer = summary.get((key, "twisted-mail"), {}).get(metric)
        if floor is None or peer is None:
            continue
        spent = {
            s: stat.median - floor.median
            for s in servers
            if (stat := summary.get((key, s), {}).get(metric)) is not None
        }
        ours = [f"{s} {spent[s]:.0f}" for s in _ours(servers) if s in spent]
        references = [f"{s} {spent[s]:.0f}" for s in REFERENCES[1:] if s in spent]
        target = peer.median / B_VS_TWISTED_MAIL
        lines.append(
            f"- ({key}) floor {floor.median:.0f} µs/msg; twisted-mail ÷ "
            f"{B_VS_TWISTED_MAIL:g} = {target:.0f} µs/msg leaves "
            f"{target - floor.median:.0f} µs above the floor; spent above it: "
            f"{', '.join(ours) or 'nothing measured'} µs"
            + (f"; the reference {', '.join(references)} µs" if references else "")
        )
    return [*lines, ""] if lines else []


# (b): the default checks cost at most this much on top of --no-auth-checks (issue 13):
# maitred-checks' server CPU per message ÷ maitred's, in the same run.
CHECKS_OVER_NO_CHECKS = 1.3


def checks_lines(servers: Sequence[str], summary: Summary,
                 reps: Repetitions | None = None) -> list[str]:
    """(b)'s cost of the default checks: ``maitred-checks`` (checks on, the sender's
    domain without records) against ``maitred`` (``--no-auth-checks``), both logging as
    a default server does, with the paired range over repetitions."""
    metric, lines = "server_cpu_us_per_msg", []
    if "maitred-checks" not in servers or "maitred" not in servers:
        return []
    for key in ("b/py", "b/smtp-source"):
        on = summary.get((key, "maitred-checks"), {}).get(metric)
        off = summary.get((key, "maitred"), {}).get(metric)
        if on is None or off is None or off.median <= 0:  # quick runs: below a tick
            continue
        ratio = on.median / off.median
        paired = ""
        if reps:
            a = reps.get((key, "maitred-checks", metric), {})
            b = reps.get((key, "maitred", metric), {})
            ratios = [a[r] / b[r] for r in sorted(a.keys() & b.keys()) if b[r]]
            if len(ratios) > 1:
                paired = f" ({min(ratios):.2f}-{max(ratios):.2f})"
        verdict = "PASS" if ratio <= CHECKS_OVER_NO_CHECKS else "MISS"
        lines.append(
            f"- ({key}) default checks: maitred-checks {on.median:.0f} µs/msg ÷ maitred "
            f"(--no-auth-checks) {off.median:.0f} µs/msg = {ratio:.2f}x{paired}, required "
            f"≤ {CHECKS_OVER_NO_CHECKS:g}x: {verdict}"
        )
    return [*lines, ""] if lines else []


# --------------------------------------------------------------------------- machine


def machine_lines(command: str) -> list[str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = []
    for dist in ("twisted", "aiosmtpd"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, loopback only",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- command: `{command}`",
    ]
