from django.urls import path

from reporting import apis

urlpatterns = [
    path("status", apis.StatusApi.as_view(), name="status"),
    path("status/batch", apis.StatusBatchApi.as_view(), name="status-batch"),
    path("reports/<str:kind>", apis.ReportApi.as_view(), name="report"),
    # analytics: trends and anomalies
    path("trends", apis.TrendsApi.as_view(), name="trends"),
    path("anomalies", apis.AnomaliesApi.as_view(), name="anomalies"),
    # analytics: forecasts
    path("forecast", apis.ForecastApi.as_view(), name="forecast"),
    # analytics: recommendations
    path("recommendations", apis.RecommendationsApi.as_view(), name="recommendations"),
    path(
        "recommendations/<int:rec_id>/dismiss",
        apis.RecommendationDismissApi.as_view(),
        name="recommendation-dismiss",
    ),
    path(
        "recommendations/<int:rec_id>/accept",
        apis.RecommendationAcceptApi.as_view(),
        name="recommendation-accept",
    ),
    # analytics: reconciliation
    path("reconciliations", apis.ReconciliationListApi.as_view(), name="reconciliations"),
    path(
        "reconciliations/<int:bill_id>",
        apis.ReconciliationDetailApi.as_view(),
        name="reconciliation",
    ),
]
