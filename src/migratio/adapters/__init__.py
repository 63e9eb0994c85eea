"""Adapters for the outside tools and services migratio drives.

One module per tool or service (qemu-img, rsync, OpenSSH, the ``glance`` CLI, the Glance API,
Amazon), and :mod:`migratio.adapters.processes`, the one place that starts child processes.
"""
