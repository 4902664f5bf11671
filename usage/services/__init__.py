"""Writes of the usage app, one module per job: ingestion (`ingest`), the ledger writer and
retention (`ledger`), the buffer flush and its dead letters (`flush`), API keys (`keys`),
price overrides (`prices`), re-pricing past usage (`reprice`) and the manager settings
(`config`). Callers use these names."""

from usage.services.config import EffectiveConfig, manager_config, manager_config_update
from usage.services.flush import (
    FlushResult,
    ReplayResult,
    flush_due,
    usage_dead_letter_discard,
    usage_dead_letter_replay,
    usage_flush,
)
from usage.services.ingest import ItemResult, usage_ingest
from usage.services.keys import KEY_PREFIX, api_key_create, api_key_revoke
from usage.services.ledger import (
    retention_cutoff,
    usage_lines_insert,
    usage_purge_expired,
    usage_rows_insert,
)
from usage.services.prices import model_price_delete, model_price_set
from usage.services.reprice import ModelDifference, RepriceResult, usage_reprice

__all__ = [
    "KEY_PREFIX",
    "EffectiveConfig",
    "FlushResult",
    "ItemResult",
    "ModelDifference",
    "ReplayResult",
    "RepriceResult",
    "api_key_create",
    "api_key_revoke",
    "flush_due",
    "manager_config",
    "manager_config_update",
    "model_price_delete",
    "model_price_set",
    "retention_cutoff",
    "usage_dead_letter_discard",
    "usage_dead_letter_replay",
    "usage_flush",
    "usage_ingest",
    "usage_lines_insert",
    "usage_purge_expired",
    "usage_reprice",
    "usage_rows_insert",
]
