"""Consumer services: one shared runner, one small file per consumer."""
