"""REST views of the budgets app: parse, run the named action, respond."""

from __future__ import annotations

from typing import ClassVar

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from budgets.schemas import BudgetCheckIn, BudgetIn, BudgetPatchIn, ReservationCancelIn
from usage.apis import ActionView, _query, with_url_id


class BudgetListApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "list_budgets", "post": "create_budget"}

    @extend_schema(
        parameters=[OpenApiParameter("active", bool)], responses={200: dict}, summary="Budgets"
    )
    def get(self, request: Request) -> Response:
        return self._run(request, "get", _query(request))

    @extend_schema(request=BudgetIn, responses={201: dict}, summary="Create a budget")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class BudgetDetailApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {
        "get": "get_budget",
        "patch": "update_budget",
        "delete": "delete_budget",
    }

    @extend_schema(responses={200: dict}, summary="One budget")
    def get(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "get", {"budget_id": budget_id})

    @extend_schema(request=BudgetPatchIn, responses={200: dict}, summary="Change a budget")
    def patch(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "patch", with_url_id(self._body(request), "budget_id", budget_id))

    @extend_schema(responses={200: dict}, summary="Deactivate a budget (history is kept)")
    def delete(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "delete", {"budget_id": budget_id})


class BudgetStatusApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"get": "get_budget_status"}

    @extend_schema(responses={200: dict}, summary="Budget status for the current period")
    def get(self, request: Request, budget_id: int) -> Response:
        return self._run(request, "get", {"budget_id": budget_id})


class BudgetCheckApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "check_budget"}
    fast_post = True

    @extend_schema(request=BudgetCheckIn, responses={200: dict}, summary="Pre-flight check")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class ReservationCancelApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "cancel_reservation"}

    @extend_schema(request=ReservationCancelIn, responses={200: dict}, summary="Free a hold")
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))
