"""Real services for migratio's tests and demo.

This package starts the real services the tests and the demo use, all bound to
127.0.0.1: two Glance API servers (uWSGI, file store, no Keystone), an sshd with
an unprivileged user that can run the ``glance`` CLI, and helpers that build
real qcow2/raw disk images with ``qemu-img``.  It never imports ``migratio``.

Use it from the repository root as ``tests.sandbox`` (``tests/conftest.py`` puts
the root on ``sys.path``), e.g.::

    from tests.sandbox.site import Sandbox

    with Sandbox(Path(workdir)) as sb:
        ...
"""
