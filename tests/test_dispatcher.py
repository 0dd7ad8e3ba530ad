"""The render loop against the in-memory broker, with a scripted renderer.

These check what the dispatcher decides (which jobs share a call, the
one-by-one fallback, cancels mid-render, a stop mid-batch, duplicate ids,
crash limits) in milliseconds; the real writer publishes into a real outbox.
The file spool and the real pipeline are shown end to end in test_e2e_*.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sbrender.broker import Delivery
from sbrender.config import load_settings
from sbrender.errors import RenderError, ShutdownRequested
from sbrender.jobs import Job
from sbrender.memorybroker import MemoryBroker
from sbrender.renderer import RenderOutput, StepCallback, call_key, only
from sbrender.service import Service


class ScriptedRenderer:
    """Flat images, one per seed; each call recorded. Jobs named in ``endless``
    step until told to stop; a batch holding a job in ``poison`` fails as a whole
    (as a batch too big for the GPU would), and that job fails alone too."""

    batch_key = staticmethod(call_key)

    def __init__(self, endless: set[str] = set(), poison: set[str] = set()) -> None:  # noqa: B006
        self.endless = set(endless)
        self.poison = set(poison)
        self.calls: list[list[str]] = []
        self.stepping = threading.Event()  # set once an endless render has made a step

    def load(self) -> float:
        return 0.0

    def describe(self) -> dict[str, Any]:
        return {"model": {"name": "scripted", "source": "test", "location": "", "random_weights": True},
                "device": "cpu", "dtype": "none", "versions": {}}

    def render(self, job: Job, seeds: list[int], on_step: StepCallback | None = None) -> RenderOutput:
        return only(self.render_batch([(job, seeds)], on_step))

    def render_batch(self, items: list[tuple[Job, list[int]]],
                     on_step: StepCallback | None = None) -> list[RenderOutput | RenderError]:
        ids = [job.id for job, _ in items]
        self.calls.append(ids)
        step = 0
        while step < items[0][0].steps or self.endless & set(ids):
            step += 1
            if on_step is not None and on_step(step, items[0][0].steps):
                raise ShutdownRequested()
            if self.endless & set(ids):
                self.stepping.set()
                time.sleep(0.005)
        if self.poison & set(ids):
            if len(ids) > 1:
                raise RenderError("CUDA out of memory (scripted)")
            return [RenderError("this job is poison (scripted)")]
        return [RenderOutput([Image.new("RGB", (job.width, job.height), (seed % 256, 0, 0)) for seed in seeds],
                             seeds, {"name": job.sampler}, {"inference_s": 0.0}) for job, seeds in items]


class Loop:
    """A service over a memory broker, running in a thread."""

    def __init__(self, root: Path, renderer: ScriptedRenderer, **overrides: Any) -> None:
        self.outbox = root / "outbox"
        self.outbox.mkdir(parents=True)
        (root / "state" / "daemons").mkdir(parents=True)
        self.settings = load_settings(env={}, overrides={
            "inbox": str(root / "inbox"), "outbox": str(self.outbox), "state": str(root / "state"),
            "metrics_dir": "off", "defaults.width": 64, "defaults.height": 64, "defaults.steps": 2, **overrides})
        self.renderer = renderer
        self.service = Service(self.settings, renderer, MemoryBroker())
        self.broker: MemoryBroker = self.service.broker  # type: ignore[assignment]
        self.broker.wake = self.service.wake
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name="loop-under-test")

    def _run(self) -> None:
        self.code = self.service.run()

    def submit(self, name: str, text: str, queued_at: float | None = None) -> Delivery:
        return self.broker.submit(name, text, queued_at)

    def result(self, job_id: str, timeout: float = 20) -> dict[str, Any]:
        path = self.outbox / f"{job_id}.json"
        wait_for(path.exists, timeout, f"no result for {job_id}; outbox: {sorted(p.name for p in self.outbox.iterdir())}")
        return json.loads(path.read_text())

    def stop(self) -> int | None:
        self.service.stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the loop did not stop"
        return self.code


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(0.005)


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Loop]]:
    monkeypatch.chdir(tmp_path)  # no config file of the project's own
    made: list[Loop] = []

    def make(renderer: ScriptedRenderer | None = None, start: bool = True, **overrides: Any) -> Loop:
        made.append(Loop(tmp_path / f"spool{len(made)}", renderer or ScriptedRenderer(), **overrides))
        if start:
            made[-1].thread.start()
            assert made[-1].service.ready.wait(10)
        return made[-1]

    yield make
    for each in made:
        if each.thread.is_alive():
            assert each.stop() == 0


def test_compatible_jobs_share_a_call_in_queue_order_and_priority_goes_first(loop: Callable[..., Loop]) -> None:
    run = loop(start=False, **{"perf.batch_size": 4})
    now = time.time()
    for k in range(5):
        run.submit(f"j{k}.yaml", f"prompt: job {k}\nseed: {k}\n", now + k)
    run.submit("wide.yaml", "prompt: another size\nwidth: 128\n", now + 2.5)  # splits the run of j's
    run.submit("urgent.yaml", "prompt: urgent\npriority: 5\nsteps: 3\n", now + 9)  # last in, first out
    run.thread.start()
    for job_id in ("j4", "wide", "urgent"):
        assert run.result(job_id)["status"] == "succeeded"
    assert run.renderer.calls == [["urgent"], ["j0", "j1", "j2"], ["wide"], ["j3", "j4"]]
    assert run.result("j1")["batch"] == {"jobs": ["j0", "j1", "j2"], "images": 3}
    assert "batch" not in run.result("wide")
    assert run.result("j3")["images"][0]["seed"] == 3, "each job keeps its own seed"


def test_a_failed_batch_renders_one_by_one_and_only_the_culprit_fails(loop: Callable[..., Loop]) -> None:
    run = loop(ScriptedRenderer(poison={"bad"}), start=False, **{"perf.batch_size": 3})
    now = time.time()
    for k, name in enumerate(("a", "bad", "c")):
        run.submit(f"{name}.yaml", f"prompt: {name}\n", now + k)
    run.thread.start()
    assert run.result("a")["status"] == "succeeded" and run.result("c")["status"] == "succeeded"
    bad = run.result("bad")
    assert bad["status"] == "failed" and "poison" in bad["error"]["message"]
    assert run.renderer.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    wait_for(lambda: len(run.broker.finished) == 3, 10, "every delivery is done")
    assert run.broker.results == {"a": True, "bad": False, "c": True}


def test_cancel_mid_render_stops_the_call_and_the_rest_of_the_batch_renders_again(
        loop: Callable[..., Loop]) -> None:
    renderer = ScriptedRenderer(endless={"long"})
    run = loop(renderer, start=False, **{"perf.batch_size": 2})
    run.submit("long.yaml", "prompt: never ends\n", time.time())
    run.submit("other.yaml", "prompt: shares the call\n", time.time() + 1)
    run.thread.start()
    assert renderer.stepping.wait(10)
    run.broker.cancel("long")
    cancelled = run.result("long")
    assert cancelled["status"] == "cancelled" and cancelled["error"]["message"] == "cancelled while rendering"
    assert cancelled["images"] == [] and not list(run.outbox.glob("long*.png"))
    assert run.result("other")["status"] == "succeeded"
    assert renderer.calls == [["long", "other"], ["other"]]


def test_a_queued_job_cancelled_during_a_render_gets_its_result_before_the_render_ends(
        loop: Callable[..., Loop]) -> None:
    renderer = ScriptedRenderer(endless={"long"})
    run = loop(renderer)
    run.submit("long.yaml", "prompt: never ends\n")
    assert renderer.stepping.wait(10)
    run.submit("waiting.yaml", "prompt: behind it\n")
    run.broker.cancel("waiting")
    result = run.result("waiting")  # while "long" still renders
    assert result["status"] == "cancelled" and result["error"]["message"] == "cancelled before it started"
    assert renderer.calls == [["long"]], "the waiting job never rendered, and the long render went on"
    assert result["params"]["prompt"] == "behind it"
    run.broker.cancel("long")
    assert run.result("long")["status"] == "cancelled"


def test_a_stop_mid_batch_gives_every_job_back_and_publishes_nothing(loop: Callable[..., Loop]) -> None:
    renderer = ScriptedRenderer(endless={"x"})
    run = loop(renderer, start=False, **{"perf.batch_size": 3})
    deliveries = [run.submit(f"{name}.yaml", f"prompt: {name}\n", time.time() + k) for k, name in enumerate("xyz")]
    run.thread.start()
    assert renderer.stepping.wait(10)
    assert run.stop() == 0
    assert sorted(run.broker.given_back) == sorted(d.token for d in deliveries)
    assert run.broker.pending() == 3, "all three are queued again"
    assert not list(run.outbox.iterdir())
    assert run.broker.close(), "nothing is left held"


def test_a_reused_id_fails_as_a_duplicate_and_the_first_result_stands(loop: Callable[..., Loop]) -> None:
    run = loop()
    run.submit("cat.yaml", "prompt: the first cat\nseed: 1\n")
    assert run.result("cat")["status"] == "succeeded"
    run.submit("cat.yaml", "prompt: another cat\n")
    dup = run.result("cat.dup1")
    assert dup["status"] == "failed" and dup["error"]["type"] == "duplicate_id"
    assert "already used by cat.yaml" in dup["error"]["message"]
    assert run.result("cat")["params"]["prompt"] == "the first cat"


def test_a_job_that_crashed_daemons_too_often_fails_without_rendering(loop: Callable[..., Loop]) -> None:
    run = loop(**{"limits.max_crashes": 2})
    run.submit("crashy.yaml", "prompt: renders fine\n")
    run.broker.submit("crashy2.yaml", "prompt: kills daemons\n", crashes={"crashy2": 2})
    result = run.result("crashy2")
    assert result["status"] == "failed" and "died 2 times" in result["error"]["message"]
    assert result["params"]["prompt"] == "kills daemons", "retryable: its parameters are kept"
    assert run.result("crashy")["status"] == "succeeded"
    assert run.renderer.calls == [["crashy"]]


def test_an_image_that_cannot_be_encoded_fails_its_job_with_a_result(loop: Callable[..., Loop]) -> None:
    class Broken(ScriptedRenderer):
        def render_batch(self, items: Any, on_step: Any = None) -> Any:
            outs = super().render_batch(items, on_step)
            return [RenderOutput(["not an image"], out.seeds, out.scheduler) for out in outs]  # type: ignore[list-item]

    run = loop(Broken())
    run.submit("odd.yaml", "prompt: x\n")
    result = run.result("odd")
    assert result["status"] == "failed" and "cannot encode the images" in result["error"]["message"]
    assert result["params"]["prompt"] == "x" and "sampler" not in result


def test_a_malformed_render_output_fails_its_job_and_the_loop_goes_on(loop: Callable[..., Loop]) -> None:
    class Malformed(ScriptedRenderer):
        def render_batch(self, items: Any, on_step: Any = None) -> Any:
            outs = super().render_batch(items, on_step)
            if items[0][0].id == "odd":
                return [RenderOutput(out.images, out.seeds, out.scheduler, None) for out in outs]  # type: ignore[arg-type]
            return outs

    run = loop(Malformed())
    run.submit("odd.yaml", "prompt: x\n")
    result = run.result("odd")
    assert result["status"] == "failed" and "unexpected render output" in result["error"]["message"]
    run.submit("next.yaml", "prompt: y\n")
    assert run.result("next")["status"] == "succeeded"


def test_a_bad_queued_file_that_is_cancelled_gets_a_cancelled_result(loop: Callable[..., Loop]) -> None:
    renderer = ScriptedRenderer(endless={"long"})
    run = loop(renderer)
    run.submit("long.yaml", "prompt: never ends\n")
    assert renderer.stepping.wait(10)
    run.submit("broken.yaml", "prompt: [unclosed\nsteps: many\n")
    run.broker.cancel("broken")
    result = run.result("broken")
    assert result["status"] == "cancelled" and result["error"]["type"] == "cancelled"
    run.broker.cancel("long")
