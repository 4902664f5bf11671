"""Reconciliation with provider bills (issue 13): each accepted export layout read, the comparison
with the ledger per day x model (x project) with exact money, tolerance flagging, worst-first
ordering, every bad file refused with its row and column and nothing stored, and the API, the
CLI, the admin upload and the scope (organisation-wide: global keys and staff only)."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.utils import timezone

from reporting import reconcile
from reporting.models import BillImport, BillLine
from tests.conftest import Persona, event, settle
from usage import pricing, services

pytestmark = pytest.mark.django_db

URL = "/api/v1/reconciliations"
D1 = timezone.now().date() - timedelta(days=10)
D2, D3 = D1 + timedelta(days=1), D1 + timedelta(days=2)
PRICED = (
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("anthropic", "claude-sonnet-4-20250514"),
)


def _unix(day: date) -> int:
    return int(datetime.combine(day, time.min, tzinfo=UTC).timestamp())


@pytest.fixture(autouse=True)
def _one_dollar_per_million_tokens(db: None) -> None:
    """Every model used here costs exactly 1 USD per million tokens, in and out."""
    for provider, model in PRICED:
        services.model_price_set(
            provider=provider,
            model=model,
            input_per_mtok=Decimal(1),
            output_per_mtok=Decimal(1),
            effective_from=datetime(2020, 1, 1, tzinfo=UTC),
        )
    pricing.overrides.invalidate()


def _spend(persona: Persona, *rows: tuple[date, str, str, str, str]) -> None:
    """Ledger usage: (day, provider, model, project, dollars) each as one request at noon UTC."""
    events = [
        event(
            f"r{i}-{day}-{model}-{project}",
            provider=provider,
            model=model,
            project_id=project,
            input_tokens=int(Decimal(dollars) * 1_000_000),
            output_tokens=0,
            occurred_at=datetime.combine(day, time(12), tzinfo=UTC).isoformat(),
        )
        for i, (day, provider, model, project, dollars) in enumerate(rows)
    ]
    response = persona.client.post("/api/v1/usage/batch", {"events": events}, format="json")
    assert response.status_code == 200, response.content
    settle()


@pytest.fixture
def ledger(platform: Persona) -> Persona:
    """OpenAI: D1 gpt-4o-mini 2.00 and gpt-4o 1.00, D2 gpt-4o-mini 1.50, D3 gpt-4o 0.40, and
    9.00 the day before D1 (outside the bills' span); Anthropic on D1, 5.00 (never part of an
    OpenAI bill)."""
    _spend(
        platform,
        (D1 - timedelta(days=1), "openai", "gpt-4o-mini", "", "9.00"),
        (D1, "openai", "gpt-4o-mini", "", "2.00"),
        (D1, "openai", "gpt-4o", "", "1.00"),
        (D2, "openai", "gpt-4o-mini", "", "1.50"),
        (D3, "openai", "gpt-4o", "", "0.40"),
        (D1, "anthropic", "claude-sonnet-4-20250514", "", "5.00"),
    )
    return platform


OPENAI_HEADER = (
    "start_time,end_time,amount_value,amount_currency,line_item,project_id,"
    "organization_id,project_name,organization_name"
)


def _openai_csv(*rows: tuple[date, str, str], currency: str = "usd") -> str:
    """The Usage page's Cost data export grouped by line item: (day, amount, line item)."""
    lines = [OPENAI_HEADER]
    for day, amount, item in rows:
        start = _unix(day)
        lines.append(
            f'{start},{start + 86400},{amount},{currency},"{item}",proj_default,org-acme,'
            "Default project,Acme"
        )
    return "\n".join(lines) + "\n"


# D1: mini matched (2.00 = 1.50 + 0.50), gpt-4o under (billed 1.10), D2: mini over (billed 1.40),
# o1 not in the ledger (0.30); D3: gpt-4o not on the bill (a zero row keeps D3 in the span).
BILL = _openai_csv(
    (D1, "1.50", "gpt-4o-mini-2024-07-18, input"),
    (D1, "0.50", "gpt-4o-mini-2024-07-18, output"),
    (D1, "1.10", "gpt-4o-2024-08-06, input"),
    (D2, "1.40", "gpt-4o-mini-2024-07-18, input"),
    (D2, "0.30", "o1-2024-12-17, input"),
    (D3, "0", "gpt-4o-mini-2024-07-18, input"),
)


