"""The overhead benchmark's arithmetic, pure: wrk runs -> median rows -> what each target adds
to the direct backend, as ratios to the direct backend and to LiteLLM, as Markdown and JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

DIRECT, GATEWAY, LITELLM = "direct", "gateway", "litellm"


@dataclass(frozen=True)
class Row:
    """One target at one concurrency: medians over the repeats."""

    target: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    runs: int
    cpu_us: float | None = None  # the target's own CPU time per request (its process tree)


@dataclass(frozen=True)
class Comparison:
    """A proxy (a gateway or LiteLLM) against the direct backend, LiteLLM and the plain
    gateway at the same concurrency; None where that baseline was not run."""

    target: str
    concurrency: int
    added_p50_ms: float  # its p50 minus the direct backend's
    added_p99_ms: float
    p50_x_direct: float | None  # its p50 / the direct backend's
    rps_x_direct: float | None  # its throughput / the direct backend's
    added_p50_x_litellm: float | None  # what it adds at p50 / what LiteLLM adds
    rps_x_litellm: float | None
    # what a feature costs: against the gateway with nothing on (auth, log)
    added_p50_us_vs_gateway: float | None = None
    rps_x_gateway: float | None = None
    cpu_us_vs_gateway: float | None = None


def median_row(target: str, concurrency: int, runs: list[dict]) -> Row:
    """`runs`: wrk results (chat.lua's RESULT line plus `rps` and, measured, `cpu_us`)."""
    cpu = [r["cpu_us"] for r in runs if r.get("cpu_us") is not None]
    return Row(
        target=target,
        concurrency=concurrency,
        p50_ms=statistics.median(r["p50_us"] for r in runs) / 1000,
        p99_ms=statistics.median(r["p99_us"] for r in runs) / 1000,
        rps=statistics.median(r["rps"] for r in runs),
        runs=len(runs),
        cpu_us=statistics.median(cpu) if len(cpu) == len(runs) and cpu else None,
    )


def ratio(a: float, b: float) -> float | None:
    """a / b, or None where b is no base for a ratio (a baseline that added nothing)."""
    return a / b if b > 0 else None


def compare(row: Row, direct: Row, litellm: Row | None, gateway: Row | None) -> Comparison:
    added, added_p99 = row.p50_ms - direct.p50_ms, row.p99_ms - direct.p99_ms
    feature = gateway is not None and row.target not in (GATEWAY, LITELLM)
    cpu_known = feature and row.cpu_us is not None and gateway.cpu_us is not None
    return Comparison(
        target=row.target,
        concurrency=row.concurrency,
        added_p50_ms=added,
        added_p99_ms=added_p99,
        p50_x_direct=ratio(row.p50_ms, direct.p50_ms),
        rps_x_direct=ratio(row.rps, direct.rps),
        added_p50_x_litellm=(
            ratio(added, litellm.p50_ms - direct.p50_ms)
            if litellm and row.target != LITELLM
            else None
        ),
        rps_x_litellm=ratio(row.rps, litellm.rps) if litellm and row.target != LITELLM else None,
        added_p50_us_vs_gateway=(row.p50_ms - gateway.p50_ms) * 1000 if feature else None,
        rps_x_gateway=ratio(row.rps, gateway.rps) if feature else None,
        cpu_us_vs_gateway=row.cpu_us - gateway.cpu_us if cpu_known else None,
    )


def comparisons(rows: list[Row]) -> list[Comparison]:
    """Every proxy's Comparison at every concurrency that has a direct row."""
    by_key = {(r.target, r.concurrency): r for r in rows}
    out = []
    for row in rows:
        direct = by_key.get((DIRECT, row.concurrency))
        if row.target == DIRECT or direct is None:
            continue
        litellm = by_key.get((LITELLM, row.concurrency))
        gateway = by_key.get((GATEWAY, row.concurrency))
        out.append(compare(row, direct, litellm, gateway))
    return out


def headline(rows: list[Row]) -> str | None:
    """The target to quote: the gateway with the most on (auth, limits and log: the issue's
    "as it will ship"), else the plain gateway."""
    names = {r.target for r in rows} - {DIRECT, LITELLM}
    if not names:
        return None
    return max(names, key=lambda n: (n.count("+"), n))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def medians_table(rows: list[Row]) -> list[str]:
    lines = ["| target | concurrency | p50 ms | p99 ms | req/s | CPU us/request |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r.concurrency):
        lines.append(f"| {r.target} | {r.concurrency} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | "
                     f"{r.rps:.0f} | {_num(r.cpu_us, '.0f')} |")  # fmt: skip
    return lines


def ratios_table(comps: list[Comparison]) -> list[str]:
    lines = ["| target | concurrency | added p50 ms | added p99 ms | p50 x direct | "
             "req/s x direct | added p50 x LiteLLM's | req/s x LiteLLM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in sorted(comps, key=lambda c: c.concurrency):
        lines.append(f"| {c.target} | {c.concurrency} | {c.added_p50_ms:.3f} | "
                     f"{c.added_p99_ms:.3f} | {_num(c.p50_x_direct, '.2f')} | "
                     f"{_num(c.rps_x_direct, '.3f')} | {_num(c.added_p50_x_litellm, '.3f')} | "
                     f"{_num(c.rps_x_litellm, '.2f')} |")  # fmt: skip
    return lines


def summary(comps: list[Comparison], quoted: str | None) -> list[str]:
    lines = []
    for c in sorted(comps, key=lambda c: c.concurrency):
        if c.target == quoted:
            vs = ""
            if c.rps_x_litellm is not None:
                vs = (f"; {_num(c.added_p50_x_litellm, '.3f')} of LiteLLM's added p50, "
                      f"{c.rps_x_litellm:.2f}x its req/s")  # fmt: skip
            lines.append(f"c={c.concurrency}: {c.target} adds {c.added_p50_ms:.3f} ms at p50, "
                         f"{_num(c.rps_x_direct, '.3f')} of the direct req/s{vs}")  # fmt: skip
        if c.rps_x_gateway is not None:
            cpu = _num(c.cpu_us_vs_gateway, "+.0f")
            lines.append(f"c={c.concurrency}: {c.target} vs gateway: "
                         f"{c.added_p50_us_vs_gateway:+.0f} us at p50, {cpu} us of CPU per "
                         f"request, throughput {c.rps_x_gateway:.3f} of it")  # fmt: skip
    return lines


def report(rows: list[Row], described: dict[str, str]) -> str:
    """The Markdown the benchmark prints: what each target is, medians, ratios, summary."""
    comps = comparisons(rows)
    lines = [f"- {name}: {text}" for name, text in described.items()]
    lines += ["", *medians_table(rows)]
    if comps:
        lines += ["", *ratios_table(comps), "", *summary(comps, headline(rows))]
    return "\n".join(lines)


def document(rows: list[Row], described: dict[str, str], settings: dict) -> dict:
    """The same as JSON (--out, --json)."""
    return {
        "settings": settings,
        "targets": described,
        "headline": headline(rows),
        "rows": [asdict(r) for r in rows],
        "comparisons": [asdict(c) for c in comparisons(rows)],
    }
