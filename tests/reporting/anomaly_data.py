"""A seeded usage history with known spikes, for anomaly tests and bench/anomaly_quality.py.

Each team has a steady daily spend with a weekly shape (weekends lighter), a daily shape over
the hours, and multiplicative noise; its usage is split over three models, each always with the
same user, feature, agent and project (one of two), so every series is a steady share of its
team. A planted spike multiplies one team's usage in one day (or hour) and puts all the extra on
one driver (a model, user, feature or agent value). Rows go straight into the ledger with
bulk_create: the database trigger keeps the rollups, as for any write.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from usage.models import TokenUsage

HOUR_SHAPE = (
    [0.3] * 7 + [0.8, 1.2, 1.6, 1.8, 1.7, 1.4, 1.6, 1.8, 1.7, 1.5, 1.2, 0.9, 0.7] + [0.5] * 4
)
WEEKDAY_SHAPE = [1.0, 1.05, 1.1, 1.0, 0.95, 0.45, 0.4]
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet")
COST_PER_TOKEN = {"gpt-4o": Decimal("0.00001"), "gpt-4o-mini": Decimal("0.0000006")}
DRIVER_KINDS = ("model", "user_id", "feature", "agent")
SPIKE_PARTS = 12


@dataclass(frozen=True, slots=True)
class Spike:
    team_id: str
    at: datetime  # start of the day (UTC) or hour
    granularity: str
    factor: float
    driver: str  # a DRIVER_KINDS name
    value: str


def _cost(model: str, tokens: int) -> Decimal:
    return (COST_PER_TOKEN.get(model, Decimal("0.000003")) * tokens).quantize(Decimal("1e-10"))


class History:
    def __init__(
        self,
        *,
        seed: int,
        teams: int | list[str],
        days: int,
        end: datetime,
        noise: float = 0.15,
        day_noise: float = 0.05,
    ) -> None:
        self.rng = random.Random(seed)
        self.teams = [f"team-{i}" for i in range(teams)] if isinstance(teams, int) else teams
        self.end = end.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self.start = self.end - timedelta(days=days)
        self.noise = noise
        self.day_noise = day_noise
        self._day_level: dict[tuple[str, datetime], float] = {}
        # Teams differ by an order of magnitude, so a spike in a small team must stand out on
        # its own history, not on the organisation's.
        self.base = {
            t: 20_000_000_000 * (1 + 3 * self.rng.random()) * (1 + i)
            for i, t in enumerate(self.teams)
        }
        self.spikes: list[Spike] = []
        self._n = 0

    def plant(self, spike: Spike) -> None:
        self.spikes.append(spike)

    def random_spikes(
        self,
        count: int,
        *,
        granularity: str = "day",
        skip_days: int = 28,
        factors: tuple[float, float] = (2.5, 5.0),
    ) -> None:
        """`count` spikes on distinct team-days after the first `skip_days` (history first)."""
        days = (self.end - self.start).days
        taken: set[tuple[str, int]] = set()
        while len(self.spikes) < count:
            team = self.rng.choice(self.teams)
            day = self.rng.randrange(skip_days, days)
            if any((team, d) in taken for d in (day - 1, day, day + 1)):
                continue
            taken.add((team, day))
            at = self.start + timedelta(days=day)
            if granularity == "hour":
                at += timedelta(hours=self.rng.randrange(8, 18))
            kind = self.rng.choice(DRIVER_KINDS)
            self.plant(
                Spike(
                    team,
                    at,
                    granularity,
                    self.rng.uniform(*factors),
                    kind,
                    self._driver(kind, team),
                )
            )

    def _driver(self, kind: str, team: str) -> str:
        if kind == "model":
            return "gpt-4o"
        return {
            "user_id": f"{team}-u9",
            "feature": f"{team}-bulk-export",
            "agent": "runaway-agent",
        }[kind]

    def _row(self, at: datetime, team: str, tokens: int, **attrs: str) -> TokenUsage:
        self._n += 1
        model = attrs.pop("model")
        inp = tokens * 3 // 4
        return TokenUsage(
            tenant="org",
            request_id=f"seed-{self._n}",
            occurred_at=at + timedelta(minutes=self.rng.randrange(60)),
            received_at=at,
            provider="openai" if model.startswith("gpt") else "anthropic",
            model=model,
            input_tokens=inp,
            output_tokens=tokens - inp,
            cost=_cost(model, tokens),
            price_source=TokenUsage.PriceSource.CATALOGUE,
            team_id=team,
            project_id=attrs.pop("project_id", ""),
            **attrs,
        )

    def rows(self) -> list[TokenUsage]:
        out = []
        hour = timedelta(hours=1)
        at = self.start
        while at < self.end:
            for team in self.teams:
                day = (team, at.replace(hour=0))
                if day not in self._day_level:  # a whole day busier or quieter than usual
                    self._day_level[day] = 1 + self.rng.uniform(-self.day_noise, self.day_noise)
                level = (
                    self.base[team]
                    * self._day_level[day]
                    * WEEKDAY_SHAPE[at.weekday()]
                    * HOUR_SHAPE[at.hour]
                    / 24
                )
                # Tokens so that cost ~ level units of 1e-10 USD spread over three models.
                for i, model in enumerate(MODELS):
                    share = (0.5, 0.3, 0.2)[i]
                    wobble = 1 + self.rng.uniform(-self.noise, self.noise)
                    units = level * share * wobble
                    per_token = COST_PER_TOKEN.get(model, Decimal("0.000003")) * 10**10
                    tokens = max(1, int(units / float(per_token)))
                    out.append(
                        self._row(
                            at,
                            team,
                            tokens,
                            model=model,
                            user_id=f"{team}-u{i}",
                            feature=f"{team}-f{i}",
                            project_id=f"{team}-p{i % 2}",
                            agent=f"agent-{i}",
                        )
                    )
                out += self._spike_rows(at, team, level)
            at += hour
        return out

    def _spike_rows(self, at: datetime, team: str, level: float) -> list[TokenUsage]:
        out = []
        for spike in self.spikes:
            if spike.team_id != team:
                continue
            span = timedelta(days=1) if spike.granularity == "day" else timedelta(hours=1)
            if not spike.at <= at < spike.at + span:
                continue
            # The extra is spread evenly over the team's usual users, features, agents and
            # models, except along the planted driver, which carries all of it.
            extra = level * (spike.factor - 1) / SPIKE_PARTS
            for part in range(SPIKE_PARTS):
                i = part % len(MODELS)
                attrs = {
                    "model": MODELS[i],
                    "user_id": f"{team}-u{part % 4}",
                    "feature": f"{team}-f{part % 3}",
                    "agent": f"agent-{(part + 1) % 3}",
                    "project_id": f"{team}-p{part % 2}",
                }
                attrs[spike.driver] = spike.value
                per_token = COST_PER_TOKEN.get(attrs["model"], Decimal("0.000003")) * 10**10
                out.append(self._row(at, team, max(1, int(extra / float(per_token))), **attrs))
        return out

    def write(self) -> int:
        rows = self.rows()
        TokenUsage.objects.bulk_create(rows, batch_size=2000)
        return len(rows)
