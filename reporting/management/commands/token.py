"""manage.py token stats|export|budget|cost|reprice|reconcile|backtest — the ledger from a
terminal, as a global key.

Each subcommand validates its arguments, calls one registry action or selector, and prints an
aligned table (or, with --json, the machine-readable body). Bad arguments and refused input exit
non-zero with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.utils import timezone

# tqdm ships no type information (no py.typed); only its constructor and update() are used.
from tqdm import tqdm  # type: ignore[import-untyped]

from reporting import exports, forecasts, reconcile, runs
from reporting.reports import ALIASES
from tokenmgr_project.core import actions
from tokenmgr_project.core.errors import ApiError
from tokenmgr_project.core.principal import GLOBAL, Principal
from usage.selectors import exact_filters, parse_range

# The CLI acts as a global key: every team and project (README "Who may do what").
PRINCIPAL = Principal(scope=GLOBAL)
DEFAULT_PERIOD_HOURS = 24.0
DEFAULT_RUNS_PERIOD_HOURS = 7 * 24.0
MAX_PERIOD_HOURS = 100 * 366 * 24.0
MAX_RUNS = 1000
COST_BY = ("agent", "model", "team", "project")
STATS_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "total_tokens",
    "cost",
    "cost_per_1k_tokens",
    "errors",
)
# What an action's field errors are called on this command line.
OPTION_NAMES = {
    "team_id": "--team",
    "project_id": "--project",
    "group_by": "--by",
    "token_budget": "--set",
    "since": "--since",
    "until": "--until",
    "agent": "--agent",
    "model": "--model",
    "provider": "--provider",
    "format": "--format",
    "dimension": "--dimension",
    "window": "--window",
    "tolerance_pct": "--tolerance",
    "file": "FILE",
    "by_project": "--by-project",
}
_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+")


class OneLineParser(CommandParser):
    """argparse prints its usage (several lines) before an error; a script wants one line."""

    def error(self, message: str) -> NoReturn:
        if self.called_from_command_line:
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
        raise CommandError(f"Error: {message}")


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = math.nan
    if not (math.isfinite(hours) and 0 < hours <= MAX_PERIOD_HOURS):
        raise argparse.ArgumentTypeError(f"must be a positive number of hours, not {text!r}")
    return hours


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_RUNS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_RUNS}")
    return int(text)


def one_line(exc: ApiError) -> str:
    """An action's error as one line: its message and each field's messages, named as options."""
    parts = [f"{OPTION_NAMES.get(k, k)}: {' '.join(v)}" for k, v in exc.fields.items()]
    return " ".join([exc.message, "; ".join(parts)]).strip().replace("\n", " ")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> list[str]:
    """An aligned text table: a header, a rule, one line per row; number columns right-aligned."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        bool(cells) and all(_NUMBER.fullmatch(r[i]) or r[i] == "-" for r in cells)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return [line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]


def _plain(text: str) -> str:
    """No styling: Django colours everything on a terminal's stderr as an error."""
    return text


class _Raw:
    """A stream for tqdm over a command's OutputWrapper (which would end each write with \\n)."""

    def __init__(self, out: OutputWrapper) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text, style_func=_plain, ending="")

    def flush(self) -> None:
        self.out.flush()


