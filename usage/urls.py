from django.urls import path

from usage import apis

urlpatterns = [
    path("usage", apis.UsageApi.as_view(), name="usage"),
    path("usage/batch", apis.UsageBatchApi.as_view(), name="usage-batch"),
    path("usage/summary", apis.UsageSummaryApi.as_view(), name="usage-summary"),
    path("health", apis.HealthApi.as_view(), name="health"),
    path("tokenize", apis.TokenizeApi.as_view(), name="tokenize"),
    path("truncate", apis.TruncateApi.as_view(), name="truncate"),
    path("pricing", apis.PricingApi.as_view(), name="pricing"),
    path("pricing/quote", apis.QuoteApi.as_view(), name="pricing-quote"),
    path("pricing/compare", apis.CompareApi.as_view(), name="pricing-compare"),
    path("pricing/reprice", apis.RepriceApi.as_view(), name="pricing-reprice"),
    path("signals", apis.SignalsApi.as_view(), name="signals"),
]
