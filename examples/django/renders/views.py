"""A form to ask for a render, its page, and its image from the outbox."""

from __future__ import annotations

import os
import re
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from renders.forms import RenderForm
from renders.models import Render

# The names sbrender gives its images (a job id plus .png): one plain file name, no
# folders, so a name read from a result can never point outside the outbox.
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}\.png")


def index(request: HttpRequest) -> HttpResponse:
    form = RenderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        return redirect(form.save())
    recent = Render.objects.order_by("-created")[:20]
    return render(request, "renders/index.html", {"form": form, "renders": recent})


def detail(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "renders/detail.html", {"render": get_object_or_404(Render, pk=pk)})


def image(request: HttpRequest, pk: int) -> FileResponse:
    """The render's PNG, streamed from the outbox. (A production site lets its web
    server send it: nginx ``X-Accel-Redirect`` to an internal location.)"""
    row = get_object_or_404(Render, pk=pk, status=Render.Status.SUCCEEDED)
    if not IMAGE_NAME.fullmatch(row.image):
        raise Http404("not an image name")
    try:
        # O_NOFOLLOW: a symlink planted in the outbox is not followed elsewhere.
        fd = os.open(Path(settings.SBRENDER_OUTBOX) / row.image, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise Http404("image not in the outbox") from None
    return FileResponse(os.fdopen(fd, "rb"), content_type="image/png")