class Command(BaseCommand):
    help = (
        "Token usage from the ledger, as a global API key: stats, export, budget, cost, reprice. "
        "Tables for a terminal; --json for scripts."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.__class__ = OneLineParser  # same state, one-line errors (the subparsers' too)
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="verb", required=True, parser_class=OneLineParser)

        stats = sub.add_parser("stats", help="Totals and a breakdown table.")
        self._filters(stats)
        stats.add_argument(
            "--by", default="model", help="Breakdown dimension(s), comma-separated (model)."
        )
        self._range(stats, DEFAULT_PERIOD_HOURS)

        export = sub.add_parser("export", help="Raw ledger rows as JSON, CSV or Markdown.")
        export.add_argument("--format", choices=("json", "csv", "md"), default="csv")
        self._filters(export)
        self._range(export, DEFAULT_PERIOD_HOURS)
        export.add_argument("--output", help="File to write (default: standard output).")
        export.add_argument(
            "--progress",
            action="store_true",
            help="Show a progress bar on standard error even when it is not a terminal.",
        )

        budget = sub.add_parser("budget", help="An agent profile's per-run budget and its runs.")
        budget.add_argument("agent", metavar="AGENT")
        budget.add_argument("--set", type=int, metavar="N", help="Set the per-run token budget.")
        budget.add_argument(
            "--runs", type=_count, default=10, help="Recent runs to show (default 10)."
        )
        budget.add_argument(
            "--period",
            type=_hours,
            default=DEFAULT_RUNS_PERIOD_HOURS,
            metavar="HOURS",
            help="Runs active in the last HOURS (default 168).",
        )
        budget.add_argument("--json", action="store_true", help="Print JSON.")

        cost = sub.add_parser("cost", help="Cost breakdown and cost per execution.")
        cost.add_argument("agent", nargs="?", metavar="AGENT", help="Only this agent's usage.")
        cost.add_argument("--by", choices=COST_BY, default="agent")
        self._range(cost, DEFAULT_PERIOD_HOURS)

        reprice = sub.add_parser("reprice", help="Price past usage again (dry run unless --apply).")
        reprice.add_argument("--since", required=True, help="ISO 8601, inclusive.")
        reprice.add_argument("--until", required=True, help="ISO 8601, exclusive.")
        reprice.add_argument("--provider", default="")
        reprice.add_argument("--model", default="")
        reprice.add_argument("--apply", action="store_true", help="Rewrite the costs.")
        reprice.add_argument("--json", action="store_true", help="Print JSON.")

        bill = sub.add_parser(
            "reconcile", help="Compare a provider's cost export (CSV or JSON) with the ledger."
        )
        bill.add_argument("file", metavar="FILE", help="The export as the console downloaded it.")
        bill.add_argument("--provider", choices=reconcile.PROVIDERS, help="Default: detected.")
        bill.add_argument(
            "--tolerance",
            metavar="PCT",
            help=f"Flag lines and days beyond PCT %% (default {reconcile.DEFAULT_TOLERANCE_PCT}).",
        )
        bill.add_argument(
            "--by-project",
            choices=("auto", "yes", "no"),
            default="auto",
            help="Compare per project too (auto: when the export's projects are ledger ids).",
        )
        bill.add_argument("--json", action="store_true", help="Print JSON.")
        backtest = sub.add_parser(
            "backtest", help="Replay history: the forecast's error (MAPE) per series and overall."
        )
        backtest.add_argument(
            "--days",
            type=_bounded(1, 365),
            default=28,
            help="Forecast from each of the last N days (default 28).",
        )
        backtest.add_argument(
            "--horizon", type=_bounded(1, 31), default=7, help="Days ahead (default 7; 1 too)."
        )
        backtest.add_argument(
            "--dimension", default="team_id", help="The series: one per value (team_id)."
        )
        backtest.add_argument(
            "--window",
            type=_bounded(forecasts.MIN_WINDOW, forecasts.MAX_WINDOW),
            default=forecasts.DEFAULT_WINDOW,
            help=f"Trailing days the method reads (default {forecasts.DEFAULT_WINDOW}).",
        )
        backtest.add_argument(
            "--until", help="ISO 8601: replay as if it were then (default: now; whole UTC days)."
        )
        backtest.add_argument("--json", action="store_true", help="Print JSON.")

    @staticmethod
    def _filters(parser: CommandParser) -> None:
        parser.add_argument("--agent")
        parser.add_argument("--model")
        parser.add_argument("--team")
        parser.add_argument("--project")

    @staticmethod
    def _range(parser: CommandParser, default_hours: float) -> None:
        parser.add_argument(
            "--period",
            type=_hours,
            metavar="HOURS",
            help=f"The last HOURS (default {default_hours:g}).",
        )
        parser.add_argument("--since", help="ISO 8601 start, instead of --period.")
        parser.add_argument("--until", help="ISO 8601 end (default: now).")
        parser.set_defaults(default_hours=default_hours)
        parser.add_argument("--json", action="store_true", help="Print JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        verbs: dict[str, Callable[[dict[str, Any]], None]] = {
            "stats": self.stats,
            "export": self.export,
            "budget": self.budget,
            "cost": self.cost,
            "reprice": self.reprice,
            "reconcile": self.reconcile,
            "backtest": self.backtest,
        }
        try:
            verbs[options["verb"]](options)
        except ApiError as exc:
            raise CommandError(one_line(exc)) from None

    # --- arguments ---------------------------------------------------------------------------

    @staticmethod
    def _time_range(options: dict[str, Any]) -> tuple[datetime, datetime]:
        if options["period"] is not None and options["since"] is not None:
            raise CommandError("Give --period or --since, not both.")
        since, until = parse_range({"since": options["since"], "until": options["until"]})
        until = until or timezone.now()
        if since is None:
            hours = options["period"] or options["default_hours"]
            try:
                since = until - timedelta(hours=hours)
            except OverflowError:
                raise CommandError("--period reaches before the year 1.") from None
        if since >= until:
            raise CommandError("--since must be before --until.")
        return since, until

    @staticmethod
    def _filter_values(options: dict[str, Any]) -> dict[str, str]:
        """The ledger-column filters, checked as query parameters are (a 400 naming one)."""
        return exact_filters(
            {
                "agent": options.get("agent"),
                "model": options.get("model"),
                "team_id": options.get("team"),
                "project_id": options.get("project"),
            }
        )

    def _json(self, body: Any) -> None:
        self.stdout.write(json.dumps(body, indent=2))

    def _lines(self, lines: Iterable[str]) -> None:
        for text in lines:
            self.stdout.write(text)

    # --- stats -------------------------------------------------------------------------------

    def stats(self, options: dict[str, Any]) -> None:
        since, until = self._time_range(options)
        filters = self._filter_values(options)
        data = {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "group_by": options["by"],
            **filters,
        }
        body = actions.run("get_usage_report", PRINCIPAL, data).body
        if options["json"]:
            self._json(body)
            return
        self.stdout.write(_heading("Usage", body))
        totals = body["totals"]
        width = max(len(k) for k in totals)
        self._lines(f"  {k.ljust(width)}  {_cell(v)}" for k, v in totals.items())
        keys = body["group_by"]
        if not body["rows"]:
            self.stdout.write("\nNo usage in this range.")
            return
        self.stdout.write(f"\nBy {', '.join(keys)}:")
        self._lines(table([*keys, *STATS_COLUMNS], body["rows"]))
        if body["truncated"]:
            self.stdout.write("(truncated: more groups exist than a report holds)")
        for item in body["unpriced"]:
            self.stdout.write(
                f"Unpriced (no cost in the totals): {item['provider']}/{item['model']}, "
                f"{item['requests']:,} requests, {item['tokens']:,} tokens"
            )

    # --- export ------------------------------------------------------------------------------

    def export(self, options: dict[str, Any]) -> None:
        since, until = self._time_range(options)
        filters = self._filter_values(options)
        if options["json"] and not options["output"]:
            raise CommandError("--json needs --output (the export itself goes to stdout).")
        show = options["progress"] or self.stderr.isatty()
        total = (
            exports.usage_export_count(PRINCIPAL, filters=filters, since=since, until=until)
            if show
            else None
        )
        bar = tqdm(total=total, unit=" rows", file=_Raw(self.stderr), disable=not show)
        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            bar.update(n)

        started = time.perf_counter()
        chunks = exports.usage_export(
            PRINCIPAL,
            filters=filters,
            since=since,
            until=until,
            fmt=options["format"],
            progress=progress,
        )
        try:
            if options["output"]:
                _write_file(Path(options["output"]), chunks)
            else:
                for chunk in chunks:
                    self.stdout.write(chunk, ending="")
                self.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): stop, and keep the exit's flush from failing too.
            with contextlib.suppress(AttributeError, OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stdout.fileno())
            raise CommandError("Standard output was closed: export stopped.") from None
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        summary = {
            "rows": done[0],
            "format": options["format"],
            "output": options["output"] or "-",
            "since": since.isoformat(),
            "until": until.isoformat(),
            "seconds": round(seconds, 3),
            "rows_per_second": round(done[0] / seconds) if seconds else None,
        }
        if options["json"]:
            self._json(summary)
            return
        text = (
            f"Exported {done[0]:,} rows ({options['format']}) to {summary['output']} "
            f"in {seconds:.2f} s"
        )
        # With the rows on stdout, the summary goes to stderr so the file stays clean.
        if options["output"]:
            self.stdout.write(text + ".")
        else:
            self.stderr.write(text + ".", style_func=_plain)

    # --- budget ------------------------------------------------------------------------------

    def budget(self, options: dict[str, Any]) -> None:
        agent = options["agent"]
        found = actions.run("list_agent_profiles", PRINCIPAL, {"name": agent}).body["results"]
        if not found:
            raise CommandError(f"No agent profile named {agent!r}.")
        profile = found[0]
        previous = None
        if options["set"] is not None:
            previous = profile["token_budget"]
            changes = {"profile_id": profile["id"], "token_budget": options["set"]}
            profile = actions.run("update_agent_profile", PRINCIPAL, changes).body
        until = timezone.now()
        since = until - timedelta(hours=options["period"])
        recent = runs.agent_runs(
            PRINCIPAL,
            agent=agent,
            token_budget=profile["token_budget"],
            warning_threshold=profile["warning_threshold"],
            since=since,
            until=until,
            limit=options["runs"],
        )
        if options["json"]:
            self._json({"profile": profile, "since": since.isoformat(), "runs": recent})
            return
        threshold = profile["warning_threshold"]
        warn = f"{threshold:,}" if threshold is not None else "80 % (default)"
        if previous is not None:
            self.stdout.write(
                f"Set {agent}'s token budget: {previous:,} -> {profile['token_budget']:,}."
            )
        self.stdout.write(
            f"Agent {agent} ({profile['model']}): {profile['token_budget']:,} tokens per run, "
            f"warning above {warn}."
        )
        if not recent:
            self.stdout.write(f"No runs in the last {options['period']:g} hours.")
            return
        self.stdout.write(f"\nRecent runs (last {options['period']:g} hours, newest first):")
        self._lines(
            table(
                [
                    "run_id",
                    "requests",
                    "tokens",
                    "token_budget",
                    "percent",
                    "remaining",
                    "state",
                    "cost",
                    "last_activity",
                ],
                recent,
            )
        )

    # --- cost --------------------------------------------------------------------------------

    def cost(self, options: dict[str, Any]) -> None:
        since, until = self._time_range(options)
        filters = exact_filters({"agent": options["agent"]})
        dimension = ALIASES.get(options["by"], options["by"])
        data = {"since": since.isoformat(), "until": until.isoformat(), "group_by": dimension}
        body = actions.run("get_cost_report", PRINCIPAL, {**data, **filters}).body
        counted = runs.executions_by(
            PRINCIPAL, dimension=dimension, filters=filters, since=since, until=until
        )
        groups, total = counted if counted is not None else ({}, None)
        rows = []
        for row in body["rows"]:
            execs = groups.get(row[dimension], runs.Executions(0, 0))
            rows.append(
                {
                    **row,
                    "runs": execs.runs if counted else None,
                    "executions": execs.total if counted else None,
                    "cost_per_execution": execs.cost_per(row["cost"]) if counted else None,
                    "basis": execs.basis if counted and execs.total else None,
                }
            )
        per_total = None
        if total is not None:
            per_total = {
                "runs": total.runs,
                "requests_outside_runs": total.lone_requests,
                "executions": total.total,
                "cost_per_execution": total.cost_per(body["totals"]["cost"]),
            }
        if options["json"]:
            self._json({**body, "rows": rows, "executions": per_total})
            return
        self.stdout.write(_heading("Cost", body))
        columns = [
            dimension,
            "cost",
            "previous_cost",
            "change_pct",
            "share_of_cost",
            "requests",
            "runs",
            "executions",
            "cost_per_execution",
            "basis",
        ]
        self._lines(table(columns, rows) if rows else ["No usage in this range."])
        totals = body["totals"]
        self.stdout.write(
            f"\nTotal: {totals['cost']} {body['currency']} over {totals['requests']:,} requests "
            f"(previous period {totals['previous_cost']}, change {totals['change_pct'] or '-'} %)."
        )
        if totals["unpriced_requests"]:
            self.stdout.write(
                f"Unpriced: {totals['unpriced_requests']:,} requests have no price (cost 0 "
                "above); `token stats` names their models."
            )
        if per_total is None:
            self.stdout.write(
                "Cost per execution: not shown, retention deleted raw usage in this range "
                "(start later with --since)."
            )
            return
        self.stdout.write(
            f"Cost per execution: {per_total['cost_per_execution'] or '-'} over "
            f"{per_total['executions']:,} executions ({per_total['runs']:,} runs + "
            f"{per_total['requests_outside_runs']:,} requests outside any run). A run is one "
            "agent's workflow_id; a request without one counts as its own execution."
        )

    # --- backtest ----------------------------------------------------------------------------

    def backtest(self, options: dict[str, Any]) -> None:
        _since, until = parse_range({"until": options["until"]})
        body = forecasts.forecast_backtest(
            PRINCIPAL,
            dimension=options["dimension"],
            days=options["days"],
            horizon=options["horizon"],
            window=options["window"],
            now=until,
        )
        if options["json"]:
            self._json(body)
            return
        dimension, hs = body["dimension"], list(body["overall"])
        self.stdout.write(
            f"Backtest of the forecast by {dimension}: origins {body['first_origin']} on, "
            f"{body['days']} days, window {body['window']} days (from {body['source']})."
        )
        columns = ["horizon", "forecasts", "mape", "median_ape", "bias", "wape", "coverage"]
        for title, key in (
            ("Overall", "overall"),
            ("Naive baseline (last 7 days' mean)", "baseline"),
        ):
            self.stdout.write(f"\n{title}, errors in % of actual spend:")
            self._lines(table(columns, [{"horizon": h, **body[key][h]} for h in hs]))
        longest = hs[-1]
        rows = [
            {
                dimension: row[dimension] or "(none)",
                "forecasts": row[longest]["forecasts"],
                **{f"mape_{h}": row[h]["mape"] for h in hs},
                f"bias_{longest}": row[longest]["bias"],
            }
            for row in body["series"]
        ]
        self.stdout.write("\nPer series:")
        per = [dimension, "forecasts", *(f"mape_{h}" for h in hs), f"bias_{longest}"]
        self._lines(table(per, rows) if rows else ["No usage in this range."])
        if body["insufficient_history"]:
            self.stdout.write(
                f"{body['insufficient_history']:,} origins skipped: under "
                f"{body['method']['min_history_days']} days of history before them."
            )

    # --- reprice -----------------------------------------------------------------------------

    def reconcile(self, options: dict[str, Any]) -> None:
        path = Path(options["file"])
        choice = options["by_project"]
        data: dict[str, Any] = {
            "filename": path.name[:255],
            "by_project": None if choice == "auto" else choice == "yes",
        }
        if options["provider"]:
            data["provider"] = options["provider"]
        if options["tolerance"] is not None:
            data["tolerance_pct"] = options["tolerance"]
        try:
            if path.stat().st_size > reconcile.MAX_BILL_BYTES:
                raise reconcile.too_large(path.stat().st_size)
            data["content"] = reconcile.decode_upload(path.read_bytes())
            body = actions.run("import_bill", PRINCIPAL, data).body
        except OSError as exc:
            raise CommandError(f"FILE: {exc.strerror or exc}: {path}") from None
        except ApiError as exc:
            names = {"file": "FILE", "content": "FILE", "filename": "FILE"}
            names |= {"tolerance_pct": "--tolerance", "by_project": "--by-project"}
            raise ApiError(
                exc.message,
                status_code=exc.status_code,
                code=exc.code,
                fields={names.get(k, k): v for k, v in exc.fields.items()},
            ) from None
        if options["json"]:
            self._json(body)
            return
        totals = body["totals"]
        counts = {s: v["lines"] for s, v in totals["by_status"].items()}
        self.stdout.write(
            f"Reconciliation #{body['id']}: {body['provider']} bill {body['first_day']} .. "
            f"{body['last_day']} ({body['days_covered']} days, {body['source_format']}, "
            f"{body['rows']:,} rows), tolerance {body['tolerance_pct']} %."
        )
        self.stdout.write(
            f"Billed {totals['billed']} {body['currency']}, ledger {totals['ledger']}: "
            f"difference {totals['difference']} ({totals['difference_pct'] or '-'} %); "
            f"unexplained {totals['unexplained']} ({totals['unexplained_pct'] or '-'} %)."
        )
        self.stdout.write(
            f"Lines: {counts['matched']:,} matched, {counts['over']:,} over, "
            f"{counts['under']:,} under, {counts['missing_in_ledger']:,} not in the ledger, "
            f"{counts['missing_in_bill']:,} not on the bill; {totals['flagged_days']:,} of "
            f"{totals['days']:,} days beyond the tolerance."
        )
        self.stdout.write("\nDays, worst first:")
        day_columns = ["day", "billed", "ledger", "difference", "difference_pct", "lines"]
        self._lines(table([*day_columns, "flagged_lines", "flagged"], body["days"]))
        flagged = [line for line in body["lines"] if line["flagged"]]
        if flagged:
            self.stdout.write("\nLines beyond the tolerance, worst first:")
            columns = ["day", "model", *(["project_id"] if body["by_project"] else [])]
            columns += ["billed", "ledger", "difference", "difference_pct", "status"]
            shown = 30  # a screenful; the admin and --json have every line
            self._lines(table(columns, flagged[:shown]))
            if len(flagged) > shown:
                self.stdout.write(f"(the first {shown} of {len(flagged):,}; --json has all)")
        for note in body["notes"]:
            self.stdout.write(f"Note: {note}.")
        if body["duplicate_of"] is not None:
            self.stdout.write(f"The same file as reconciliation #{body['duplicate_of']}.")

    def reprice(self, options: dict[str, Any]) -> None:
        if "reprice_usage" not in actions.REGISTRY:
            raise CommandError("Repricing is not available (no reprice_usage action).")
        data = {
            "since": options["since"],
            "until": options["until"],
            "provider": options["provider"],
            "model": options["model"],
            "apply": options["apply"],
        }
        body = actions.run("reprice_usage", PRINCIPAL, data).body
        if options["json"]:
            self._json(body)
            return
        state = "Applied" if body["applied"] else "Dry run (nothing changed)"
        self.stdout.write(
            f"{state}: {body['since']} to {body['until']}, {body['rows_seen']:,} rows, "
            f"{body['rows_changed']:,} {'changed' if body['applied'] else 'would change'}."
        )
        columns = [
            "provider",
            "model",
            "rows",
            "rows_changed",
            "cost_before",
            "cost_after",
            "difference",
        ]
        self._lines(table(columns, body["models"]))
        self.stdout.write(
            f"\nTotal: {body['cost_before']} -> {body['cost_after']} {body['currency']} "
            f"(difference {body['difference']})."
        )
        if body["repricing_id"] is not None:
            self.stdout.write(f"Recorded as repricing #{body['repricing_id']}.")


def _heading(title: str, body: dict[str, Any]) -> str:
    filters = ", ".join(f"{k}={v}" for k, v in body["filters"].items())
    return (
        f"{title} {body['since']} to {body['until']} ({body['currency']}, from {body['source']})"
        + (f"; {filters}" if filters else "")
    )


def _write_file(path: Path, chunks: Iterable[str]) -> None:
    """Write beside the file and rename at the end: a reader never sees half an export."""
    partial = path.with_name(path.name + ".partial")
    out: TextIO
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CommandError(f"--output: {exc.strerror or exc}: {exc.filename or path}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
