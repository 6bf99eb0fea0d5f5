"""In-process hosting: ASGI and WSGI apps called inside the proxy workers.

``scope`` builds what the app is given (pure), ``loader`` imports it, ``asgi`` and
``wsgi`` run one request each, ``host`` is the worker's glue (docs/hosting-models.md).
"""
