from __future__ import annotations

from typing import ClassVar

from drf_spectacular.utils import extend_schema
from pydantic import BaseModel
from rest_framework.request import Request
from rest_framework.response import Response

from reporting.actions import StatusBatchIn, StatusIn
from tokenmgr_project.core.api import ActionView


class StatusQueuedOut(BaseModel):
    queued: bool


class StatusApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "publish_status"}
    fast_post = True  # agents publish many status messages a second

    @extend_schema(
        request=StatusIn, responses={202: StatusQueuedOut}, summary="Publish a live status message"
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))


class StatusBatchQueuedOut(BaseModel):
    queued: int


class StatusBatchApi(ActionView):
    actions_by_method: ClassVar[dict[str, str]] = {"post": "publish_status_batch"}
    fast_post = True

    @extend_schema(
        request=StatusBatchIn,
        responses={202: StatusBatchQueuedOut},
        summary="Publish up to 500 live status messages (all or none)",
    )
    def post(self, request: Request) -> Response:
        return self._run(request, "post", self._body(request))