def _import(persona: Persona, content: str, **params: Any) -> Any:
    return persona.client.post(URL, {"content": content, **params}, format="json")


def _lines(body: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    return [(x["day"], x["model"], x["billed"], x["ledger"], x["status"]) for x in body["lines"]]


def _nothing_stored() -> None:
    assert (BillImport.objects.count(), BillLine.objects.count()) == (0, 0)


# --- the comparison ------------------------------------------------------------------------------


def test_it_compares_each_day_and_model_with_the_ledger_to_the_cent(ledger: Persona) -> None:
    response = _import(ledger, BILL, provider="openai", filename="costs.csv")

    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["provider"], body["source_format"], body["rows"]) == (
        "openai",
        "openai_costs_csv",
        6,
    )
    assert (body["first_day"], body["last_day"], body["days_covered"]) == (
        D1.isoformat(),
        D3.isoformat(),
        3,
    )
    assert _lines(body) == [
        (D3.isoformat(), "gpt-4o", "0", "0.4", "missing_in_bill"),
        (D2.isoformat(), "o1-2024-12-17", "0.3", "0", "missing_in_ledger"),
        (D1.isoformat(), "gpt-4o", "1.1", "1", "under"),
        (D2.isoformat(), "gpt-4o-mini", "1.4", "1.5", "over"),
        (D1.isoformat(), "gpt-4o-mini", "2", "2", "matched"),
    ]
    under = body["lines"][2]
    assert (under["difference"], under["difference_pct"], under["flagged"]) == (
        "-0.1",
        "-9.091",
        True,
    )
    assert body["lines"][4]["flagged"] is False


def test_it_totals_the_bill_the_ledger_and_the_unexplained_difference(ledger: Persona) -> None:
    totals = _import(ledger, BILL).json()["totals"]

    # Anthropic's 5.00 on D1 is not part of an OpenAI bill.
    assert (totals["billed"], totals["ledger"], totals["difference"]) == ("4.8", "4.9", "0.1")
    assert totals["difference_pct"] == "2.083"
    # Over and under do not cancel out: 0.4 + 0.3 + 0.1 + 0.1.
    assert (totals["unexplained"], totals["unexplained_pct"]) == ("0.9", "18.75")
    assert totals["by_status"]["missing_in_ledger"] == {
        "lines": 1,
        "billed": "0.3",
        "ledger": "0",
        "difference": "-0.3",
    }
    assert {s: v["lines"] for s, v in totals["by_status"].items()} == {
        "matched": 1,
        "over": 1,
        "under": 1,
        "missing_in_ledger": 1,
        "missing_in_bill": 1,
    }


def test_it_flags_days_beyond_the_tolerance_worst_first(ledger: Persona) -> None:
    body = _import(ledger, BILL).json()

    days = [
        (d["day"], d["billed"], d["ledger"], d["difference"], d["flagged"]) for d in body["days"]
    ]
    assert days == [
        (D3.isoformat(), "0", "0.4", "0.4", True),
        (D2.isoformat(), "1.7", "1.5", "-0.2", True),
        (D1.isoformat(), "3.1", "3", "-0.1", True),
    ]
    assert body["flagged_days"] == BillImport.objects.get().flagged_days == 3


def test_a_wider_tolerance_matches_the_small_differences(ledger: Persona) -> None:
    body = _import(ledger, BILL, tolerance_pct="10").json()

    statuses = {(x["day"], x["model"]): x["status"] for x in body["lines"]}
    assert statuses[(D1.isoformat(), "gpt-4o")] == "matched"  # -9.091 %
    assert statuses[(D2.isoformat(), "gpt-4o-mini")] == "matched"  # +7.143 %
    # D1 is off by 3.2 %, D2 by 11.8 %, D3 has no bill at all.
    assert [d["day"] for d in body["days"] if d["flagged"]] == [D3.isoformat(), D2.isoformat()]
    assert body["tolerance_pct"] == "10"


