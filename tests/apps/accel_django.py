"""A one-file Django app whose downloads go through django-sendfile2's nginx backend.

    gunicorn accel_django:app      (SENDFILE_ROOT: the protected directory)

``/dj/file/NAME`` answers with ``X-Accel-Redirect: /protected/NAME`` (as an attachment,
with a cookie, as a real permission-checked download view would); ``/dj/missing`` names
a path no static location maps; anything else is a small HTML page.
"""

from __future__ import annotations

import os

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="accel-test",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    SENDFILE_BACKEND="django_sendfile.backends.nginx",
    SENDFILE_ROOT=os.environ["SENDFILE_ROOT"],
    SENDFILE_URL="/protected",
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import re_path  # noqa: E402
from django_sendfile import sendfile  # noqa: E402


def download(request: HttpRequest, name: str) -> HttpResponse:
    response: HttpResponse = sendfile(request, os.path.join(settings.SENDFILE_ROOT, name),
                                      attachment=True)
    response.set_cookie("downloaded", name)
    response["X-App-Only"] = "dropped"
    return response


def missing(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("the app's own body")
    response["X-Accel-Redirect"] = "/nowhere/file.txt"
    return response


def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<p>django page</p>")


urlpatterns = [
    re_path(r"^dj/file/(?P<name>.+)$", download),
    re_path(r"^dj/missing$", missing),
    re_path(r"", page),
]

app = get_wsgi_application()
