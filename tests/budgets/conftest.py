"""Budget personas: staff users around the override workflow, and a budget to work on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from rest_framework.test import APIClient

from budgets.models import Budget, BudgetOverride
from tests.conftest import Persona
from tokenmgr_project.core.principal import Principal

# What every budgets staff persona may do in the admin; the approve permission is added per persona.
STAFF_PERMISSIONS = (
    "view_budget",
    "view_budgetoverride",
    "add_budgetoverride",
    "view_budgetalert",
    "view_budgetperiod",
)


@dataclass
class StaffPersona(Persona):
    user: Any = None

    @property
    def principal(self) -> Principal:
        return Principal.for_staff(self.user)


def _staff(django_user_model: Any, name: str, *, approves: bool) -> StaffPersona:
    user = django_user_model.objects.create_user(name, f"{name}@example.com", f"pw-{name}-123")
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    codenames = [*STAFF_PERMISSIONS, *(["approve_budgetoverride"] if approves else [])]
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="budgets", codename__in=codenames)
    )
    client = APIClient()
    client.force_login(user)
    return StaffPersona(name, client, user=user)


@pytest.fixture
def approver(db: None, django_user_model: Any) -> StaffPersona:
    """A staff user holding budgets.approve_budgetoverride."""
    return _staff(django_user_model, "approver", approves=True)


@pytest.fixture
def requester(db: None, django_user_model: Any) -> StaffPersona:
    """A staff user who asks for overrides; holds the approve permission too, so a refusal to
    let them decide their own request is about being the requester, not about the permission."""
    return _staff(django_user_model, "requester", approves=True)


@pytest.fixture
def clerk(db: None, django_user_model: Any) -> StaffPersona:
    """A staff user who may look at budgets and overrides but not decide them."""
    return _staff(django_user_model, "clerk", approves=False)


@pytest.fixture
def budget(db: None) -> Budget:
    """A hard 100 USD monthly budget on project "ranker" (team "search"): the member key's."""
    from budgets.services import budget_create

    return budget_create(
        principal=None,
        name="ranker monthly",
        scope="project",
        scope_id="ranker",
        team_id="search",
        project_id="ranker",
        cost_limit=Decimal(100),
    )


def in_days(days: float) -> datetime:
    return timezone.now() + timedelta(days=days)


def pending_override(budget: Budget, by: StaffPersona, **fields: Any) -> BudgetOverride:
    """A pending override asked for by a staff persona (+50 USD for a week unless told)."""
    from budgets.overrides import override_request

    values: dict[str, Any] = {
        "extra_cost": Decimal(50),
        "extra_tokens": None,
        "unlimited": False,
        "reason": "launch week traffic",
        "expires_at": in_days(7),
    }
    values.update(fields)
    return override_request(budget=budget, principal=by.principal, **values)
