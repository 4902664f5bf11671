"""Reconciliation with provider bills (issue 13): a provider's own cost export, read as its
console or admin API hands it out, compared per UTC day x model (x project) with the ledger.

Four layouts are read (README "Reconciliation with provider bills" lists every column and key):
OpenAI's Usage page "Cost data" CSV and its costs API JSON (`GET /v1/organization/costs`),
Anthropic's Console cost CSV and its cost report JSON (`GET /v1/organizations/cost_report`).
The layout is detected from the header or the keys; a stated provider the file contradicts is a
400 ("mislabelled"). Every refusal is an ApiError naming the row and the column in
`fields["file"]`, raised before anything is written: an import and its lines are stored
together (`bill_import`) or not at all.

The ledger side is `usage.rollups.aggregate` over the bill's whole UTC days, grouped by project
and model, for the bill's provider only (the ledger's `provider` column), through the caller's
scope. Money is exact: bill amounts are summed as Decimals and kept at the ledger's 10 places.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from django.db import transaction
from django.utils import timezone
from pydantic import Field, field_validator

from reporting.models import BillImport, BillLine
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import Principal
from usage import pricing, rollups
from usage.schemas import Strict
from usage.selectors import aggregate_for

PROVIDERS = ("openai", "anthropic")
Provider = Literal["openai", "anthropic"]
MAX_BILL_BYTES = 20 * 1024 * 1024
MAX_SPAN_DAYS = 1000
# One bill row at most; a line or the whole bill at most (BillLine.billed: 14 integer digits).
MAX_AMOUNT = Decimal(10) ** 12
MAX_TOTAL = Decimal(10) ** 13
DEFAULT_TOLERANCE_PCT = Decimal("0.5")
MAX_LIST = 200
EARLIEST_DAY = date(2015, 1, 1)  # the ledger's earliest usage (usage.schemas)
_MODEL_MAX = BillLine._meta.get_field("model").max_length or 128
_PROJECT_MAX = BillLine._meta.get_field("project_id").max_length or 128
_PCT = Decimal("0.001")
_PCT_LIMIT = Decimal(10) ** 9  # BillLine.difference_pct holds 9 integer digits
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_DATED = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2}|latest)$")
_UNIX = re.compile(r"\d{1,12}(\.0*)?")
DAY = timedelta(days=1)

UNREADABLE = "Unreadable provider bill."
STATUSES = [s.value for s in BillLine.Status]


# --- the layouts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    provider: str
    label: str
    required: tuple[str, ...]


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "openai_costs_csv",
            "openai",
            "OpenAI cost export (Usage > Export > Cost data, CSV)",
            ("start_time", "amount_value", "amount_currency", "line_item"),
        ),
        Layout(
            "openai_costs_json",
            "openai",
            "OpenAI costs API JSON (GET /v1/organization/costs)",
            ("start_time", "amount.value", "amount.currency", "line_item"),
        ),
        Layout(
            "anthropic_cost_csv",
            "anthropic",
            "Anthropic Console cost export (Cost > Export, CSV)",
            ("usage_date_utc", "model", "cost_usd"),
        ),
        Layout(
            "anthropic_cost_report_json",
            "anthropic",
            "Anthropic cost report JSON (GET /v1/organizations/cost_report)",
            ("starting_at", "amount", "currency", "model"),
        ),
    )
}
_ACCEPTED = (
    "OpenAI's cost export (start_time, amount_value, amount_currency, line_item, …) or "
    "Anthropic's Console cost export (usage_date_utc, model, cost_usd, …) as CSV; "
    "OpenAI's /v1/organization/costs or Anthropic's /v1/organizations/cost_report as JSON"
)


def _file_error(detail: str, message: str = UNREADABLE) -> ApiError:
    return ApiError(message, fields={"file": [detail]})


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text if len(text) <= 40 else text[:40] + "…")


def too_large(size: int) -> ApiError:
    return ApiError(
        "Provider bill too large.",
        status_code=413,
        code="too_large",
        fields={"file": [f"At most {MAX_BILL_BYTES:,} bytes; this one has {size:,}."]},
    )


def decode_upload(raw: bytes) -> str:
    """An uploaded file's text: UTF-8 (a byte-order mark allowed) or UTF-16 with its mark, as
    spreadsheet programs save CSV; a 413 over MAX_BILL_BYTES, a 400 for anything else."""
    if len(raw) > MAX_BILL_BYTES:
        raise too_large(len(raw))
    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _file_error(
            f"not {'UTF-16' if utf16 else 'UTF-8'} text (byte {exc.start + 1} cannot be decoded): "
            "upload the CSV or JSON file as the console downloaded it"
        ) from None
    if "\x00" in text:
        raise _file_error(f"not a text export: a NUL byte at character {text.index(chr(0)) + 1}")
    return text


# --- reading one file --------------------------------------------------------------------------


Key = tuple[date, str, str]  # (UTC day, model, project)


@dataclass(slots=True)
class ParsedBill:
    layout: Layout
    rows: int = 0
    days: set[date] = field(default_factory=set)  # covered, with the empty buckets of a JSON
    amounts: dict[Key, Decimal] = field(default_factory=dict)
    projects: set[str] = field(default_factory=set)  # the non-empty project values

    def add(self, day: date, model: str, project: str, amount: Decimal, where: str) -> None:
        if len(model) > _MODEL_MAX:
            raise _file_error(f"{where}: a model name longer than {_MODEL_MAX} characters")
        if len(project) > _PROJECT_MAX:
            raise _file_error(f"{where}: a project longer than {_PROJECT_MAX} characters")
        key = (day, model, project)
        self.amounts[key] = self.amounts.get(key, Decimal(0)) + amount
        self.days.add(day)
        if project:
            self.projects.add(project)


def _amount(raw: Any, where: str, *, cents: bool = False) -> Decimal:
    if isinstance(raw, bool) or raw is None:
        raise _file_error(f"{where}: not a number: {_show(raw)}")
    if isinstance(raw, int | Decimal):
        value = Decimal(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise _file_error(f"{where}: empty (the cost is needed)")
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise _file_error(f"{where}: not a number: {_show(raw)}") from None
    else:
        raise _file_error(f"{where}: not a number: {_show(raw)}")
    if not value.is_finite():
        raise _file_error(f"{where}: not a number: {_show(raw)}")
    if cents:
        value = value.scaleb(-2)
    if abs(value) >= MAX_AMOUNT:
        raise _file_error(f"{where}: out of range: {_show(raw)}")
    return value


def _usd(raw: Any, where: str) -> None:
    if not isinstance(raw, str) or not raw.strip():
        raise _file_error(f"{where}: empty (the currency is needed)")
    code = raw.strip().upper()
    if code != pricing.CURRENCY:
        raise ApiError(
            f"The bill is in {code[:8]}, not {pricing.CURRENCY}.",
            fields={
                "file": [
                    f"{where}: the currency is {code[:8]!r}; only {pricing.CURRENCY} bills can be "
                    f"compared with the ledger, which is in {pricing.CURRENCY}"
                ]
            },
        )


def _instant(raw: Any, where: str) -> datetime:
    """A Unix time in seconds or an ISO 8601 date(-time), in UTC (naive means UTC)."""
    try:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, int | Decimal) or (isinstance(raw, str) and _UNIX.fullmatch(raw)):
            seconds = Decimal(raw)
            if seconds != seconds.to_integral_value():
                raise ValueError
            value = datetime.fromtimestamp(int(seconds), UTC)
        elif isinstance(raw, str):
            value = datetime.fromisoformat(raw.strip())
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        else:
            raise ValueError
    except (ValueError, OverflowError, OSError, InvalidOperation):
        raise _file_error(
            f"{where}: not a date: {_show(raw)} (a Unix time or an ISO 8601 date-time)"
        ) from None
    if value.date() < EARLIEST_DAY or value > timezone.now() + DAY:
        raise _file_error(f"{where}: out of range: {value.date().isoformat()}")
    return value


def _one_day(start: datetime, end_raw: Any, where: str) -> None:
    """A bucket's end (when given) closes the UTC day it starts: 1-day buckets only."""
    if end_raw is None or end_raw == "":
        return
    end = _instant(end_raw, where)
    if start.time() != time.min or end - start != DAY:
        raise _file_error(
            f"{where}: the bucket {start.isoformat()} .. {end.isoformat()} is not one UTC day: "
            "export with a 1 day interval"
        )


