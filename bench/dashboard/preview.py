"""The dashboard's queries and a PNG preview drawn from their results: every panel's targets
(rows' collapsed panels included) with Grafana's variables filled in as "All" would, and
`draw`, which lays the panels out on Grafana's 24-column grid with matplotlib (Agg): one
line per series, legends from legendFormat, values in the panel's unit."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

Dashboard = Mapping[str, Any]
Panel = Mapping[str, Any]

COLUMNS = 24  # Grafana's grid
COLUMN_PX, ROW_PX = 80, 38  # a 1920-px screen; 30-px rows plus their 8-px margin
HEADER_PX = 40  # the dashboard's title
Box = tuple[float, float, float, float]  # x, y from the top left, width, height (pixels)
STATS = ("stat", "gauge")  # drawn as numbers: each series' last value
BARS = ("bargauge", "barchart", "piechart", "table")  # drawn as bars of the last values
# Grafana's built-in interval variables, for a preview of the last few minutes. Scraping
# every 15 s or faster, a 1-minute window holds the two samples rate() needs.
BUILTINS = {
    "__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000",
    "__range": "5m", "__range_s": "300", "__range_ms": "300000",
}  # fmt: skip
# Grafana's dark theme and its classic palette
BACKGROUND, PANEL, BORDER, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PALETTE = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9",
           "#705da0", "#508642", "#cca300", "#447ebc", "#c15c17")  # fmt: skip
MAX_LEGEND = 8


@dataclass(frozen=True)
class Target:
    """One query of one panel, as the dashboard holds it (variables not filled in)."""

    panel: str
    ref_id: str
    expr: str
    legend: str
    instant: bool = False  # Grafana runs it at the end of the range only


@dataclass(frozen=True)
class Series:
    """One series of a range query's result: its labels and (unix time, value) points."""

    ref_id: str
    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]

    @classmethod
    def from_matrix(cls, ref_id: str, item: Mapping[str, Any]) -> Series:
        """From one item of Prometheus' `query_range` result (`metric`, `values`)."""
        points = tuple((float(t), float(v)) for t, v in item["values"])
        return cls(ref_id, dict(item["metric"]), points)

    def has_data(self) -> bool:
        """At least one number: NaN (a quantile of nothing, 0/0) is no data."""
        return any(math.isfinite(v) for _, v in self.points)


# -- the queries ----------------------------------------------------------------------


