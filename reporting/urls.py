from django.urls import path

from reporting import apis

urlpatterns = [
    path("status", apis.StatusApi.as_view(), name="status"),
]
