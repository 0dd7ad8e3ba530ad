"""The example against a real ``sbrender run`` daemon on the tiny-random model.

Run: ``.venv/bin/python examples/django/manage.py test`` (from any folder).
TransactionTestCase, because ``on_commit`` only fires on a real commit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.db import transaction
from django.test import TestCase, TransactionTestCase, override_settings
from django.urls import reverse
from django.utils import timezone
from sbrender.client import WaitTimeout

from renders.models import Render, spool

READY_TIMEOUT_S = 120.0
RESULT_TIMEOUT_S = 60.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Rollback(Exception):
    pass


class WithDaemon(TransactionTestCase):
    """One daemon for the class, on a spool in a temp folder the settings point at."""

    # This job fails inside the real renderer (SBRENDER_TEST_FAULTS), so its id is fixed up front.
    failing_id = f"render-fails-{secrets.token_hex(4)}"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        root = Path(tempfile.mkdtemp(prefix="sbrender-django-"))
        cls.addClassCleanup(shutil.rmtree, root, ignore_errors=True)
        folders = {name: root / "spool" / name for name in ("inbox", "outbox", "state")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        spool_settings = override_settings(**{f"SBRENDER_{k.upper()}": str(v) for k, v in folders.items()})
        spool_settings.enable()
        cls.addClassCleanup(spool_settings.disable)

        # Nothing of the caller's sbrender setup reaches the daemon, and its working
        # folder has no config/sbrender.yaml to pick up. The daemon builds tiny-random
        # into the empty cache itself, so this process, like a web app, never loads torch.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SBRENDER_")}
        env.update({"SBRENDER_CACHE": str(root / "cache"), "SBRENDER_DEFAULTS_WIDTH": "64",
                    "SBRENDER_DEFAULTS_HEIGHT": "64", "SBRENDER_DEFAULTS_STEPS": "2",
                    "SBRENDER_LOG_FORMAT": "json", "SBRENDER_TEST_FAULTS": f"{cls.failing_id}=error",
                    "PYTHONUNBUFFERED": "1"})
        cls.log_path = root / "daemon.log"
        log = cls.log_path.open("w")
        cls.addClassCleanup(log.close)
        cls.daemon = subprocess.Popen(
            [sys.executable, "-m", "sbrender", "run", "--model", "tiny-random",
             *(arg for name, folder in folders.items() for arg in (f"--{name}", str(folder)))],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        cls.addClassCleanup(cls.stop_daemon)
        cls.wait_ready()

    @classmethod
    def log_events(cls) -> list[dict[str, Any]]:
        events = []
        for line in cls.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass  # a library's stray line
        return events

    @classmethod
    def wait_ready(cls) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any(e.get("event") == "ready" for e in cls.log_events()):
            if cls.daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready (exit {cls.daemon.poll()}):\n{cls.log_path.read_text()}")
            time.sleep(0.05)

    @classmethod
    def stop_daemon(cls) -> None:
        if cls.daemon.poll() is None:
            cls.daemon.send_signal(signal.SIGTERM)
        try:
            code = cls.daemon.wait(timeout=60)
        finally:
            if cls.daemon.poll() is None:
                cls.daemon.kill()
                cls.daemon.wait()
        assert code == 0, f"daemon exited {code}:\n{cls.log_path.read_text()[-4000:]}"

    def wait_and_collect(self, render: Render) -> Render:
        """Wait for the job's result, run the management command, reread the row."""
        try:
            spool().wait(render.job_id, timeout=RESULT_TIMEOUT_S)
        except WaitTimeout as err:
            raise AssertionError(f"{err}\n{self.log_path.read_text()[-4000:]}") from None
        call_command("collect_renders", stdout=StringIO())
        render.refresh_from_db()
        return render


