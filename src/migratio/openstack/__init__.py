"""OpenStack destinations: a Glance image moved to another OpenStack site.

The bytes go by rsync over SSH (in pieces, compressed when it pays, capped by ``BWLIMIT``) and
are registered by the destination's ``glance`` CLI, or uploaded through its Glance API.
"""
