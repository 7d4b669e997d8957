"""`stargz-store optimize`: record a workload's first reads through a private store, convert with them first."""