class RenderLifecycleTests(WithDaemon):
    def test_a_render_asked_for_in_the_form_is_rendered_collected_and_shown(self) -> None:
        response = self.client.post(reverse("index"), {"prompt": "a cat on a mat"})
        render = Render.objects.get()
        self.assertRedirects(response, reverse("render", args=[render.pk]))
        self.assertEqual(render.status, Render.Status.QUEUED)
        self.assertContains(self.client.get(reverse("index")), "a cat on a mat</a>: queued")
        page = self.client.get(reverse("render", args=[render.pk]))
        self.assertContains(page, "queued")
        self.assertNotContains(page, "<img")

        render = self.wait_and_collect(render)
        self.assertEqual(render.status, Render.Status.SUCCEEDED)
        self.assertEqual(render.image, f"{render.job_id}.png")
        result = spool().result(render.job_id)
        assert result is not None
        self.assertEqual(result["metadata"], {"render": render.pk})  # the result names its row

        page = self.client.get(reverse("render", args=[render.pk]))
        image_url = reverse("render-image", args=[render.pk])
        self.assertContains(page, f'<img src="{image_url}"')
        self.assertContains(page, "succeeded")
        response = self.client.get(image_url)
        self.assertEqual(response["Content-Type"], "image/png")
        png = b"".join(response.streaming_content)
        self.assertTrue(png.startswith(PNG_SIGNATURE))
        self.assertEqual(png, (Path(spool().outbox) / render.image).read_bytes())
        self.assertNotIn("torch", sys.modules)  # the client side stays light

    def test_a_rolled_back_row_submits_nothing(self) -> None:
        with self.assertRaises(Rollback), transaction.atomic():
            render = Render.objects.create(prompt="never committed")
            raise Rollback
        self.assertFalse(Render.objects.exists())
        # Not in the inbox, not claimed, not finished: the spool never heard of it.
        self.assertFalse(spool().is_known(render.job_id))
        self.assertEqual([p.name for p in spool().inbox.iterdir()], [])

    def test_a_job_that_fails_in_the_renderer_fails_its_row(self) -> None:
        render = self.wait_and_collect(Render.objects.create(prompt="a cat", job_id=self.failing_id))
        self.assertEqual(render.status, Render.Status.FAILED)
        self.assertIn("injected pipeline failure", render.error)
        self.assertEqual(render.image, "")

        page = self.client.get(reverse("render", args=[render.pk]))
        self.assertContains(page, "injected pipeline failure")
        self.assertNotContains(page, "<img")
        self.assertEqual(self.client.get(reverse("render-image", args=[render.pk])).status_code, 404)

    def test_a_job_the_client_refuses_fails_its_row_without_reaching_the_spool(self) -> None:
        render = Render.objects.create(prompt="   ")
        render.refresh_from_db()
        self.assertEqual(render.status, Render.Status.FAILED)
        self.assertIn("prompt must not be empty", render.error)
        self.assertFalse(spool().is_known(render.job_id))

    def test_collect_resubmits_a_row_whose_submit_was_lost(self) -> None:
        # bulk_create skips save(), so no on_commit: as if the web process died after
        # the commit. Young rows are left alone; an old one is submitted again.
        [render] = Render.objects.bulk_create([Render(prompt="a lost cat")])
        call_command("collect_renders", stdout=StringIO())
        self.assertFalse(spool().is_known(render.job_id))
        Render.objects.filter(pk=render.pk).update(created=timezone.now() - timedelta(minutes=5))
        call_command("collect_renders", stdout=StringIO())
        self.assertTrue(spool().is_known(render.job_id))

        render = self.wait_and_collect(render)
        self.assertEqual(render.status, Render.Status.SUCCEEDED)


class ImageViewTests(TestCase):
    def test_only_plain_png_names_in_the_outbox_are_served(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="sbrender-django-"))
        self.addCleanup(shutil.rmtree, root)
        outbox = root / "outbox"
        outbox.mkdir()
        (outbox / "render-ok.png").write_bytes(PNG_SIGNATURE + b"ok")
        (root / "secret.png").write_bytes(PNG_SIGNATURE + b"secret")
        (outbox / "link.png").symlink_to(root / "secret.png")
        with self.captureOnCommitCallbacks(execute=False):  # never submitted: no daemon here
            render = Render.objects.create(prompt="x", status=Render.Status.SUCCEEDED)
        url = reverse("render-image", args=[render.pk])

        def get(name: str) -> Any:
            Render.objects.filter(pk=render.pk).update(image=name)
            with self.settings(SBRENDER_OUTBOX=str(outbox)):
                return self.client.get(url)

        self.assertEqual(b"".join(get("render-ok.png").streaming_content), PNG_SIGNATURE + b"ok")
        for name in ("../secret.png", str(root / "secret.png"), "link.png", ".hidden.png", "notes.txt", ""):
            self.assertEqual(get(name).status_code, 404, name)
