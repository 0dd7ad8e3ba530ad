"""Update renders whose jobs have finished: run it from cron, or with --every."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from renders.models import Render, spool

# A row still pending this long after its commit lost its submit (the web
# process died between the commit and on_commit): submit it again.
LOST_AFTER = timedelta(minutes=1)


def collect() -> int:
    """Apply every finished result to its row; returns how many rows changed."""
    client = spool()
    done = 0
    for render in Render.objects.filter(status__in=[Render.Status.PENDING, Render.Status.QUEUED]):
        result = client.result(render.job_id)
        if result is not None:
            render.apply(result)
            done += 1
        elif (render.status == Render.Status.PENDING and render.created < timezone.now() - LOST_AFTER
              and not client.is_known(render.job_id)):
            render.submit()
    return done


class Command(BaseCommand):
    help = "Record the results of finished renders on their rows."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--every", type=float, default=0.0, metavar="SECONDS",
                            help="keep collecting, every SECONDS (default: once, then exit)")

    def handle(self, *args: Any, every: float, **options: Any) -> None:
        while True:
            done = collect()
            if done:
                self.stdout.write(f"collected {done} render(s)")
            if every <= 0:
                return
            time.sleep(every)
