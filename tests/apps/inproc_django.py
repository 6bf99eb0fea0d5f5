"""A one-file Django project for in-process hosting tests (tests/test_inprocess.py):
``DJANGO_SETTINGS_MODULE=inproc_django``, served as ``inproc_django:application`` (WSGI)
or ``inproc_django:asgi_application`` (ASGI)."""

from __future__ import annotations

import os

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="in-process-test-only",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )

import django  # noqa: E402

django.setup()

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse  # noqa: E402
from django.urls import path, reverse  # noqa: E402


def info(request: HttpRequest) -> HttpResponse:
    return JsonResponse({
        "pid": os.getpid(),
        "scheme": request.scheme,
        "client": [request.META.get("REMOTE_ADDR"), int(request.META.get("REMOTE_PORT") or 0)],
        "root_path": request.META.get("SCRIPT_NAME", ""),
        "path": request.path,
        "url_for": request.build_absolute_uri(reverse("info")),
    })


def to_info(request: HttpRequest) -> HttpResponse:
    return HttpResponseRedirect(request.build_absolute_uri(reverse("info")))


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello django")


urlpatterns = [
    path("info", info, name="info"),
    path("redirect", to_info),
    path("hello", hello),
]

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
asgi_application = get_asgi_application()
