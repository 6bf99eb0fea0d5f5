"""The control plane: the ``bastion`` command (``cli``), the main process (``main``: the
module, the workers, reload, signals, systemd), the worker processes (``worker``) and the
channel between them (``channel``, ``liveness``), request slots shared by every worker
(``slots``), the admin socket and its client (``admin``, ``adminclient``), and the
development certificate (``devcert``). It never parses HTTP: that is ``proxy.edge``."""
