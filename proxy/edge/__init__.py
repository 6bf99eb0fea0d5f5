"""The data plane: what happens to a request between the client's socket and the app's.

``listeners`` accepts; ``h1`` (HTTP/1.1, its states in ``h1state``) and ``h2server``
(HTTP/2, translated by ``h2translate``) are the client-side protocols; both drive one
``flow`` per request (``site`` holds what a listener's requests share), which routes
(``routing``), takes an endpoint (``endpoints``), rewrites headers (``headers``, ``trust``)
and talks to the app through ``upstream``; ``websocket`` pipes upgraded connections;
``strict`` and ``codec`` hold the HTTP/1.1 rules and heads; ``errors`` and
``error_pages`` turn every failure into one status; ``accesslog``, ``metrics`` and
``tls`` complete it. Nothing here spawns a process: the module does.
"""

import os as _os

if _os.environ.get("BASTION_INTERPRETED"):
    from .native import prefer_sources

    prefer_sources()