def test_a_difference_within_half_a_percent_is_matched(ledger: Persona) -> None:
    bill = _openai_csv((D1, "2.009", "gpt-4o-mini-2024-07-18, input"))
    line = _import(ledger, bill).json()["lines"][1]

    assert (line["model"], line["difference"], line["difference_pct"]) == (
        "gpt-4o-mini",
        "-0.009",
        "-0.448",
    )
    assert line["status"] == "matched"


def test_it_names_how_a_dated_model_on_the_bill_was_matched(ledger: Persona) -> None:
    notes = _import(ledger, BILL).json()["notes"]

    assert "model 'gpt-4o-mini-2024-07-18' on the bill is 'gpt-4o-mini' in the ledger" in notes


def test_an_ambiguous_dated_model_is_not_matched() -> None:
    mapping, notes = reconcile.match_models({"gpt-4o"}, {"gpt-4o-2024-05-13", "gpt-4o-2024-08-06"})
    assert mapping == {"gpt-4o": "gpt-4o"}
    assert "ambiguous" in notes[0]


def test_it_compares_per_project_when_the_export_names_ledger_projects(platform: Persona) -> None:
    _spend(
        platform,
        (D1, "openai", "gpt-4o-mini", "proj_a", "1.00"),
        (D1, "openai", "gpt-4o-mini", "proj_b", "0.50"),
    )
    bill = _openai_json(
        [
            (
                D1,
                [
                    ("gpt-4o-mini-2024-07-18, input", "proj_a", 1),
                    ("gpt-4o-mini-2024-07-18, output", "proj_b", "0.7"),
                ],
            )
        ]
    )
    body = _import(platform, bill).json()

    assert body["by_project"] is True
    assert [(x["project_id"], x["status"], x["difference"]) for x in body["lines"]] == [
        ("proj_b", "under", "-0.2"),
        ("proj_a", "matched", "0"),
    ]
    flat = _import(platform, bill, by_project=False).json()
    assert [(x["project_id"], x["billed"], x["ledger"]) for x in flat["lines"]] == [
        ("", "1.7", "1.5")
    ]


def test_projects_the_ledger_does_not_know_are_not_compared(ledger: Persona) -> None:
    body = _import(ledger, BILL).json()

    assert body["by_project"] is False
    assert any("not compared per project" in note for note in body["notes"])


# --- each layout ---------------------------------------------------------------------------------


def _openai_json(buckets: list[tuple[date, list[tuple[str, str | None, Any]]]]) -> str:
    """GET /v1/organization/costs?group_by=line_item,project_id, as the API answers it."""
    return json.dumps(
        {
            "object": "page",
            "data": [
                {
                    "object": "bucket",
                    "start_time": _unix(day),
                    "end_time": _unix(day) + 86400,
                    "results": [
                        {
                            "object": "organization.costs.result",
                            "amount": {"value": value, "currency": "usd"},
                            "line_item": item,
                            "project_id": project,
                        }
                        for item, project, value in results
                    ],
                }
                for day, results in buckets
            ],
            "has_more": False,
            "next_page": None,
        }
    )


def test_it_reads_openais_costs_api_json_with_empty_days(ledger: Persona) -> None:
    bill = _openai_json(
        [
            (D1, [("gpt-4o-mini-2024-07-18, input", None, 2.0), ("gpt-4o, input", None, 1)]),
            (D2, [("gpt-4o-mini-2024-07-18, cached input", None, "1.5")]),
            (D3, []),
        ]
    )
    body = _import(ledger, bill).json()

    assert (body["source_format"], body["rows"], body["last_day"]) == (
        "openai_costs_json",
        3,
        D3.isoformat(),
    )
    assert _lines(body)[0] == (D3.isoformat(), "gpt-4o", "0", "0.4", "missing_in_bill")
    assert {x["status"] for x in body["lines"][1:]} == {"matched"}


