"""Fault injection into the real renderer, for tests and drills.

``SBRENDER_TEST_FAULTS`` names faults by job id: ``job-a=oom,job-b=nan``. Each
fires inside the real diffusers call, from the step callback, so the error
handling under test is the production path, not a stand-in. ``load`` alone
(``SBRENDER_TEST_FAULTS=load``) makes the model load fail.

| fault | what happens at the first denoising step |
|---|---|
| ``oom`` | ``torch.OutOfMemoryError``, as CUDA raises it |
| ``nan`` | the latents become NaN (an fp16 overflow does this) |
| ``error`` | a ``RuntimeError`` from inside the pipeline |
| ``crash`` | the daemon process is killed with SIGKILL |
| ``slow`` | each step sleeps 2 s (a render long enough to watch or cancel) |
| ``stall`` | each step sleeps 10 s (a render that is surely mid-step when signalled) |
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from .errors import ConfigError

ENV = "SBRENDER_TEST_FAULTS"
LOAD = "load"


def _oom(kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")


def _nan(kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {**kwargs, "latents": torch.full_like(kwargs["latents"], float("nan"))}


def _error(kwargs: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("injected pipeline failure")


def _crash(kwargs: dict[str, Any]) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return kwargs


def _sleeper(seconds: float) -> Any:
    def sleep(kwargs: dict[str, Any]) -> dict[str, Any]:
        time.sleep(seconds)
        return kwargs

    return sleep


FAULTS = {"oom": _oom, "nan": _nan, "error": _error, "crash": _crash, "slow": _sleeper(2.0),
          "stall": _sleeper(10.0)}


def from_env(environ: Any = None) -> dict[str, str]:
    """``{job_id: fault}`` from the environment; ``{"": "load"}`` for a load fault."""
    text = (environ if environ is not None else os.environ).get(ENV, "")
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == LOAD:
            out[""] = LOAD
            continue
        job_id, _, fault = item.partition("=")
        if fault not in FAULTS:
            raise ConfigError(f"{ENV}: unknown fault {fault!r} for {job_id!r}; known: {', '.join(FAULTS)}, load")
        out[job_id] = fault
    return out


def inject(fault: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return FAULTS[fault](kwargs)
