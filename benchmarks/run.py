"""Side-by-side benchmark of maitred_tx against aiosmtpd and twisted.mail.smtp.

    python benchmarks/run.py [--quick] [--repeat N] [--scenarios a,b,c,d,e]
                             [--servers aiosmtpd,twisted-mail,twisted-floor,twisted-fused,maitred,
                                        maitred-nolog,maitred-maildir]
                             [--generators py,smtp-source] [--markdown OUT] [--json OUT]

For each repetition, for each scenario, for each server (the order rotating between
runs) it starts the server on 127.0.0.1, runs the scenario, reads the server's CPU time
and RSS from /proc, and stops it.  It prints medians with min-max, ratios to the peers
and a PASS/MISS table of the targets.  It exits 1 if any transaction failed (a missing or
wrong reply is an error, not a slow sample), 0 otherwise.  maitred variants are skipped,
with a message, while maitred_tx or its twistd plugin is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import loadgen
import report
from scenarios import FULL, QUICK, VARIANTS, Counts, Sample, Variant, measure
from serverproc import SERVERS, maitred_unavailable


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny counts")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions")
    parser.add_argument("--scenarios", default="a,b,c,d,e")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--generators", default="py,smtp-source")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    unknown = set(_split(args.servers)) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; known: {sorted(SERVERS)}")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def choose_servers(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The servers to run, and notes on the ones skipped."""
    notes: list[str] = []
    chosen = list(names)
    if any(SERVERS[n].is_maitred for n in chosen):
        with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
            why = maitred_unavailable(Path(tmp))
        if why is not None:
            skipped = [n for n in chosen if SERVERS[n].is_maitred]
            chosen = [n for n in chosen if not SERVERS[n].is_maitred]
            notes.append(f"skipped {', '.join(skipped)}: {why}")
    return chosen, notes


def choose_variants(
    letters: Sequence[str], generators: Sequence[str]
) -> tuple[list[Variant], list[str]]:
    notes: list[str] = []
    gens = set(generators)
    if "smtp-source" in gens and loadgen.smtp_source_path() is None:
        gens.discard("smtp-source")
        notes.append("skipped the smtp-source generator: smtp-source is not installed")
    chosen = [v for v in VARIANTS if v.letter in letters and v.generator in gens]
    return chosen, notes


def run_all(
    variants: Sequence[Variant], servers: Sequence[str], counts: Counts, repeat: int
) -> list[Sample]:
    """Every (repetition, scenario, server), rotating the server order between runs."""
    samples: list[Sample] = []
    extensions: dict[str, dict[str, str]] = {}
    groups: list[list[Variant]] = (
        [list(variants)] if counts.one_server_per_run else [[v] for v in variants]
    )
    for rep in range(repeat):
        for index, group in enumerate(groups):
            shift = (rep + index) % len(servers)
            for name in [*servers[shift:], *servers[:shift]]:
                for sample in measure(group, SERVERS[name], counts, rep, extensions):
                    samples.append(sample)
                    _progress(rep, repeat, sample)
    return samples


def _progress(rep: int, repeat: int, sample: Sample) -> None:
    shown = ", ".join(
        f"{k}={v:.4g}"
        for k, v in sample.metrics.items()
        if k not in ("server_cpu_s", "client_cpu_s")
    )
    status = (
        f"skipped ({sample.skipped})"
        if sample.skipped
        else ("ok" if sample.clean else f"FAILED {sample.failed}/{sample.planned}")
    )
    print(
        f"[{rep + 1}/{repeat}] {sample.variant:<14} {sample.server:<16} {status}: {shown}",
        file=sys.stderr,
        flush=True,
    )
    for error in sample.errors[:5]:
        print(f"    error: {error}", file=sys.stderr, flush=True)


def render(
    args: argparse.Namespace,
    variants: Sequence[Variant],
    servers: Sequence[str],
    samples: Sequence[Sample],
    notes: Sequence[str],
    counts: Counts,
) -> str:
    summary = report.summarize(samples)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## Results ({stamp}, {args.repeat} repetition(s), median (min-max))",
        "",
        *report.machine_lines(command.strip()),
        *(f"- note: {n}" for n in notes),
        "",
        "Ratio columns: how many times better than the peer, from medians "
        "(throughput this ÷ peer, costs peer ÷ this). "
        "Server CPU is utime+stime of the serving process from /proc/PID/stat; "
        "client and server share the 2 cores.",
        "",
    ]
    for variant in variants:
        lines += report.variant_table(variant, counts, servers, summary, samples)
    lines += ["### Targets", "", *report.targets_table(
        variants, servers, summary, report.by_repetition(samples))]
    failed = [s for s in samples if not s.clean]
    if failed:
        lines.append(f"**{len(failed)} measurement(s) had failed transactions.**")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counts = QUICK if args.quick else FULL
    loadgen.raise_nofile_limit(counts.idle_connections + 1024)  # inherited by servers
    servers, notes = choose_servers(_split(args.servers))
    variants, more = choose_variants(_split(args.scenarios), _split(args.generators))
    notes += more
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not servers or not variants:
        print("nothing to run", file=sys.stderr)
        return 2
    start = time.monotonic()
    samples = run_all(variants, servers, counts, args.repeat)
    print(f"took {time.monotonic() - start:.1f}s", file=sys.stderr)
    text = render(args, variants, servers, samples, notes, counts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0 if all(s.clean for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
