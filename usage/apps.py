from django.apps import AppConfig


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Usage"

    def ready(self) -> None:
        from tokenmgr_project.core import principal, warmup
        from usage import (
            actions,  # noqa: F401  (registers the usage actions)
            pricing,
            tasks,  # noqa: F401  (connects the flush trigger)
        )
        from usage.auth import cached_principal_for_raw_key, principal_for_raw_key

        principal.register_keys(principal_for_raw_key, cached_principal_for_raw_key)
        # A server loads the price catalogue before its first request, not during it.
        warmup.register(lambda: pricing.catalogue_model("openai", "gpt-4o"))
