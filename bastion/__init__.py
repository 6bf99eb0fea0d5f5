"""Bastion: the edge server for Python web apps.

Installed, the parts live under this one name: ``bastion.proxy`` (the host: edge and
control plane, config), ``bastion.module`` (the process manager). In the repository they
are the top-level folders ``proxy/`` and ``module/`` (mapped here by the packaging, and by
symbolic links for a checkout). The integration middleware an app installs is the
separate package ``integration_middleware``.
"""
