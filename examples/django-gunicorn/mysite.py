"""A whole Django project in one file, served by gunicorn (WSGI) behind Bastion.

Bastion runs ``gunicorn mysite:application --bind 127.0.0.1:{port}`` in this directory and
mounts it at ``/prefix``. The integration middleware sets ``wsgi.url_scheme``,
``REMOTE_ADDR`` and ``SCRIPT_NAME`` before Django sees the request, so
``request.is_secure()``, ``request.META["REMOTE_ADDR"]``, ``reverse()`` and
``request.build_absolute_uri()`` are right without ``SECURE_PROXY_SSL_HEADER``,
``USE_X_FORWARDED_HOST`` or ``FORCE_SCRIPT_NAME``.

A real project keeps its settings module and only changes ``wsgi.py`` (see docs/recipes.md).
"""

from __future__ import annotations

import os

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret"),
    ALLOWED_HOSTS=os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1").split(","),
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    USE_TZ=True,
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.urls import path, reverse  # noqa: E402

from integration_middleware import WSGIIntegrationMiddleware  # noqa: E402


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello from Django (WSGI)\n", content_type="text/plain")


def info(request: HttpRequest) -> JsonResponse:
    return JsonResponse({
        "framework": "django-wsgi",
        "scheme": request.scheme,
        "secure": request.is_secure(),
        "client": request.META.get("REMOTE_ADDR"),
        "url": request.build_absolute_uri(reverse("info")),
        "path": request.path,
    })


def go(request: HttpRequest) -> HttpResponse:
    return redirect("info")


urlpatterns = [
    path("", index, name="index"),
    path("info", info, name="info"),
    path("go", go, name="go"),
]

# gunicorn mysite:application
application = WSGIIntegrationMiddleware(get_wsgi_application())