def panels(dashboard: Dashboard) -> Iterator[Panel]:
    """Every panel in order, rows included, each row followed by its collapsed panels."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: Dashboard) -> list[Target]:
    found = []
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            if t.get("expr"):
                instant = bool(t.get("instant")) and not t.get("range")
                found.append(Target(panel.get("title", ""), t.get("refId", ""), t["expr"],
                                    t.get("legendFormat", ""), instant))  # fmt: skip
    return found


def variables(dashboard: Dashboard) -> dict[str, str]:
    """The value of each template variable with "All" selected (its allValue, else `.*`;
    an interval's current value; a constant's or text box's query), and the built-ins."""
    values = dict(BUILTINS)
    for var in dashboard.get("templating", {}).get("list", []):
        kind, name = var.get("type"), var["name"]
        if kind == "datasource":
            continue
        if kind == "interval":
            current = (var.get("current") or {}).get("value")
            values[name] = current or str(var.get("query", "1m")).split(",")[0].strip()
        elif kind in ("constant", "textbox"):
            values[name] = str(var.get("query", ""))
        else:
            values[name] = var.get("allValue") or ".*"
    return values


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with $name, ${name}, ${name:format} and [[name]] replaced from `values`; a
    variable the dashboard does not define is an error, not an empty string."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise ValueError(f"unknown variable ${name} in {expr!r}; known: {sorted(values)}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def collect(
    dashboard: Dashboard, query: Callable[[str], Sequence[Mapping[str, Any]]]
) -> dict[str, list[Series]]:
    """Run every target through `query` (expr -> Prometheus matrix); the series by panel
    title. A failing query is re-raised with the panel and the query noted on it."""
    values = variables(dashboard)
    results: dict[str, list[Series]] = {}
    for target in targets(dashboard):
        expr = substitute(target.expr, values)
        try:
            matrix = query(expr)
        except Exception as exc:  # the caller's client's own errors, whatever they are
            exc.add_note(f"panel {target.panel!r}, target {target.ref_id}: {expr}")
            raise
        series = [Series.from_matrix(target.ref_id, item) for item in matrix]
        results.setdefault(target.panel, []).extend(_at_end(series) if target.instant else series)
    return results


def _at_end(series: Sequence[Series]) -> list[Series]:
    """A range query's result cut to what an instant query at its end would return: the
    series present at the last step, with that point only."""
    end = max((s.points[-1][0] for s in series if s.points), default=None)
    return [Series(s.ref_id, s.labels, s.points[-1:]) for s in series
            if s.points and s.points[-1][0] == end]  # fmt: skip


# -- formatting ---------------------------------------------------------------------------


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """A series' name as Grafana writes it: legendFormat's {{label}}s filled in, else the
    metric name and labels."""
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    name = labels.get("__name__", "")
    return f"{name}{{{inner}}}" if inner else name or "value"


_SUFFIX = {"reqps": " req/s", "rps": " req/s", "ops": " ops/s", "cps": " /s", "wps": " /s"}


def value_text(value: float, unit: str) -> str:
    """`value` in Grafana's `unit` (the common ones; others shown as plain numbers)."""
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if unit == "percentunit":
        return f"{_number(value * 100)}%"
    if unit == "percent":
        return f"{_number(value)}%"
    if unit in ("s", "ms"):
        seconds = value if unit == "s" else value / 1000
        return f"{seconds * 1000:.3g} ms" if abs(seconds) < 1 else f"{_number(seconds)} s"
    return _number(value) + _SUFFIX.get(unit, "")


def _number(value: float) -> str:
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{prefix}"
    return f"{value:.3g}"


def _unit(panel: Panel) -> str:
    return str(panel.get("fieldConfig", {}).get("defaults", {}).get("unit") or "")


# -- layout and drawing -------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    panel: Panel
    x: int
    y: int
    w: int
    h: int


def layout(dashboard: Dashboard) -> list[Placed]:
    """Every panel where Grafana shows it with all rows expanded: a collapsed row's
    panels below it, everything after the row moved down by their height."""
    placed: list[Placed] = []
    shift = 0
    top_level = sorted(dashboard.get("panels", []), key=lambda p: _grid(p)[1::-1])
    for panel in top_level:
        x, y, w, h = _grid(panel)
        placed.append(Placed(panel, x, y + shift, w, h))
        nested = panel.get("panels", [])
        if not nested:
            continue
        first = min(_grid(p)[1] for p in nested)
        for child in nested:
            cx, cy, cw, ch = _grid(child)
            placed.append(Placed(child, cx, y + shift + 1 + cy - first, cw, ch))
        shift += max(_grid(p)[1] + _grid(p)[3] for p in nested) - first
    return placed


def _grid(panel: Panel) -> tuple[int, int, int, int]:
    grid = panel.get("gridPos", {})
    return grid.get("x", 0), grid.get("y", 0), grid.get("w", 12), grid.get("h", 8)


def draw(dashboard: Dashboard, results: Mapping[str, Sequence[Series]], out: Path) -> None:
    """Draw the dashboard as a PNG at `out`: each panel from `results[title]`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    placed = layout(dashboard)
    rows = max((p.y + p.h for p in placed), default=1)
    width, height = COLUMNS * COLUMN_PX, HEADER_PX + rows * ROW_PX
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BACKGROUND)
    try:
        canvas = _Canvas(fig, width, height, _time_span(results))
        canvas.text(8, 10, dashboard.get("title", ""), fontsize=14, weight="bold", va="top")
        for item in placed:
            box = (item.x * COLUMN_PX + 4, HEADER_PX + item.y * ROW_PX + 4,
                   item.w * COLUMN_PX - 8, item.h * ROW_PX - 8)  # fmt: skip
            _panel(canvas, item.panel, results.get(item.panel.get("title", ""), []), box)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, facecolor=BACKGROUND)
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class _Canvas:
    """The figure, addressed in pixels from its top left (as Grafana's grid is)."""

    fig: Any
    width: int
    height: int
    span: tuple[datetime, datetime] | None  # every panel's time axis

    def fraction(self, x: float, y: float) -> tuple[float, float]:
        return x / self.width, 1 - y / self.height

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.fig.text(*self.fraction(x, y), text, **{"color": TEXT, **style})

    def axes(self, box: Box) -> Any:
        x, y, w, h = box
        ax = self.fig.add_axes((*self.fraction(x, y + h), w / self.width, h / self.height),
                               facecolor=PANEL)  # fmt: skip
        ax.tick_params(colors=MUTED, labelsize=7)
        for spine in ax.spines.values():
            spine.set_color(BORDER)
        return ax


def _time_span(results: Mapping[str, Sequence[Series]]) -> tuple[datetime, datetime] | None:
    times = [t for found in results.values() for s in found for t, _ in s.points]
    if not times:
        return None
    return datetime.fromtimestamp(min(times)), datetime.fromtimestamp(max(times))


def _panel(canvas: _Canvas, panel: Panel, series: Sequence[Series], box: Box) -> None:
    from matplotlib.patches import Rectangle

    x, y, w, h = box
    kind, title = panel.get("type", "timeseries"), panel.get("title", "")
    if kind == "row":
        canvas.text(x, y + h / 2, title, fontsize=12, weight="bold", va="center")
        return
    canvas.fig.patches.append(Rectangle(
        canvas.fraction(x, y + h), w / canvas.width, h / canvas.height, facecolor=PANEL,
        edgecolor=BORDER, transform=canvas.fig.transFigure, zorder=-1,  # under the axes
    ))  # fmt: skip
    canvas.text(x + 8, y + 6, title, fontsize=9.5, weight="bold", va="top")
    if kind == "text":
        content = str(panel.get("options", {}).get("content", ""))[:400]
        canvas.text(x + 8, y + 28, content, fontsize=8, va="top", wrap=True)
        return
    drawn = [s for s in series if s.has_data()]
    if not drawn:
        canvas.text(x + w / 2, y + h / 2, "No data", color=MUTED, ha="center", va="center")
        return
    names, unit = _names(panel, drawn), _unit(panel)
    if kind in STATS:
        by_name = panel.get("options", {}).get("textMode") == "name"
        _stat(canvas.axes((x + 8, y + 26, w - 16, h - 32)), drawn, names, unit, by_name)
    elif kind in BARS:
        label_px = min(w * 0.4, 6 * max(len(n) for n in names) + 10)
        ax = canvas.axes((x + label_px, y + 28, w - label_px - 40, h - 50))
        _bars(ax, drawn, names, unit)
    else:
        _lines(canvas, box, drawn, names, unit)


def _names(panel: Panel, series: Sequence[Series]) -> list[str]:
    formats = {t.get("refId", ""): t.get("legendFormat", "") for t in panel.get("targets", [])}
    return [legend(formats.get(s.ref_id, ""), s.labels) for s in series]


def _last(series: Series) -> float:
    return next((v for _, v in reversed(series.points) if math.isfinite(v)), math.nan)


def _lines(canvas: _Canvas, box: Box, series: Sequence[Series], names: Sequence[str],
           unit: str) -> None:  # fmt: skip
    """One line per series over the common time axis, the legend below as Grafana has it."""
    from matplotlib.dates import DateFormatter
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    x, y, w, h = box
    columns = max(1, int(w // 190))
    shown = min(len(series), MAX_LEGEND)
    legend_px = math.ceil(shown / columns) * 12 + 4
    ax = canvas.axes((x + 56, y + 28, w - 66, h - 48 - legend_px))
    for i, (s, name) in enumerate(zip(series, names, strict=True)):
        xs = [datetime.fromtimestamp(t) for t, _ in s.points]
        ax.plot(xs, [v for _, v in s.points], color=PALETTE[i % len(PALETTE)], lw=1.3,
                label=name[: int(w / columns / 5.5)])  # fmt: skip
    if canvas.span is not None and canvas.span[0] < canvas.span[1]:
        ax.set_xlim(*canvas.span)
    ax.grid(color=BORDER, lw=0.5)
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: value_text(v, unit)))
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > MAX_LEGEND:
        more = len(handles) - MAX_LEGEND + 1
        handles, labels = handles[:MAX_LEGEND], [*labels[: MAX_LEGEND - 1], f"+{more} more"]
    canvas.fig.legend(
        handles, labels, loc="lower left", bbox_to_anchor=canvas.fraction(x + 4, y + h - 2),
        ncol=columns, fontsize=6.5, frameon=False, labelcolor=TEXT, handlelength=1.5,
        columnspacing=1.2, borderpad=0, borderaxespad=0,
    )  # fmt: skip


def _stat(ax: Any, series: Sequence[Series], names: Sequence[str], unit: str,
          by_name: bool = False) -> None:  # fmt: skip
    """The last value of each series (or its name: textMode "name"), big, side by side
    (at most six)."""
    ax.set_axis_off()
    shown = list(zip(series, names, strict=True))[:6]
    for i, (s, name) in enumerate(shown):
        x = (i + 0.5) / len(shown)
        big = name if by_name else value_text(_last(s), unit)
        ax.text(x, 0.55, big, color=PALETTE[i % len(PALETTE)], ha="center", va="center",
                fontsize=14 if by_name else 20, weight="bold")  # fmt: skip
        if len(series) > 1 and not by_name:
            ax.text(x, 0.1, name, color=MUTED, ha="center", va="center", fontsize=7)


def _bars(ax: Any, series: Sequence[Series], names: Sequence[str], unit: str) -> None:
    """The last value of each series as a horizontal bar (at most twelve)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    shown = list(zip(series, names, strict=True))[:12][::-1]
    values = [_last(s) for s, _ in shown]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(shown))][::-1]
    ax.barh(range(len(shown)), values, color=colors)
    ax.set_yticks(range(len(shown)), [name for _, name in shown], fontsize=6.5, color=TEXT)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: value_text(v, unit)))
    for i, value in enumerate(values):
        ax.text(value, i, " " + value_text(value, unit), color=TEXT, va="center", fontsize=7)