ANTHROPIC_HEADER = (
    "usage_date_utc,model,workspace,api_key,usage_type,context_window,token_type,cost_usd,"
    "list_price_usd,cost_type,inference_geo,speed,api_key_id,api_key_status"
)


def test_it_reads_anthropics_console_cost_csv(platform: Persona) -> None:
    _spend(platform, (D1, "anthropic", "claude-sonnet-4-20250514", "", "0.75"))
    bill = "\n".join(
        [
            ANTHROPIC_HEADER,
            f"{D1},Claude Sonnet 4,Default,ci,message,≤ 200k,input_no_cache,0.50,0.50,token,"
            "not_available,,apikey_01A,active",
            f"{D1},Claude Sonnet 4,Default,ci,message,≤ 200k,output,0.25,0.25,token,"
            "not_available,,apikey_01A,active",
            f"{D1},,Default,ci,message,,,0.10,0.10,web_search,not_available,,apikey_01A,active",
        ]
    )
    body = _import(platform, bill).json()

    assert (body["provider"], body["source_format"]) == ("anthropic", "anthropic_cost_csv")
    assert _lines(body) == [
        (D1.isoformat(), "(web_search)", "0.1", "0", "missing_in_ledger"),
        (D1.isoformat(), "claude-sonnet-4-20250514", "0.75", "0.75", "matched"),
    ]
    assert (
        "model 'claude-sonnet-4' on the bill is 'claude-sonnet-4-20250514' in the ledger"
        in (body["notes"])
    )


