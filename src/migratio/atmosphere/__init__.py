"""The Atmosphere bridge: everything migratio shares with the Rails app over Redis.

Its Redis keys (:mod:`~migratio.atmosphere.keys`), the Sidekiq wire format, taking its
migration jobs without losing one (:mod:`~migratio.atmosphere.intake`), and the status lines
sent back to it.
"""
