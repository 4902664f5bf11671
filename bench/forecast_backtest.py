#!/usr/bin/env python
"""The forecast's measured error: `manage.py token backtest` over a seeded synthetic history
whose teams have weekly seasonality, a trend, noise and a few spikes (issue 13: "the method's
quality is a measured number in BENCHMARKS.md").

    .venv/bin/python bench/forecast_backtest.py                      # synthetic, MAPE at 7 days
    .venv/bin/python bench/forecast_backtest.py --seed 11 --teams 20 # another history
    .venv/bin/python bench/forecast_backtest.py --db tokenmgr_bench_10m   # the 10M-row ledger

What it does (127.0.0.1 only; the throw-away database is dropped again at the end, also on
error/Ctrl-C):
  1. without --db: creates database tokenmgr_bench_forecast and migrates it; builds, from
     random.Random(--seed), --teams teams over the --history days before today (UTC), each with
     a base spend (log-uniform 5..200 USD a day), weekday factors (weekends 0.15..0.7 of a
     weekday), a linear trend (-20 %..+50 % over the history), lognormal day-to-day noise
     (sigma 0.08..0.25) and 1..4 spike days (x3..x6); each day's spend is split over 24 hourly
     rows (a diurnal profile, peak at 15:00 UTC) and COPYed into the ledger (the rollup
     trigger fills the rollups as for any insert);
     with --db: uses that database as it is, READ ONLY (nothing is created, written or dropped;
     e.g. bench/gen_ledger.py's 10M-row ledger);
  2. runs `manage.py token backtest --days --horizon --window --dimension --json` on it: from
     each of the last --days days, the spend of the next 1 and --horizon days forecast from the
     days before only, against what the rollups say was spent;
  3. prints MAPE, median APE, bias, WAPE and the 80 % interval's coverage at 1 and --horizon
     days, overall and per series, next to the naive baseline (the last 7 days' mean), and for
     the synthetic history each team's generated trend, noise and spikes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

sys.path.insert(0, str(h.REPO))  # usage.rows: the ledger's COPY layout (no Django needed)

DB_NAME = "tokenmgr_bench_forecast"
UNITS_PER_USD = 10**10
# Share of a day's spend per UTC hour: a diurnal curve peaking at 15:00.
DIURNAL = [0.4 + math.exp(-(((hour - 15) / 4.5) ** 2)) for hour in range(24)]
DIURNAL = [d / sum(DIURNAL) for d in DIURNAL]


def _team(rng: random.Random, name: str, days: int) -> dict[str, Any]:
    return {
        "team": name,
        "base_usd": math.exp(rng.uniform(math.log(5), math.log(200))),
        "weekdays": [rng.uniform(0.9, 1.1) for _ in range(5)]
        + [rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.6)],
        "trend": rng.uniform(-0.2, 0.5),
        "noise": rng.uniform(0.08, 0.25),
        "spikes": sorted(rng.sample(range(days), rng.randint(1, 4))),
        "spike_factor": [rng.uniform(3, 6) for _ in range(4)],
    }


def history(seed: int, teams: int, days: int, today: date) -> tuple[list[dict[str, Any]], dict]:
    """(teams' parameters, {(team, day): spend in units})."""
    rng = random.Random(seed)
    params = [_team(rng, f"team-{i:02d}", days) for i in range(teams)]
    first = today - timedelta(days=days)
    spend: dict[tuple[str, date], int] = {}
    for p in params:
        for i in range(days):
            day = first + timedelta(days=i)
            usd = p["base_usd"] * (1 + p["trend"] * i / days) * p["weekdays"][day.weekday()]
            usd *= math.exp(rng.gauss(0, p["noise"]))
            if i in p["spikes"]:
                usd *= p["spike_factor"][p["spikes"].index(i)]
            spend[p["team"], day] = int(usd * UNITS_PER_USD)
    return params, spend


def _money(units: int) -> str:
    return f"{units // UNITS_PER_USD}.{units % UNITS_PER_USD:010d}"


def copy_text(spend: dict[tuple[str, date], int]) -> bytes:
    from usage.rows import encode_line

    lines = []
    for (team, day), units in sorted(spend.items()):
        for hour, share in enumerate(DIURNAL):
            cost = int(units * share)
            at = datetime.combine(day, time(hour, 30), tzinfo=UTC)
            tokens = cost // 25_000  # about gpt-4o's input price (2.5 USD per Mtok)
            row = {
                "request_id": f"f-{team}-{day:%Y%m%d}-{hour:02d}",
                "occurred_at": at,
                "received_at": at,
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens": tokens,
                "output_tokens": 0,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "cost": Decimal(_money(cost)),
                "input_cost": Decimal(_money(cost)),
                "output_cost": Decimal(0),
                "currency": "USD",
                "price_source": "catalogue",
                "unpriced": False,
                "estimated": False,
                "team_id": team,
                "project_id": f"{team}-main",
                "status": "success",
                "latency_ms": None,
                "metadata": {},
                "cache_hit": None,
                "depth": 0,
                "system_context": {},
                "tenant": "org",
            }
            lines.append(encode_line(_row(row)))
    return ("\n".join(lines) + "\n").encode()


def _row(values: dict[str, Any]) -> tuple[Any, ...]:
    from usage.rows import ROW_COLUMNS

    return tuple(values.get(column, "") for column in ROW_COLUMNS)


def load(stack: h.Stack, data: bytes) -> None:
    from usage.rows import ROW_COLUMNS

    with stack.pg() as conn, conn.cursor() as cur:
        columns = ", ".join(ROW_COLUMNS)
        with cur.copy(f"COPY usage_tokenusage ({columns}) FROM STDIN") as cp:
            cp.write(data)
        conn.commit()


def _errors(e: dict[str, Any]) -> str:
    def pct(value: Any) -> str:
        return "     -" if value is None else f"{value:6.2f}"

    coverage = e.get("coverage")
    return (
        f"{e['forecasts']:>6}  MAPE {pct(e['mape'])} %  median APE {pct(e['median_ape'])} %  "
        f"bias {pct(e['bias'])} %  WAPE {pct(e['wape'])} %"
        + ("" if coverage is None else f"  80 % interval holds {coverage:5.1f} %")
    )


def report(body: dict[str, Any], params: list[dict[str, Any]] | None) -> None:
    hs = list(body["overall"])
    print(
        f"\nbacktest by {body['dimension']}: forecasts made on each of the {body['days']} days "
        f"from {body['first_origin']} to {body['as_of'][:10]} (whose horizon has passed), "
        f"window {body['window']} days, from {body['source']}; {len(body['series'])} series, "
        f"{body['insufficient_history']} origins skipped (short history)"
    )
    for h_ in hs:
        print(f"  method   {h_:>3}: {_errors(body['overall'][h_])}")
        print(f"  baseline {h_:>3}: {_errors(body['baseline'][h_])}")
    by = {p["team"]: p for p in params or []}
    longest = hs[-1]
    print(f"\n  per series (MAPE {', '.join(hs)}; bias {longest}):")
    for row in body["series"]:
        name = row[body["dimension"]] or "(none)"
        figures = "  ".join(
            "   -  " if row[x]["mape"] is None else f"{row[x]['mape']:6.2f}" for x in hs
        )
        bias = row[longest]["bias"]
        line = f"    {name:<14} {figures}  {'-' if bias is None else f'{bias:6.2f}'}"
        p = by.get(name)
        if p:
            line += (
                f"    (generated: {p['base_usd']:.0f} USD/day, trend {p['trend'] * 100:+.0f} %, "
                f"noise {p['noise']:.2f}, {len(p['spikes'])} spikes)"
            )
        print(line)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--db", help="backtest this database as it is (read only), e.g. the 10M one")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--teams", type=int, default=12, help="synthetic teams (default 12)")
    ap.add_argument("--history", type=int, default=150, help="synthetic days (default 150)")
    ap.add_argument("--days", type=int, default=56, help="origins: the last N days (default 56)")
    ap.add_argument("--horizon", type=int, default=7)
    ap.add_argument("--window", type=int, default=28)
    ap.add_argument("--dimension", default="team_id")
    ap.add_argument("--json", action="store_true", help="also print the backtest's JSON")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    today = datetime.now(UTC).date()
    db = args.db or DB_NAME
    params = None
    with h.Stack(redis_db=None, db_name=db, keep_db=bool(args.db)) as stack:
        if args.db is None:
            stack.reset_database()
            stack.manage("migrate", "--noinput", "-v", "0")
            params, spend = history(args.seed, args.teams, args.history, today)
            data = copy_text(spend)
            rows = data.count(b"\n")
            h.log(f"{len(spend):,} team-days as {rows:,} ledger rows into {db}")
            load(stack, data)
        else:
            h.log(f"{db}: read only, as it is")
        h.log("manage.py token backtest ...")
        out = stack.manage(
            "token",
            "backtest",
            "--days",
            str(args.days),
            "--horizon",
            str(args.horizon),
            "--window",
            str(args.window),
            "--dimension",
            args.dimension,
            "--json",
        )
        body = json.loads(out)
        print(h.machine_line(stack))
        report(body, params)
        if args.json:
            print(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    h.run_main(main)