def _anthropic_json(day: date, *results: dict[str, Any]) -> str:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return json.dumps(
        {
            "data": [
                {
                    "starting_at": start.isoformat().replace("+00:00", "Z"),
                    "ending_at": (start + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
                    "results": list(results),
                }
            ],
            "has_more": False,
            "next_page": None,
        }
    )


def _cost(amount_cents: str, **fields: Any) -> dict[str, Any]:
    return {
        "currency": "USD",
        "amount": amount_cents,
        "workspace_id": None,
        "description": "Claude Sonnet 4 Usage - Input Tokens",
        "cost_type": "tokens",
        "context_window": "0-200k",
        "model": "claude-sonnet-4-20250514",
        "service_tier": "standard",
        "token_type": "uncached_input_tokens",
        **fields,
    }


def test_it_reads_anthropics_cost_report_json_in_cents(platform: Persona) -> None:
    _spend(platform, (D1, "anthropic", "claude-sonnet-4-20250514", "", "0.75"))
    bill = _anthropic_json(D1, _cost("50.0"), _cost("25", token_type="output_tokens"))
    body = _import(platform, bill, provider="anthropic").json()

    assert body["source_format"] == "anthropic_cost_report_json"
    assert _lines(body) == [(D1.isoformat(), "claude-sonnet-4-20250514", "0.75", "0.75", "matched")]


def test_it_reads_a_paginated_download_saved_as_a_list_of_pages(ledger: Persona) -> None:
    first = json.loads(_openai_json([(D1, [("gpt-4o-mini-2024-07-18, input", None, 2)])]))
    second = json.loads(_openai_json([(D2, [("gpt-4o-mini-2024-07-18, input", None, "1.5")])]))
    second["data"][0]["result"] = second["data"][0].pop("results")  # the reference's spelling
    body = _import(ledger, json.dumps([first, second])).json()

    assert (body["rows"], body["first_day"], body["last_day"]) == (
        2,
        D1.isoformat(),
        D2.isoformat(),
    )
    assert _lines(body)[0] == (D1.isoformat(), "gpt-4o", "0", "1", "missing_in_bill")
    assert body["totals"]["by_status"]["matched"]["lines"] == 2


def test_a_utf16_upload_is_read(ledger: Persona) -> None:
    upload = SimpleUploadedFile("costs.csv", BILL.encode("utf-16"), "text/csv")
    response = ledger.client.post(URL, {"file": upload}, format="multipart")

    assert response.status_code == 201, response.json()
    assert response.json()["rows"] == 6


# --- bad files: a 400 naming the row and column, nothing stored -------------------------------


@pytest.mark.parametrize(
    ("content", "provider", "says"),
    [
        (
            OPENAI_HEADER + f'\n{_unix(D1)},,1,usd,"gpt-4o, input",,,,\n'
            f'{_unix(D1)},,abc,usd,"gpt-4o, input",,,,\n',
            None,
            "row 3, column 'amount_value': not a number: 'abc'",
        ),
        (
            OPENAI_HEADER + '\nyesterday,,1,usd,"gpt-4o, input",,,,\n',
            None,
            "row 2, column 'start_time': not a date: 'yesterday'",
        ),
        (
            "start_time,amount_value,line_item\n1,2,gpt-4o\n",
            None,
            "row 1, column 'amount_currency': missing from the header",
        ),
        (OPENAI_HEADER + f'\n{_unix(D1)},,1,usd,"gpt-4o, input\n', None, "row 2: malformed CSV"),
        (OPENAI_HEADER + f"\n{_unix(D1)},,1,usd\n", None, "row 2: 4 fields, but the header has 9"),
        ('{"data": [{"start_time": 1', None, "malformed JSON at line 1"),
        ("a,b\n1,2\n", None, "unknown layout: the header's columns are a, b"),
        (BILL, "anthropic", "mislabelled: the file is OpenAI cost export"),
        (_anthropic_json(D1, _cost("50")), "openai", "mislabelled"),
        (_anthropic_json(D1, _cost("5O")), None, "data[0].results[0], key 'amount': not a number"),
        (
            "start_time,end_time,num_model_requests,input_tokens,output_tokens,model\n",
            None,
            "OpenAI's Activity export (tokens, no costs)",
        ),
        ("", None, "empty"),
        (OPENAI_HEADER + "\n", None, "empty: the header has no rows under it"),
        ('{"object": "page", "data": []}', None, "empty: no time buckets"),
        (
            OPENAI_HEADER + f'\n{_unix(D1)},{_unix(D1) + 7 * 86400},1,usd,"gpt-4o, input",,,,\n',
            None,
            "row 2, column 'end_time': the bucket",
        ),
        (
            OPENAI_HEADER + f'\n{_unix(date(2014, 12, 31))},,1,usd,"gpt-4o, input",,,,\n',
            None,
            "row 2, column 'start_time': out of range: 2014-12-31",
        ),
    ],
)
def test_a_bad_file_is_refused_with_its_row_and_column_and_nothing_is_stored(
    ledger: Persona, content: str, provider: str | None, says: str
) -> None:
    params = {"provider": provider} if provider else {}
    response = _import(ledger, content, **params)

    assert response.status_code == 400, response.json()
    [message] = response.json()["error"]["fields"]["file"]
    assert says in message
    _nothing_stored()


def test_a_bill_in_another_currency_is_refused_naming_it(ledger: Persona) -> None:
    response = _import(ledger, _openai_csv((D1, "1", "gpt-4o, input"), currency="eur"))

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The bill is in EUR, not USD."
    assert (
        "row 2, column 'amount_currency': the currency is 'EUR'"
        in (response.json()["error"]["fields"]["file"][0])
    )
    _nothing_stored()


def test_a_file_over_the_size_limit_is_a_413(
    ledger: Persona, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "MAX_BILL_BYTES", 100)
    upload = SimpleUploadedFile("costs.csv", BILL.encode())
    response = ledger.client.post(URL, {"file": upload}, format="multipart")

    assert response.status_code == 413
    assert "At most 100 bytes" in response.json()["error"]["fields"]["file"][0]
    assert _import(ledger, BILL).status_code == 413
    _nothing_stored()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"tolerance_pct": "-1"}, "tolerance_pct"),
        ({"tolerance_pct": "0.0001"}, "tolerance_pct"),
        ({"provider": "azure"}, "provider"),
        ({"by_project": "yes"}, "by_project"),
        ({"filename": "a\x01b"}, "filename"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(
    ledger: Persona, params: dict[str, Any], field: str
) -> None:
    response = _import(ledger, BILL, **params)

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    _nothing_stored()


def test_by_project_on_an_export_without_projects_is_refused(platform: Persona) -> None:
    _spend(platform, (D1, "openai", "gpt-4o-mini", "", "1"))
    bill = _openai_json([(D1, [("gpt-4o-mini, input", None, 1)])])
    response = _import(platform, bill, by_project=True)

    assert response.status_code == 400
    assert "by_project" in response.json()["error"]["fields"]
    _nothing_stored()


# --- the API -------------------------------------------------------------------------------------


def test_a_multipart_upload_as_a_spreadsheet_saves_it_is_read_the_same(ledger: Persona) -> None:
    spreadsheet = "\ufeff" + BILL.replace("\n", "\r\n")
    upload = SimpleUploadedFile("costs.csv", spreadsheet.encode("utf-8"), "text/csv")
    response = ledger.client.post(
        URL, {"file": upload, "provider": "openai", "tolerance_pct": "0.5"}, format="multipart"
    )

    assert response.status_code == 201, response.json()
    assert response.json()["filename"] == "costs.csv"
    assert _lines(response.json()) == _lines(_import(ledger, BILL).json())


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"PK\x03\x04\x14\x00\x08\x08\xa0\xb1", "not UTF-8 text (byte 9 cannot be decoded)"),
        (b"start_time,amount_value\n\x00\x00", "not a text export: a NUL byte at character 25"),
    ],
)
def test_an_upload_that_is_not_a_text_export_is_refused(
    ledger: Persona, raw: bytes, says: str
) -> None:
    upload = SimpleUploadedFile("costs.xlsx", raw)
    response = ledger.client.post(URL, {"file": upload}, format="multipart")

    assert response.status_code == 400
    assert says in response.json()["error"]["fields"]["file"][0]
    _nothing_stored()


