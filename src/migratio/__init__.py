"""migratio: moves Glance VM templates between Atmosphere compute sites."""

__version__ = "2.0.0.dev0"
