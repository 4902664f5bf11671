from django.urls import path

from provenance import apis

urlpatterns = [
    path("relationships", apis.RelationshipsApi.as_view(), name="relationships"),
    path("provenance/<path:request_id>", apis.ProvenanceApi.as_view(), name="provenance"),
    path("lineage/<path:request_id>", apis.LineageApi.as_view(), name="lineage"),
    path(
        "workflows/<path:workflow_id>/usage",
        apis.WorkflowUsageApi.as_view(),
        name="workflow-usage",
    ),
    path("analysis/task-costs", apis.TaskCostsApi.as_view(), name="analysis-task-costs"),
    path("analysis/patterns", apis.PatternsApi.as_view(), name="analysis-patterns"),
    path("analysis/questions", apis.QuestionCostsApi.as_view(), name="analysis-questions"),
]