def test_an_upload_without_the_file_field_is_refused(ledger: Persona) -> None:
    response = ledger.client.post(URL, {"provider": "openai"}, format="multipart")

    assert response.status_code == 400
    assert "file" in response.json()["error"]["fields"]


def test_the_stored_reconciliation_reads_back_as_it_was_imported(ledger: Persona) -> None:
    created = _import(ledger, BILL, filename="aug.csv").json()
    detail = ledger.client.get(f"{URL}/{created['id']}")
    listed = ledger.client.get(URL, {"provider": "openai"})

    assert detail.status_code == 200
    assert {**detail.json(), "notes": []} == {**created, "notes": []}
    [row] = listed.json()["results"]
    assert (row["id"], row["filename"], row["billed"], row["flagged_days"]) == (
        created["id"],
        "aug.csv",
        "4.8",
        3,
    )
    assert ledger.client.get(URL, {"provider": "anthropic"}).json()["results"] == []
    assert ledger.client.get(f"{URL}/999999").status_code == 404


def test_importing_the_same_file_again_names_the_earlier_import(ledger: Persona) -> None:
    first = _import(ledger, BILL).json()
    again = _import(ledger, BILL).json()

    assert (first["duplicate_of"], again["duplicate_of"]) == (None, first["id"])
    assert again["sha256"] == first["sha256"]
    assert BillImport.objects.count() == 2


@pytest.mark.parametrize("who", ["member", "team_lead", "staff_viewer"])
def test_bills_are_organisation_wide(
    request: pytest.FixtureRequest, ledger: Persona, who: str
) -> None:
    caller: Persona = request.getfixturevalue(who)
    bill_id = _import(ledger, BILL).json()["id"]

    assert _import(caller, BILL).status_code == 403
    assert caller.client.get(URL).status_code == 403
    assert caller.client.get(f"{URL}/{bill_id}").status_code == 403
    assert BillImport.objects.count() == 1


def test_a_staff_user_with_the_permissions_imports_and_reads(
    ledger: Persona, django_user_model: Any
) -> None:
    from tests.conftest import _staff_persona

    clerk = _staff_persona(
        django_user_model, "clerk", ("reporting.add_billimport", "reporting.view_billimport")
    )
    created = _import(clerk, BILL)

    assert created.status_code == 201
    assert created.json()["imported_by"] == f"staff user #{clerk.user.pk}"
    assert clerk.client.get(f"{URL}/{created.json()['id']}").status_code == 200