def _text(raw: Any, where: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise _file_error(f"{where}: not text: {_show(raw)}")
    return raw.strip()


def _anthropic_model(raw: str) -> str:
    """The Console's display name ("Claude Sonnet 4.5") as the API spells its alias
    ("claude-sonnet-4-5"); an API model id as it is."""
    name = raw.strip()
    if re.search(r"\s", name):
        name = re.sub(r"[\s.]+", "-", name.lower()).strip("-")
    return name


# CSV ---------------------------------------------------------------------------------------------


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(row number, fields) of every non-blank record; the first record is row 1."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    number = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _file_error(f"row {number + 1}: malformed CSV ({exc})") from None
        number += 1
        if any(value.strip() for value in record):
            yield number, record


def _csv_layout(columns: set[str]) -> tuple[str, str | None, str]:
    """(provider, layout name or None when refused, why refused)."""
    if "amount_value" in columns or {"start_time", "line_item"} <= columns:
        return "openai", "openai_costs_csv", ""
    if "num_model_requests" in columns:
        return (
            "openai",
            None,
            "this is OpenAI's Activity export (tokens, no costs): on the Usage page export "
            "'Cost data' grouped by line item instead",
        )
    if "usage_date_utc" in columns:
        if "cost_usd" not in columns and (
            "usage_input_tokens_no_cache" in columns or "model_version" in columns
        ):
            return (
                "anthropic",
                None,
                "this is Anthropic's usage export (tokens, no costs): export the Console's "
                "Cost page instead",
            )
        return "anthropic", "anthropic_cost_csv", ""
    raise _file_error(
        f"unknown layout: the header's columns are {', '.join(sorted(columns))[:300]}; "
        f"accepted: {_ACCEPTED}"
    )


def _parse_csv(text: str, provider: str | None) -> ParsedBill:
    records = _records(text)
    first = next(records, None)
    if first is None:
        raise _file_error("empty: no header and no rows", "The provider bill is empty.")
    header_row, raw_header = first
    header = [name.strip().lstrip("\ufeff").strip().lower() for name in raw_header]
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise _file_error(f"row {header_row}, column {name!r}: appears twice in the header")
        seen.add(name)
    found, layout_name, refused = _csv_layout(set(header))
    _check_provider(found, provider, layout_name, refused)
    assert layout_name is not None
    layout = LAYOUTS[layout_name]
    for column in layout.required:
        if column not in seen:
            raise _file_error(
                f"row {header_row}, column {column!r}: missing from the header "
                f"({layout.label} needs {', '.join(layout.required)})"
            )
    bill = ParsedBill(layout)
    handle = _openai_csv_row if layout.provider == "openai" else _anthropic_csv_row
    for number, record in records:
        if len(record) != len(header):
            raise _file_error(
                f"row {number}: {len(record)} fields, but the header has {len(header)}"
            )
        values = dict(zip(header, (v.strip() for v in record), strict=True))
        bill.rows += 1
        handle(values, _row(number), bill)
    if not bill.rows:
        raise _file_error("empty: the header has no rows under it", "The provider bill is empty.")
    return bill


Where = Callable[[str], str]


def _row(number: int) -> Where:
    def where(column: str) -> str:
        return f"row {number}, column {column!r}"

    return where


def _openai_csv_row(values: dict[str, str], where: Where, bill: ParsedBill) -> None:
    amount = _amount(values["amount_value"], where("amount_value"))
    _usd(values["amount_currency"], where("amount_currency"))
    start = _instant(values["start_time"], where("start_time"))
    _one_day(start, values.get("end_time"), where("end_time"))
    model = values["line_item"].split(",", 1)[0].strip()
    if not model:
        if amount == 0:
            return
        raise _file_error(
            f"{where('line_item')}: empty: export the costs grouped by line item, so each "
            "cost names its model"
        )
    bill.add(start.date(), model, values.get("project_id", ""), amount, where("line_item"))


def _anthropic_csv_row(values: dict[str, str], where: Where, bill: ParsedBill) -> None:
    amount = _amount(values["cost_usd"], where("cost_usd"))
    if "currency" in values:
        _usd(values["currency"], where("currency"))
    day = _instant(values["usage_date_utc"], where("usage_date_utc")).date()
    model = _anthropic_model(values["model"])
    if not model:
        kind = values.get("cost_type", "").lower()
        if kind and kind not in ("token", "tokens"):
            model = f"({kind})"  # web search, code execution: costs no ledger row carries
        elif amount == 0:
            return
        else:
            raise _file_error(f"{where('model')}: empty for a token cost")
    bill.add(day, model, values.get("workspace", ""), amount, where("model"))


# JSON --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise _file_error("malformed JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise _file_error(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise _file_error(f"malformed JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Bucket:
    where: str
    body: dict[str, Any]
    results: list[Any]


def _buckets(doc: Any) -> list[_Bucket]:
    """Every time bucket of a page, or of a list of pages (a paginated download saved whole)."""
    pages = doc if isinstance(doc, list) else [doc]
    found: list[_Bucket] = []
    for p, page in enumerate(pages):
        prefix = f"[{p}]." if isinstance(doc, list) else ""
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            keys = ", ".join(sorted(page)) if isinstance(page, dict) else type(page).__name__
            raise _file_error(
                f"unknown layout: {prefix or 'the document'} has no 'data' list of time "
                f"buckets (found: {keys[:200]}); accepted: {_ACCEPTED}"
            )
        for i, bucket in enumerate(data):
            where = f"{prefix}data[{i}]"
            if not isinstance(bucket, dict):
                raise _file_error(f"{where}: not a time bucket (an object)")
            results = bucket.get("results", bucket.get("result", []))
            if not isinstance(results, list):
                raise _file_error(f"{where}, key 'results': not a list")
            found.append(_Bucket(where, bucket, results))
    return found


def _json_layout(buckets: list[_Bucket]) -> tuple[str, str | None, str]:
    first = buckets[0].body
    sample = next((r for b in buckets for r in b.results if isinstance(r, dict)), {})
    if "start_time" in first:
        if str(sample.get("object", "")).startswith("organization.usage.") or (
            "input_tokens" in sample
        ):
            return (
                "openai",
                None,
                "this is OpenAI's usage API (tokens, no costs): download "
                "GET /v1/organization/costs?group_by=line_item instead",
            )
        return "openai", "openai_costs_json", ""
    if "starting_at" in first:
        if "uncached_input_tokens" in sample:
            return (
                "anthropic",
                None,
                "this is Anthropic's usage report (tokens, no costs): download "
                "GET /v1/organizations/cost_report?group_by[]=description instead",
            )
        return "anthropic", "anthropic_cost_report_json", ""
    raise _file_error(
        f"unknown layout: {buckets[0].where} has the keys {', '.join(sorted(first))[:200]}; "
        f"accepted: {_ACCEPTED}"
    )


def _parse_json(text: str, provider: str | None) -> ParsedBill:
    buckets = _buckets(_load_json(text))
    if not buckets:
        raise _file_error("empty: no time buckets ('data' is empty)", "The provider bill is empty.")
    found, layout_name, refused = _json_layout(buckets)
    _check_provider(found, provider, layout_name, refused)
    assert layout_name is not None
    bill = ParsedBill(LAYOUTS[layout_name])
    openai = found == "openai"
    for bucket in buckets:

        def where(key: str, b: _Bucket = bucket) -> str:
            return f"{b.where}, key {key!r}"

        start_key, end_key = ("start_time", "end_time") if openai else ("starting_at", "ending_at")
        if start_key not in bucket.body:
            raise _file_error(f"{where(start_key)}: missing")
        start = _instant(bucket.body[start_key], where(start_key))
        _one_day(start, bucket.body.get(end_key), where(end_key))
        bill.days.add(start.date())
        for j, result in enumerate(bucket.results):

            def at(key: str, j: int = j, b: _Bucket = bucket) -> str:
                return f"{b.where}.results[{j}], key {key!r}"

            if not isinstance(result, dict):
                raise _file_error(f"{bucket.where}.results[{j}]: not an object")
            bill.rows += 1
            if openai:
                _openai_result(result, at, start.date(), bill)
            else:
                _anthropic_result(result, at, start.date(), bill)
    return bill


def _openai_result(result: dict[str, Any], at: Where, day: date, bill: ParsedBill) -> None:
    money = result.get("amount")
    if not isinstance(money, dict):
        raise _file_error(f"{at('amount')}: {'missing' if money is None else 'not an object'}")
    if "value" not in money:
        raise _file_error(f"{at('amount.value')}: missing")
    amount = _amount(money["value"], at("amount.value"))
    _usd(money.get("currency"), at("amount.currency"))
    model = _text(result.get("line_item"), at("line_item")).split(",", 1)[0].strip()
    if not model:
        if amount == 0:
            return
        raise _file_error(
            f"{at('line_item')}: {_show(result.get('line_item'))}: request the costs with "
            "group_by=line_item, so each cost names its model"
        )
    bill.add(day, model, _text(result.get("project_id"), at("project_id")), amount, at("line_item"))


def _anthropic_result(result: dict[str, Any], at: Where, day: date, bill: ParsedBill) -> None:
    if "amount" not in result:
        raise _file_error(f"{at('amount')}: missing")
    amount = _amount(result["amount"], at("amount"), cents=True)  # lowest units: cents
    _usd(result.get("currency"), at("currency"))
    model = _anthropic_model(_text(result.get("model"), at("model")))
    if not model:
        kind = _text(result.get("cost_type"), at("cost_type")).lower()
        if kind and kind not in ("token", "tokens"):
            model = f"({kind})"
        elif amount == 0:
            return
        else:
            raise _file_error(
                f"{at('model')}: {_show(result.get('model'))}: request the cost report with "
                "group_by[]=description, so each cost names its model"
            )
    project = _text(result.get("workspace_id"), at("workspace_id"))
    bill.add(day, model, project, amount, at("model"))


def _check_provider(found: str, stated: str | None, layout: str | None, refused: str) -> None:
    if stated is not None and stated != found:
        what = LAYOUTS[layout].label if layout else f"a {found} export"
        raise _file_error(
            f"mislabelled: the file is {what}, but the provider given is {stated!r}",
            "Mislabelled provider bill.",
        )
    if layout is None:
        raise _file_error(refused, "Not a cost export.")


def parse_bill(text: str, provider: str | None = None) -> ParsedBill:
    """The bill's amounts per (UTC day, model, project); a 400 naming row and column."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BILL_BYTES:
        raise too_large(size)
    bad = _UNSTORABLE.search(text)
    if bad:
        what = "a NUL character" if bad.group() == "\x00" else "an unpaired surrogate"
        raise _file_error(f"not a text export: {what} at character {bad.start() + 1}")
    body = text.lstrip("\ufeff \t\r\n")
    if not body:
        raise _file_error("empty: no header and no rows", "The provider bill is empty.")
    bill = _parse_json(body, provider) if body[0] in "{[" else _parse_csv(body, provider)
    first, last = min(bill.days), max(bill.days)
    if (last - first).days + 1 > MAX_SPAN_DAYS:
        raise _file_error(
            f"the bill spans {(last - first).days + 1:,} days ({first} .. {last}); "
            f"at most {MAX_SPAN_DAYS:,} at once"
        )
    return bill


# --- comparing it with the ledger ----------------------------------------------------------------


def _family(model: str) -> str:
    """A model name without case, separators or a dated snapshot suffix."""
    return _DATED.sub("", re.sub(r"[\s._]+", "-", model.strip().lower()))


def match_models(billed: set[str], ledger: set[str]) -> tuple[dict[str, str], list[str]]:
    """Bill model name → the ledger's: the same name, else the one ledger model of the same
    family (a dated snapshot and its alias: "gpt-4o-mini-2024-07-18" and "gpt-4o-mini") when
    exactly one bill name and one ledger name share it. Returns the map and notes."""
    mapping = {m: m for m in billed}
    free = ledger - billed
    claims: dict[str, list[str]] = {}
    notes: list[str] = []
    for name in sorted(billed - ledger):
        candidates = sorted(m for m in free if _family(m) == _family(name))
        if len(candidates) == 1:
            claims.setdefault(candidates[0], []).append(name)
        elif candidates:
            notes.append(
                f"model {name!r}: not compared with {', '.join(map(repr, candidates))} "
                "(ambiguous: several ledger models of its family)"
            )
    for ledger_name, names in sorted(claims.items()):
        if len(names) == 1:
            mapping[names[0]] = ledger_name
            notes.append(f"model {names[0]!r} on the bill is {ledger_name!r} in the ledger")
        else:
            notes.append(
                f"models {', '.join(map(repr, names))}: not compared with {ledger_name!r} "
                "(ambiguous: several bill models of its family)"
            )
    return mapping, notes


def percent(difference: Decimal, billed: Decimal) -> Decimal | None:
    """difference / billed in percent (3 places); None when billed is 0 or beyond 1e9 %."""
    if billed == 0:
        return None
    pct = difference * 100 / billed
    return pct.quantize(_PCT, ROUND_HALF_UP) if abs(pct) < _PCT_LIMIT else None


def _within(difference: Decimal, billed: Decimal, tolerance_pct: Decimal) -> bool:
    return abs(difference) * 100 <= abs(billed) * tolerance_pct


@dataclass(slots=True)
class Comparison:
    lines: list[BillLine]
    by_project: bool
    notes: list[str]


def _some(names: set[str]) -> str:
    first = sorted(names)[:3]
    return ", ".join(first) + (", …" if len(names) > len(first) else "")


def _ledger_cells(principal: Principal, provider: str, first: date, last: date) -> Any:
    since = datetime.combine(first, time.min, tzinfo=UTC)
    return aggregate_for(
        principal,
        filters={"provider": provider},
        group_by=["project_id", "model"],
        since=since,
        until=datetime.combine(last, time.min, tzinfo=UTC) + DAY,
        interval="day",
        tz=rollups.parse_tz("UTC"),
    ).rows


def compare(
    *,
    principal: Principal,
    bill: ParsedBill,
    tolerance_pct: Decimal,
    by_project: bool | None = None,
) -> Comparison:
    """One unsaved BillLine per (day, model[, project]) that the bill or the ledger has cost for
    over the bill's days, for the bill's provider. `by_project` None: per project when the
    export has projects and one of them is a ledger project_id."""
    first, last = min(bill.days), max(bill.days)
    ledger: dict[Key, list[int]] = {}
    for (project, model, period), values in _ledger_cells(
        principal, bill.layout.provider, first, last
    ).items():
        cell = ledger.setdefault((period.astimezone(UTC).date(), model, project), [0, 0])
        cell[0] += values["cost_units"]
        cell[1] += values["input_tokens"] + values["output_tokens"]
    mapping, notes = match_models({m for _d, m, _p in bill.amounts}, {m for _d, m, _p in ledger})
    ledger_projects = {p for _d, _m, p in ledger if p}
    if by_project is None:
        shared = bill.projects & ledger_projects
        by_project = bool(shared)
        if bill.projects:
            notes.append(
                f"compared per project ({len(shared)} of the export's {len(bill.projects)} "
                "projects are ledger project ids)"
                if shared
                else f"not compared per project: none of the export's {len(bill.projects)} "
                f"projects ({_some(bill.projects)}) is a ledger project_id; set by_project to "
                "compare them anyway"
            )
    elif by_project and not bill.projects:
        raise ApiError(
            "This bill has no projects.",
            fields={"by_project": ["The export names no project: compare it by model only."]},
        )
    billed: dict[Key, Decimal] = {}
    for (day, model, project), amount in bill.amounts.items():
        key = (day, mapping[model], project if by_project else "")
        billed[key] = billed.get(key, Decimal(0)) + amount
    cells: dict[Key, list[int]] = {}
    for (day, model, project), (units, tokens) in ledger.items():
        cell = cells.setdefault((day, model, project if by_project else ""), [0, 0])
        cell[0] += units
        cell[1] += tokens
    total = sum((abs(a) for a in billed.values()), Decimal(0))
    if total >= MAX_TOTAL:
        raise _file_error(f"the amounts add up to more than {MAX_TOTAL:,} {pricing.CURRENCY}")
    lines = []
    for key in sorted(billed.keys() | cells.keys()):
        day, model, project = key
        on_bill = pricing.ledger_cost(billed[key]) if key in billed else None
        units, tokens = cells.get(key, (0, 0))
        if on_bill is None and units == 0:
            continue  # usage the ledger priced at nothing, on no bill: nothing to reconcile
        if on_bill == 0 and key not in cells:
            continue  # a zero line for something the ledger never saw
        spent = rollups.units_to_money(units)
        paid = on_bill or Decimal(0)
        difference = spent - paid
        if key not in cells:
            status = BillLine.Status.MISSING_IN_LEDGER
        elif on_bill is None:
            status = BillLine.Status.MISSING_IN_BILL
        elif _within(difference, paid, tolerance_pct):
            status = BillLine.Status.MATCHED
        else:
            status = BillLine.Status.OVER if difference > 0 else BillLine.Status.UNDER
        lines.append(
            BillLine(
                day=day,
                model=model,
                project_id=project,
                billed=paid,
                ledger=spent,
                difference=difference,
                difference_pct=percent(difference, paid),
                billed_tokens=None,  # the cost exports carry money, not tokens
                ledger_tokens=tokens,
                status=status,
                flagged=status != BillLine.Status.MATCHED,
            )
        )
    return Comparison(lines, by_project, notes)


# --- storing and showing it ----------------------------------------------------------------------


def _money(value: Decimal | None) -> str | None:
    return None if value is None else pricing.money(value)


def _worst(value: Decimal) -> Decimal:
    return -abs(value)


@dataclass(slots=True)
class _Sums:
    lines: int = 0
    flagged: int = 0
    billed: Decimal = Decimal(0)
    ledger: Decimal = Decimal(0)

    def add(self, line: BillLine) -> None:
        self.lines += 1
        self.flagged += int(line.flagged)
        self.billed += line.billed
        self.ledger += line.ledger

    @property
    def difference(self) -> Decimal:
        return self.ledger - self.billed

    def out(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "billed": _money(self.billed),
            "ledger": _money(self.ledger),
            "difference": _money(self.difference),
        }


def day_totals(
    lines: list[BillLine], first: date, last: date, tolerance_pct: Decimal
) -> list[dict[str, Any]]:
    """Every day of the bill's span with its lines' sums, worst (largest absolute difference)
    first; a day is flagged when its difference is beyond the tolerance."""
    sums = {first + timedelta(days=i): _Sums() for i in range((last - first).days + 1)}
    for line in lines:
        sums.setdefault(line.day, _Sums()).add(line)
    ranked = sorted(sums.items(), key=lambda item: (_worst(item[1].difference), item[0]))
    return [
        {
            "day": day.isoformat(),
            "billed": _money(day_sums.billed),
            "ledger": _money(day_sums.ledger),
            "difference": _money(day_sums.difference),
            "difference_pct": _money(percent(day_sums.difference, day_sums.billed)),
            "flagged": not _within(day_sums.difference, day_sums.billed, tolerance_pct),
            "lines": day_sums.lines,
            "flagged_lines": day_sums.flagged,
        }
        for day, day_sums in ranked
    ]


def line_out(line: BillLine) -> dict[str, Any]:
    return {
        "day": line.day.isoformat(),
        "model": line.model,
        "project_id": line.project_id,
        "billed": _money(line.billed),
        "ledger": _money(line.ledger),
        "difference": _money(line.difference),
        "difference_pct": _money(line.difference_pct),
        "billed_tokens": line.billed_tokens,
        "ledger_tokens": line.ledger_tokens,
        "status": line.status,
        "flagged": line.flagged,
    }


def worst_first(lines: list[BillLine]) -> list[BillLine]:
    return sorted(lines, key=lambda x: (_worst(x.difference), x.day, x.model, x.project_id))


def bill_header(bill: BillImport) -> dict[str, Any]:
    difference = bill.ledger - bill.billed
    return {
        "id": bill.pk,
        "provider": bill.provider,
        "source_format": bill.source_format,
        "filename": bill.filename,
        "sha256": bill.sha256,
        "currency": bill.currency,
        "first_day": bill.first_day.isoformat(),
        "last_day": bill.last_day.isoformat(),
        "days_covered": (bill.last_day - bill.first_day).days + 1,
        "rows": bill.rows,
        "by_project": bill.by_project,
        "tolerance_pct": _money(bill.tolerance_pct),
        "billed": _money(bill.billed),
        "ledger": _money(bill.ledger),
        "difference": _money(difference),
        "difference_pct": _money(percent(difference, bill.billed)),
        "flagged_days": bill.flagged_days,
        "imported_by": bill.imported_by,
        "imported_at": bill.imported_at.isoformat(),
    }


def _previous_import(bill: BillImport) -> int | None:
    earlier = BillImport.objects.filter(sha256=bill.sha256, pk__lt=bill.pk).order_by("-pk")
    return earlier.values_list("pk", flat=True).first()


def bill_result(
    bill: BillImport, lines: list[BillLine] | None = None, notes: list[str] | None = None
) -> dict[str, Any]:
    """The whole reconciliation: header, totals, days and lines, worst first."""
    lines = list(bill.lines.all()) if lines is None else lines
    by_status = {s: _Sums() for s in STATUSES}
    unexplained = Decimal(0)
    for line in lines:
        by_status[line.status].add(line)
        if line.flagged:
            unexplained += abs(line.difference)
    days = day_totals(lines, bill.first_day, bill.last_day, bill.tolerance_pct)
    difference = bill.ledger - bill.billed
    return {
        **bill_header(bill),
        "duplicate_of": _previous_import(bill),
        "totals": {
            "billed": _money(bill.billed),
            "ledger": _money(bill.ledger),
            "difference": _money(difference),
            "difference_pct": _money(percent(difference, bill.billed)),
            "unexplained": _money(unexplained),
            "unexplained_pct": _money(percent(unexplained, bill.billed)),
            "lines": len(lines),
            "flagged_lines": sum(1 for line in lines if line.flagged),
            "days": len(days),
            "flagged_days": sum(1 for d in days if d["flagged"]),
            "by_status": {s: sums.out() for s, sums in by_status.items()},
        },
        "days": days,
        "lines": [line_out(line) for line in worst_first(lines)],
        "notes": notes or [],
    }


def bill_import(
    *,
    principal: Principal,
    content: str,
    provider: str | None = None,
    filename: str = "",
    tolerance_pct: Decimal = DEFAULT_TOLERANCE_PCT,
    by_project: bool | None = None,
    actor: str = "",
) -> dict[str, Any]:
    """Read a provider's cost export, compare it with the ledger and store both together.
    A 4xx before anything is written for any bad file. The same file again is imported again
    (the ledger may have changed meanwhile); `duplicate_of` names the latest earlier import."""
    bill = parse_bill(content, provider)
    found = compare(
        principal=principal, bill=bill, tolerance_pct=tolerance_pct, by_project=by_project
    )
    first, last = min(bill.days), max(bill.days)
    days = day_totals(found.lines, first, last, tolerance_pct)
    with transaction.atomic():
        row = BillImport.objects.create(
            provider=bill.layout.provider,
            source_format=bill.layout.name,
            filename=filename[:255],
            sha256=hashlib.sha256(content.encode("utf-8")).hexdigest(),
            currency=pricing.CURRENCY,
            first_day=first,
            last_day=last,
            rows=bill.rows,
            billed=sum((line.billed for line in found.lines), Decimal(0)),
            ledger=sum((line.ledger for line in found.lines), Decimal(0)),
            tolerance_pct=tolerance_pct,
            flagged_days=sum(1 for d in days if d["flagged"]),
            by_project=found.by_project,
            imported_by=actor[:200],
        )
        for line in found.lines:
            line.bill = row
        BillLine.objects.bulk_create(found.lines, batch_size=1000)
    return bill_result(row, found.lines, found.notes)


def _refuse_scoped(principal: Principal) -> None:
    # Bills are the organisation's: the actions already refuse scoped keys (staff_or_global).
    if not principal.is_global:
        raise ApiError(
            "Provider bills are organisation-wide.", status_code=403, code="permission_denied"
        )


def bill_for_principal(principal: Principal, bill_id: int) -> BillImport:
    _refuse_scoped(principal)
    try:
        return BillImport.objects.get(pk=bill_id)
    except BillImport.DoesNotExist:
        raise ApiError(
            "Reconciliation not found.",
            status_code=404,
            code="not_found",
            fields={"bill_id": ["No such reconciliation."]},
        ) from None


def bills_for_principal(
    principal: Principal, *, provider: str | None = None, limit: int = 50
) -> list[BillImport]:
    _refuse_scoped(principal)
    rows = BillImport.objects.order_by("-imported_at", "-pk")
    if provider:
        rows = rows.filter(provider=provider)
    return list(rows[:limit])


# --- action inputs -------------------------------------------------------------------------------

Tolerance = Annotated[
    Decimal,
    Field(
        ge=0,
        le=100,
        max_digits=6,
        decimal_places=3,
        description="A line or day differing from the bill by more than this percent of the "
        "billed amount is flagged.",
    ),
]


class BillImportIn(Strict):
    content: Annotated[
        str,
        Field(
            strict=True,
            description="The export's text as downloaded (CSV or JSON), at most 20 MB.",
        ),
    ]
    provider: Provider | None = Field(
        None, description="Whose export it is; left out: detected (a contradiction is a 400)."
    )
    filename: Annotated[str, Field(strict=True, max_length=255)] = ""
    tolerance_pct: Tolerance = DEFAULT_TOLERANCE_PCT
    by_project: Annotated[bool, Field(strict=True)] | None = Field(
        None,
        description="Compare per project too; left out: when the export's projects are "
        "ledger project ids.",
    )

    @field_validator("filename")
    @classmethod
    def _storable(cls, value: str) -> str:
        if re.search("[\x00-\x1f\x7f\ud800-\udfff]", value):
            raise ValueError("Must not contain control characters or unpaired surrogates.")
        return value


class BillListIn(Strict):
    provider: Provider | None = Field(None, description="Only this provider's bills.")
    limit: Annotated[int, Field(ge=1, le=MAX_LIST, description="At most this many.")] = 50


class BillIdIn(Strict):
    bill_id: Annotated[int, Field(ge=0, le=2**63 - 1)]
