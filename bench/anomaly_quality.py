#!/usr/bin/env python
"""Anomaly detection quality on seeded histories with planted spikes: precision, recall and
driver accuracy of reporting.anomalies, by spike size, for days and hours.

    .venv/bin/python bench/anomaly_quality.py                 # 5 seeds, days and hours
    .venv/bin/python bench/anomaly_quality.py --seeds 10 --noise 0.3

Each seed builds a history (tests/reporting/anomaly_data.History: --teams teams, --days days,
weekly and daily shape, +/- --noise multiplicative noise per row and +/- --day-noise per
team-day) in a fresh SQLite database, plants --spikes spikes on distinct team-days after the
first 28 days (sizes drawn from three bands: 1.3-1.6x, 1.6-2.5x, 2.5-5x of the usual level; the
extra all on one model, user, feature or agent), and runs detection by team over the days
after the first 28 (hours: over the spike days). A planted spike is found when an `up` anomaly
of its team falls in its day
(hour); every other anomaly is a false positive. Driver accuracy: the share of found spikes
whose first driver is the planted (dimension, value).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BANDS = ((1.3, 1.6), (1.6, 2.5), (2.5, 5.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--teams", type=int, default=8)
    parser.add_argument("--days", type=int, default=63)
    parser.add_argument("--spikes", type=int, default=12, help="Per seed (4 per size band).")
    parser.add_argument("--noise", type=float, default=0.2, help="Per row (+/-).")
    parser.add_argument("--day-noise", type=float, default=0.15, help="Per team-day (+/-).")
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args()

    data = tempfile.mkdtemp(prefix="tm-anomaly-quality-")
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("SECRET_KEY", "bench")
    os.environ["TOKENMGR_DATA_DIR"] = data
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    from reporting import anomalies
    from tests.reporting.anomaly_data import History
    from tokenmgr_project.core.principal import Principal
    from usage.models import ModelDayRollup, ModelRollup, TokenUsage, UsageRollup

    org = Principal(scope="global", is_staff=True)
    threshold = args.threshold or anomalies.DEFAULT_THRESHOLD
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    print(
        f"anomaly quality: {args.seeds} seeds x {args.teams} teams x {args.days} days, "
        f"{args.spikes} spikes a seed, noise +/-{args.noise:.0%} a row and "
        f"+/-{args.day_noise:.0%} a team-day, threshold {threshold}"
    )
    for granularity in ("day", "hour"):
        tp = fp = planted = drivers_ok = 0
        by_band = {band: [0, 0] for band in BANDS}
        started = time.monotonic()
        detect_s = 0.0
        for seed in range(1, args.seeds + 1):
            for model in (TokenUsage, UsageRollup, ModelRollup, ModelDayRollup):
                model.objects.all().delete()
            history = History(
                seed=seed, teams=args.teams, days=args.days, end=end, noise=args.noise
            )
            per_band = args.spikes // len(BANDS)
            for band in BANDS:
                history.random_spikes(
                    len(history.spikes) + per_band, granularity=granularity, factors=band
                )
            history.write()
            spikes = {(s.team_id, s.at): s for s in history.spikes}
            t0 = time.monotonic()
            if granularity == "day":
                ranges = [(history.start + timedelta(days=28), history.end)]
            else:
                days = sorted({s.at.replace(hour=0) for s in history.spikes})
                ranges = [(d, d + timedelta(days=1)) for d in days]
            found = []
            for since, until in ranges:
                found += anomalies.detect(
                    org,
                    dimension="team_id",
                    metric="cost",
                    granularity=granularity,
                    since=since,
                    until=until,
                    threshold=threshold,
                    direction="up",
                ).findings
            detect_s += time.monotonic() - t0
            hits = set()
            for finding in found:
                spike = spikes.get((finding.series, finding.bucket))
                if spike is None:
                    fp += 1
                    continue
                hits.add((spike.team_id, spike.at))
                tp += 1
                top = anomalies.drivers_for(org, finding, {})[:1]
                drivers_ok += bool(top) and (top[0]["dimension"], top[0]["value"]) == (
                    spike.driver,
                    spike.value,
                )
            planted += len(spikes)
            for key, spike in spikes.items():
                band = next(b for b in BANDS if b[0] <= spike.factor <= b[1])
                by_band[band][0] += 1
                by_band[band][1] += key in hits
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / planted if planted else 0.0
        print(
            f"\n{granularity}s: planted {planted}, found {tp}, false positives {fp}: "
            f"precision {precision:.3f}, recall {recall:.3f}, "
            f"first driver right {drivers_ok}/{tp} ({drivers_ok / tp if tp else 0:.1%}); "
            f"detection {detect_s:.2f} s, all {time.monotonic() - started:.0f} s"
        )
        for band, (n, hit) in by_band.items():
            print(f"  spikes {band[0]}-{band[1]}x: recall {hit}/{n} = {hit / n if n else 0:.2f}")


if __name__ == "__main__":
    main()
