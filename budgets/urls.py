from django.urls import path

from budgets import apis, guard, overrides

urlpatterns = [
    path("budgets", apis.BudgetListApi.as_view(), name="budgets"),
    path("budgets/check", apis.BudgetCheckApi.as_view(), name="budgets-check"),
    path("reservations/cancel", apis.ReservationCancelApi.as_view(), name="reservation-cancel"),
    path("budgets/<int:budget_id>", apis.BudgetDetailApi.as_view(), name="budget-detail"),
    path("budgets/<int:budget_id>/status", apis.BudgetStatusApi.as_view(), name="budget-status"),
    path("guard", guard.GuardApi.as_view(), name="guard"),
    path("alerts", apis.AlertListApi.as_view(), name="alerts"),
    path("agent-profiles", apis.AgentProfileListApi.as_view(), name="agent-profiles"),
    path(
        "agent-profiles/<int:profile_id>",
        apis.AgentProfileDetailApi.as_view(),
        name="agent-profile-detail",
    ),
    path(
        "budgets/<int:budget_id>/overrides",
        overrides.BudgetOverridesApi.as_view(),
        name="budget-overrides",
    ),
    path(
        "overrides/<int:override_id>/approve",
        overrides.OverrideApproveApi.as_view(),
        name="override-approve",
    ),
    path(
        "overrides/<int:override_id>/reject",
        overrides.OverrideRejectApi.as_view(),
        name="override-reject",
    ),
]