# --- the CLI -------------------------------------------------------------------------------------


def _token(*args: str) -> str:
    out = io.StringIO()
    call_command("token", "reconcile", *args, stdout=out)
    return out.getvalue()


def test_the_cli_prints_the_worst_days_first(ledger: Persona, tmp_path: Path) -> None:
    path = tmp_path / "costs.csv"
    path.write_text(BILL)
    text = _token(str(path), "--provider", "openai")

    assert "Billed 4.8 USD, ledger 4.9: difference 0.1 (2.083 %); unexplained 0.9" in text
    days = text.split("Days, worst first:\n")[1].splitlines()
    assert days[0].split() == [
        "day",
        "billed",
        "ledger",
        "difference",
        "difference_pct",
        "lines",
        "flagged_lines",
        "flagged",
    ]
    assert [line.split()[0] for line in days[2:5]] == [
        D3.isoformat(),
        D2.isoformat(),
        D1.isoformat(),
    ]
    assert days[2].split() == [D3.isoformat(), "0", "0.4", "0.4", "-", "1", "1", "yes"]
    assert BillImport.objects.get().imported_by == "cli"


def test_the_cli_json_is_the_apis_body(ledger: Persona, tmp_path: Path) -> None:
    path = tmp_path / "costs.csv"
    path.write_text(BILL)
    body = json.loads(_token(str(path), "--json", "--tolerance", "10"))

    assert body["tolerance_pct"] == "10"
    assert _lines(body) == _lines(_import(ledger, BILL, tolerance_pct="10").json())


def test_the_cli_refuses_a_bad_file_in_one_line(ledger: Persona, tmp_path: Path) -> None:
    path = tmp_path / "costs.csv"
    path.write_text(BILL.replace(",1.10,", ",abc,"))
    with pytest.raises(CommandError) as refused:
        _token(str(path))

    assert str(refused.value) == (
        "Unreadable provider bill. FILE: row 4, column 'amount_value': not a number: 'abc'"
    )
    with pytest.raises(CommandError, match="FILE: No such file"):
        _token(str(tmp_path / "missing.csv"))
    _nothing_stored()


# --- the admin -----------------------------------------------------------------------------------

ADD = "/admin/reporting/billimport/add/"


def test_the_admin_uploads_a_bill_and_shows_its_worst_days_first(
    ledger: Persona, admin: Persona
) -> None:
    assert admin.client.get(ADD).status_code == 200
    upload = SimpleUploadedFile("costs.csv", BILL.encode())
    response = admin.client.post(
        ADD, {"file": upload, "provider": "", "tolerance_pct": "0.5", "by_project": ""}
    )

    stored = BillImport.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/admin/reporting/billimport/{stored.pk}/change/"
    page = admin.client.get(response["Location"]).content.decode()
    days = page[page.index('id="bill-days"') :]
    assert days.index(D3.isoformat()) < days.index(D2.isoformat()) < days.index(D1.isoformat())
    lines = page[page.index('id="bill-lines"') :]
    assert lines.index("not on the bill") < lines.index("not in the ledger")
    listing = admin.client.get("/admin/reporting/billimport/").content.decode()
    assert "4.8" in listing
    assert "4.9" in listing


def test_a_bad_file_in_the_admin_is_a_form_error_and_nothing_is_stored(
    ledger: Persona, admin: Persona
) -> None:
    upload = SimpleUploadedFile("costs.csv", BILL.replace("usd", "eur").encode())
    response = admin.client.post(ADD, {"file": upload, "tolerance_pct": "0.5"})

    assert response.status_code == 200
    assert "the currency is &#x27;EUR&#x27;" in response.content.decode()
    _nothing_stored()


def test_staff_without_the_add_permission_cannot_upload(
    ledger: Persona, staff_viewer: Persona
) -> None:
    assert staff_viewer.client.get(ADD).status_code == 403
