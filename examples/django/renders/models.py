"""A render a user asked for, handed to sbrender once its row is committed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.urls import reverse
from sbrender.client import Client
from sbrender.errors import SbrenderError
from sbrender.ids import new_id


def spool() -> Client:
    """The torch-free client over the folders the daemon serves."""
    return Client(settings.SBRENDER_INBOX, settings.SBRENDER_OUTBOX, settings.SBRENDER_STATE)


def new_job_id() -> str:
    # Chosen before the row is saved, so the row knows its job before the job exists.
    # Not the primary key: sqlite may reuse a deleted row's key, and the spool never
    # accepts an id twice.
    return new_id("render")


class Render(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"  # saved; submitted when the transaction commits
        QUEUED = "queued"  # in the spool; collect_renders picks up the result
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    prompt = models.TextField()
    job_id = models.CharField(max_length=128, unique=True, default=new_job_id, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    image = models.CharField(max_length=255, blank=True)  # a file name in the outbox
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.job_id} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("render", args=[self.pk])

    @property
    def finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED, self.Status.CANCELLED)

    def save(self, *args: Any, **kwargs: Any) -> None:
        adding = self._state.adding
        super().save(*args, **kwargs)
        if adding:
            # Submit only what was committed: a rolled-back row must not leave a
            # render behind that no row will ever collect.
            transaction.on_commit(self.submit, using=self._state.db)

    def submit(self) -> None:
        """Queue the job; a job the client refuses fails the row at once."""
        rows = Render.objects.filter(pk=self.pk, status=self.Status.PENDING)
        try:
            spool().submit(self.prompt, job_id=self.job_id, metadata={"render": self.pk})
        except SbrenderError as err:
            rows.update(status=self.Status.FAILED, error=str(err))
            return
        # Only from pending: a fast daemon and collector may have finished it already.
        rows.update(status=self.Status.QUEUED)

    def apply(self, result: Mapping[str, Any]) -> None:
        """Record a finished job's outbox JSON on the row."""
        status = str(result.get("status"))
        if status == self.Status.SUCCEEDED:
            self.image = str(result["images"][0]["file"])
        else:
            self.error = str((result.get("error") or {}).get("message") or f"the job ended {status}")
        self.status = status if status in self.Status.values else self.Status.FAILED
        self.save(update_fields=["status", "image", "error"])
