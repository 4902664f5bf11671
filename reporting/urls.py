from django.urls import path

from reporting import apis

urlpatterns = [
    path("status", apis.StatusApi.as_view(), name="status"),
    path("status/batch", apis.StatusBatchApi.as_view(), name="status-batch"),
    path("reports/<str:kind>", apis.ReportApi.as_view(), name="report"),
    # analytics: trends and anomalies
    # analytics: forecasts
    # analytics: recommendations
    # analytics: reconciliation
]
