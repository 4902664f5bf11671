from django.apps import AppConfig


class ProvenanceConfig(AppConfig):
    name = "provenance"
    verbose_name = "Provenance"

    def ready(self) -> None:
        # The provenance actions join core.actions.REGISTRY; provenance takes part in ingestion
        # (links of new rows) and adds a "Lineage" link to each usage row's admin page.
        from django.urls import reverse

        from provenance import actions  # noqa: F401
        from provenance.services import ProvenanceLineage
        from usage import hooks
        from usage.admin.display import register_lineage_url, register_workflow_url

        hooks.register_lineage(ProvenanceLineage())
        register_lineage_url(lambda pk: reverse("lineage_pages:lineage", args=[pk]))
        register_workflow_url(
            lambda workflow_id: reverse("lineage_pages:workflow", args=[workflow_id])
        )
