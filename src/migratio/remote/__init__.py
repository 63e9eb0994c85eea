"""Programs that migratio sends to a destination host to run there (standard library only)."""
