"""A report (reporting.reports) as CSV or Markdown. The values are the JSON's own (already text
for money and ratios), so every format carries the same numbers."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

FORMATS = ("json", "csv", "md")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "md": "text/markdown; charset=utf-8"}
_CSV_CHUNK = 500


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def csv_lines(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """A header row, then one line per row, in chunks (streamed; never the file in memory)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for count, row in enumerate(rows, 1):
        writer.writerow([_cell(row.get(c)) for c in columns])
        if count % _CSV_CHUNK == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def report_csv(report: dict[str, Any]) -> Iterator[str]:
    return csv_lines(report["columns"], report["rows"])


def _md_cell(value: Any) -> str:
    return _cell(value).replace("|", "\\|").replace("\n", " ")


def md_table(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield "| " + " | ".join(columns) + " |\n"
    yield "|" + "|".join("---" for _ in columns) + "|\n"
    for row in rows:
        yield "| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |\n"


def _section(title: str, rows: list[dict[str, Any]]) -> Iterator[str]:
    if not rows:
        return
    yield f"\n### {title}\n\n"
    yield from md_table(list(rows[0]), rows)


def report_markdown(report: dict[str, Any]) -> Iterator[str]:
    """Title and range, the totals, the main table, then every other section as a table."""
    yield f"## {report['report'].capitalize()} report\n\n"
    yield f"{report['since']} to {report['until']} ({report['tz']}), {report['currency']}"
    if report.get("interval"):
        yield f", by {report['interval']}"
    if report.get("filters"):
        yield ", " + ", ".join(f"{k}={v}" for k, v in report["filters"].items())
    yield f". Source: {report['source']}.\n\n"
    totals = [{"total": k, "value": v} for k, v in report["totals"].items()]
    yield from md_table(["total", "value"], totals)
    yield f"\n### {'Opportunities' if report['report'] == 'optimization' else 'By group'}\n\n"
    yield from md_table(report["columns"], report["rows"])
    if report.get("truncated"):
        yield "\n_Truncated: more groups exist than a report holds._\n"
    for dim, rows in report.get("top_consumers", {}).items():
        yield from _section(f"Top consumers by {dim}", rows)
    yield from _section("Model mix", report.get("model_mix", []))
    yield from _section("Unpriced usage (not in the totals' cost)", report.get("unpriced", []))
    yield from _section("Over time", report.get("series", []))
    yield from _section("Budgets", report.get("budgets", []))
    yield from _section("Accepted recommendations: what they saved", report.get("accepted", []))
