"""The command line: parse options, call the core, print the result.

Only ``run`` imports torch and diffusers (lazily, after ``preflight``); every other
command stays light, because Django hosts and shells call them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from . import __version__, samplers
from .client import STATES, Client, WaitTimeout, no_such_job, validate_file
from .config import SETTINGS, Settings, load_settings
from .errors import ConfigError, JobError, SbrenderError
from .jobs import Job, Rules

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1  # a job failed, a file is invalid, something is not found
EXIT_CONFIG = 2  # bad configuration or usage (click uses 2 for usage too), a model or spool `run` refuses


def folder_options(func: F) -> F:
    """``--config``, ``--inbox``, ``--outbox`` and ``--state``, for every command."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="Config file (default: $SBRENDER_CONFIG, else ./config/sbrender.yaml if present)."),
        click.option("--inbox", type=click.Path(file_okay=False), help="Inbox folder [SBRENDER_INBOX]."),
        click.option("--outbox", type=click.Path(file_okay=False), help="Outbox folder [SBRENDER_OUTBOX]."),
        click.option("--state", type=click.Path(file_okay=False), help="State folder [SBRENDER_STATE]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(config_file: str | None, **flags: Any) -> Settings:
    try:
        return load_settings(config_file, overrides=flags)
    except ConfigError as err:
        _fail(str(err), EXIT_CONFIG)


def _fail(message: str, code: int = EXIT_FAILED) -> Any:
    click.echo(f"sbrender: error: {message}", err=True)
    sys.exit(code)


def _errors_exit(func: F) -> F:
    """Turn our errors into a one-line message and an exit status, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as err:
            _fail(str(err), EXIT_CONFIG)
        except SbrenderError as err:
            _fail(str(err))

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sbrender")
def main() -> None:
    """sbrender: a Stable Diffusion batch renderer fed by a spool folder.

    Drop YAML/JSON job files into the inbox (or use `sbrender submit`); the
    daemon (`sbrender run`) renders them in order and publishes PNGs and a
    <id>.json result to the outbox.
    """


@main.command()
@folder_options
@click.option("--model", help="HF repo id, diffusers folder, or 'tiny-random' (random weights: noise, "
                              "for tests) [SBRENDER_MODEL].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu", "mps"]), help="[SBRENDER_DEVICE]")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), help="[SBRENDER_DTYPE]")
@click.option("--offline/--online", default=None, help="Load only local files [SBRENDER_OFFLINE].")
@click.option("--watch", "watch_mode", type=click.Choice(["auto", "inotify", "polling"]),
              help="How to notice new files [SBRENDER_WATCH_MODE].")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), help="[SBRENDER_LOG_FORMAT]")
@click.option("--once", is_flag=True, help="Render what is in the inbox, then exit.")
@_errors_exit
def run(config_file: str | None, once: bool, **flags: Any) -> None:
    """Run the daemon in the foreground (what systemd starts)."""
    keys = {"watch_mode": "watch.mode", "log_format": "log.format"}
    settings = _settings(config_file, **{keys.get(k, k): v for k, v in flags.items()})
    from . import logs, preflight

    try:  # before torch: a start that cannot work stops at once
        preflight.check(settings)
    except SbrenderError as err:
        _fail(str(err), EXIT_CONFIG)

    logs.configure(settings["log.format"], settings["log.level"])
    from .service import Service
    from .pipeline import DiffusersRenderer

    sys.exit(Service(settings, DiffusersRenderer(settings)).run(once=once))


@main.command()
@folder_options
@click.option("--host", help="Address to listen on (default 127.0.0.1; another needs serve.token) "
                             "[SBRENDER_SERVE_HOST].")
@click.option("--port", type=int, help="TCP port (default 7860; 0: any free one) [SBRENDER_SERVE_PORT].")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), help="[SBRENDER_LOG_FORMAT]")
@_errors_exit
def serve(config_file: str | None, **flags: Any) -> None:
    """Serve the HTTP API (the old /generate, A1111's /sdapi/v1, /v1/jobs) over the queue.

    Torch-free: run it on the web host; it talks to the daemons through the queue only.
    Needs the serve extra (pip install 'sbrender[serve]').
    """
    keys = {"host": "serve.host", "port": "serve.port", "log_format": "log.format"}
    settings = _settings(config_file, **{keys.get(k, k): v for k, v in flags.items()})
    from . import logs

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from .web import server
    except ImportError as err:
        _fail(f"sbrender serve needs FastAPI and uvicorn ({err}); install the serve extra: "
              "pip install 'sbrender[serve]'", EXIT_CONFIG)
    server.check(settings)
    logs.configure(settings["log.format"], settings["log.level"])
    sys.exit(server.serve(settings))


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Config file: model, device, dtype and perf.* are read from it as for `run`.")
@click.option("--model", help="Model to time (default: the configured one) [SBRENDER_MODEL].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu", "mps"]), help="[SBRENDER_DEVICE]")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), help="[SBRENDER_DTYPE]")
@click.option("--size", default="512x512", show_default=True, help="WIDTHxHEIGHT of every job.")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--jobs", "n_jobs", type=int, default=16, show_default=True, help="Jobs per run.")
@click.option("--batch", type=int, default=4, show_default=True,
              help="Also run the plain loop and the daemon batched (perf.batch_size); 1: unbatched only.")
@click.option("--latency-jobs", type=int, default=10, show_default=True,
              help="Jobs dropped one at a time into an idle daemon, for the drop-to-start latency.")
@click.option("--rounds", type=int, default=4, show_default=True,
              help="Runs of each side, taking turns to go first (an even count balances drift); "
                   "the ratios are of their means.")
@click.option("--lora-switches", type=int, default=20, show_default=True,
              help="Last, switches timed between two LoRA sets already loaded (two files written for the "
                   "model), as a ratio to one denoising step; 0: skip.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set perf.compile=default --set perf.channels_last=true (repeatable).")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False, exists=True),
              help="Make the bench's spool in this folder (default: the system temp folder); use the disk "
                   "your real spool is on.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the full report here as JSON.")
@_errors_exit
def bench(config_file: str | None, size: str, steps: int, n_jobs: int, batch: int, latency_jobs: int, rounds: int,
          lora_switches: int, extra: tuple[str, ...], spool_dir: str | None, report: str | None, **flags: Any) -> None:
    """Time a plain diffusers loop against the daemon on the same jobs; print ratios.

    Loads the model once; runs the plain loop (pipeline call, then PNG save) and
    the real daemon (files in, results out) in one process, unbatched and at
    --batch, --rounds times each, taking turns to go first; then drops
    --latency-jobs jobs one by one. docs/PERFORMANCE.md has measured tables and
    the commands behind them."""
    overrides: dict[str, Any] = dict(flags)
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE", hint="e.g. --set perf.compile=default")
        overrides[key.strip()] = value
    unknown = [k for k in overrides if k not in {s.key for s in SETTINGS}]
    if unknown:
        raise ConfigError(f"--set: unknown setting {unknown[0]}", hint="`sbrender config` lists them")
    settings = _settings(config_file, **overrides)
    parsed = _parse_size(size)
    assert parsed is not None
    if min(n_jobs, batch, steps, rounds) < 1 or min(latency_jobs, lora_switches) < 0:
        raise ConfigError("--jobs, --batch, --steps and --rounds must be at least 1, --latency-jobs and "
                          "--lora-switches at least 0")
    from . import bench as benchmark
    from . import logs

    logs.configure("console", "warning")
    plan = benchmark.Plan(jobs=n_jobs, width=parsed[0], height=parsed[1], steps=steps, batch_size=batch,
                          latency_jobs=latency_jobs, lora_switches=lora_switches, rounds=rounds,
                          sampler=settings["defaults.sampler"],
                          guidance_scale=settings["defaults.guidance_scale"])
    result = benchmark.run(settings, plan, spool_dir=Path(spool_dir) if spool_dir else None,
                           say=lambda text: click.echo(text, err=True))
    if report:
        Path(report).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    click.echo(benchmark.table(result))


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return width, height


def _parse_loras(items: tuple[str, ...]) -> dict[str, Any] | None:
    """``--lora NAME=W`` or ``NAME=TE:UNET`` -> the job's ``loras`` field (checked by the job's own rules)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: write NAME=WEIGHT, e.g. add_detail=0.8", param_hint="--lora")
        try:
            parts = [float(w) for w in weight.split(":")]
        except ValueError:
            raise click.BadParameter(f"{item!r}: the weight must be a number (or TE:UNET)",
                                     param_hint="--lora") from None
        if len(parts) > 2:
            raise click.BadParameter(f"{item!r}: one weight, or TE:UNET", param_hint="--lora")
        out[name] = parts[0] if len(parts) == 1 else {"te": parts[0], "unet": parts[1]}
    return out or None


def _parse_meta(items: tuple[str, ...]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


@main.command()
@folder_options
@click.argument("prompt")
@click.option("--negative", help="Negative prompt.")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance", type=float, help="CFG scale.")
@click.option("--size", help="WIDTHxHEIGHT, multiples of 8, e.g. 512x512.")
@click.option("--seed", type=int, help="Seed (default: random, recorded in the result).")
@click.option("--count", type=int, help="Images for this job (seeds seed, seed+1, ...).")
@click.option("--sampler", help=f"Sampler, e.g. {', '.join(samplers.names()[:4])} ...")
@click.option("--scheduler", help=f"Schedule type: {', '.join(samplers.schedules())} (default: the sampler's own).")
@click.option("--clip-skip", "clip_skip", type=int, help="A1111's Clip skip: 1 = the last layer, 2 = the one before.")
@click.option("--lora", "lora", multiple=True, metavar="NAME=WEIGHT",
              help="A LoRA from loras_dir and its weight (TE:UNET for two); repeatable. Or <lora:name:w> in PROMPT.")
@click.option("--model", help="Model name in models_dir (`sbrender models`; default: the configured model).")
@click.option("--vae", help="VAE: Automatic, None, or a name in vae_dir (default: the vae setting).")
@click.option("--init-image", "init_image", type=click.Path(path_type=Path), metavar="PATH",
              help="img2img: start from this PNG, JPEG or WebP file (sent inside the job).")
@click.option("--denoising-strength", "--strength", "denoising_strength", type=float,
              help="img2img: how much of the init image is redrawn, 0 to 1 (default 0.75).")
@click.option("--resize-mode", "resize_mode", type=int,
              help="img2img: 0 just resize (default), 1 crop and resize, 2 resize and fill, as A1111.")
@click.option("--priority", type=int, help="Higher renders first (default 0).")
@click.option("--id", "job_id", help="Job id (default: a new unique one).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Add to the job's metadata (repeatable).")
@click.option("--wait", is_flag=True, help="Wait for the result and print the image paths.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds (exit 3).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors_exit
def submit(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, prompt: str,
           negative: str | None, steps: int | None, guidance: float | None, size: str | None, seed: int | None,
           count: int | None, sampler: str | None, scheduler: str | None, clip_skip: int | None,
           lora: tuple[str, ...], model: str | None, vae: str | None, init_image: Path | None,
           denoising_strength: float | None, resize_mode: int | None, priority: int | None,
           job_id: str | None, meta: tuple[str, ...], wait: bool, timeout: float | None, as_json: bool) -> None:
    """Queue PROMPT as a job and print its id."""
    settings = _settings(config_file, inbox=inbox, outbox=outbox, state=state)
    client = Client.from_settings(settings)
    width, height = _parse_size(size) or (None, None)
    try:
        job_id = client.submit(prompt, job_id=job_id, negative_prompt=negative, steps=steps,
                               guidance_scale=guidance, width=width, height=height, seed=seed, count=count,
                               sampler=sampler, scheduler=scheduler, clip_skip=clip_skip,
                               loras=_parse_loras(lora), model=model, vae=vae, init_image=init_image,
                               denoising_strength=denoising_strength, resize_mode=resize_mode, priority=priority,
                               metadata=_parse_meta(meta))
    except JobError as err:
        _fail(f"job not submitted: {err}")
    if not wait:
        click.echo(json.dumps({"id": job_id}) if as_json else job_id)
        return
    try:
        result = _wait(client, job_id, timeout)
    except WaitTimeout as err:
        _fail(str(err), 3)
    _print_result(client, result, as_json)


def _wait(client: Client, job_id: str, timeout: float | None) -> dict[str, Any]:
    """``client.wait`` with a progress line on a terminal (queued position, then
    step i/N and the time spent); quiet when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return client.wait(job_id, timeout=timeout)
    start = time.monotonic()
    try:
        while True:
            where = client.progress(job_id)
            elapsed = time.monotonic() - start
            if where["state"] == "running" and where.get("steps"):
                done = int(20 * where["step"] / where["steps"])
                line = f"{job_id} [{'#' * done}{'-' * (20 - done)}] step {where['step']}/{where['steps']}"
            elif where["state"] == "pending":
                place = f", {where['position']} of {where['of']}" if "position" in where else ""
                line = f"{job_id} queued{place}"
            else:
                line = f"{job_id} {where['state']}"
            click.echo(f"\r\033[K{line}  {elapsed:.1f}s", nl=False, err=True)
            remaining = None if timeout is None else timeout - (time.monotonic() - start)
            try:
                return client.wait(job_id, timeout=0.5 if remaining is None else max(0.0, min(0.5, remaining)))
            except WaitTimeout:
                if remaining is not None and remaining <= 0.5:
                    raise WaitTimeout(f"job {job_id} has no result after {timeout:g} s",
                                      hint="is the daemon running? see `sbrender status`") from None
    finally:
        click.echo("\r\033[K", nl=False, err=True)


def _print_result(client: Client, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result.get("status") == "succeeded":
        for path in client.image_paths(result):
            click.echo(str(path))
    if result.get("status") != "succeeded":
        if not as_json:
            click.echo(f"{result.get('id')}: failed: {(result.get('error') or {}).get('message')}", err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@folder_options
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON.")
@_errors_exit
def wait(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, job_id: str,
         timeout: float | None, as_json: bool) -> None:
    """Wait for JOB_ID to finish; print its image paths (exit 1 if it failed)."""
    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    if client.result(job_id) is None and not client.is_known(job_id):
        _fail(no_such_job(job_id))
    try:
        result = _wait(client, job_id, timeout)
    except WaitTimeout as err:
        _fail(str(err), 3)
    _print_result(client, result, as_json)


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@main.command()
@folder_options
@click.option("--only", type=click.Choice(STATES),
              help="Show only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors_exit
def jobs(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, only: str | None,
         as_json: bool) -> None:
    """List jobs: pending, running, succeeded and failed."""
    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    listed = [j for j in client.jobs() if only is None or j.state == only]
    if as_json:
        # One job per line: readable, and json's C encoder (indent= would not use it).
        click.echo("[" + ",\n ".join(json.dumps(j.to_dict(), ensure_ascii=False) for j in listed) + "]")
        return
    if not listed:
        click.echo("no jobs")
        return
    width = max(len(j.id) for j in listed)
    lines = [f"{'ID':<{width}}  {'STATE':<9}  {'AGE':>4}  PROMPT"]
    for j in listed:
        text = j.prompt if j.state != "failed" else f"{j.prompt}  [{j.error}]"
        lines.append(f"{j.id:<{width}}  {j.state:<9}  {_age(j.since):>4}  {_one_line(text, 80)}")
    click.echo("\n".join(lines))


def _one_line(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` characters: whitespace runs (line
    breaks too) become one space, and a cut is marked with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@main.command()
@folder_options
@click.argument("job_id")
@_errors_exit
def show(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, job_id: str) -> None:
    """Print JOB_ID's result JSON, or the pending job."""
    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    found = client.show(job_id)
    if found is None:
        _fail(no_such_job(job_id))
    click.echo(json.dumps(found, indent=2, ensure_ascii=False))


@main.command()
@folder_options
@click.option("--stale-after", type=float, default=60.0, show_default=True,
              help="A daemon without progress for this many seconds is stalled.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors_exit
def status(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None,
           stale_after: float, as_json: bool) -> None:
    """Show the daemons serving this spool. Exit 0 when one is alive and making
    progress, 1 otherwise (a health check)."""
    from .status import describe

    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    healthy, daemons = client.health(stale_after)
    if as_json:
        click.echo(json.dumps({"healthy": healthy, "daemons": daemons}, indent=2))
    elif not daemons:
        click.echo(f"no daemon serves {client.inbox}", err=True)
    for d in daemons if not as_json else ():
        counts = ", ".join(f"{d.get(k, 0)} {k}" for k in ("succeeded", "failed", "cancelled"))
        click.echo(f"{d.get('owner')}: {d['health']}: {describe(d)} (model {d.get('model')} on "
                   f"{d.get('device')}; since {d.get('started_at')}; {counts}; heartbeat {d.get('heartbeat')})")
    sys.exit(0 if healthy else EXIT_FAILED)


@main.command()
@folder_options
@click.argument("job_id")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Wait this long for a running daemon to confirm.")
@_errors_exit
def cancel(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, job_id: str,
           timeout: float) -> None:
    """Cancel JOB_ID: a queued job gets a cancelled result, a running one stops at its next step."""
    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    try:
        client.cancel(job_id)
    except JobError as err:
        _fail(str(err))
    if client.queue is None and not any(d["alive"] for d in client.daemons()):
        click.echo(f"{job_id}: cancel requested; no daemon is running, it takes effect when one starts")
        return
    try:
        result = client.wait(job_id, timeout=timeout)
    except WaitTimeout:
        click.echo(f"{job_id}: cancel requested; the daemons have not confirmed it yet")
        return
    click.echo(f"{job_id}: {result.get('status')}")


@main.command()
@folder_options
@click.argument("job_id")
@_errors_exit
def retry(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None, job_id: str) -> None:
    """Put a failed or cancelled JOB_ID back into the queue, under its id."""
    client = Client.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    try:
        name = client.retry(job_id)
    except JobError as err:
        _fail(str(err))
    click.echo(f"{job_id}: queued again" + (f" as {client.inbox / name}" if client.queue is None else ""))


@main.command()
@folder_options
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors_exit
def validate(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None,
             files: tuple[str, ...], as_json: bool) -> None:
    """Check job FILES as the daemon would, without submitting them."""
    rules = Rules.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    report = []
    for name in files:
        for entry in validate_file(Path(name), rules):
            ok = isinstance(entry, Job)
            report.append({"file": name, "id": entry.id, "valid": ok,
                           **({"params": entry.params()} if ok else {"error": entry.error.to_dict()})})
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for item in report:
            mark = "ok" if item["valid"] else f"invalid: {item['error']['message']}"
            click.echo(f"{item['file']}: {item['id']}: {mark}")
    if not all(item["valid"] for item in report):
        sys.exit(EXIT_FAILED)


@main.command()
@folder_options
@_errors_exit
def schema(config_file: str | None, inbox: str | None, outbox: str | None, state: str | None) -> None:
    """Print the JSON Schema of job files (with the configured limits)."""
    from .jobs import json_schema

    rules = Rules.from_settings(_settings(config_file, inbox=inbox, outbox=outbox, state=state))
    click.echo(json.dumps(json_schema(rules), indent=2))


@main.command()
@folder_options
@click.option("--model", help="As for `run`.")
@click.option("--offline/--online", default=None, help="As for `run`.")
@_errors_exit
def doctor(config_file: str | None, **flags: Any) -> None:
    """Check torch and the device, the model (offline), the folders and the config; say what to fix."""
    from .doctor import FAIL, diagnose

    findings = diagnose(_settings(config_file, **flags))
    for finding in findings:
        click.echo(finding.line())
    failed = sum(f.level == FAIL for f in findings)
    click.echo(f"{failed} problem(s) to fix" if failed else "ready to run")
    sys.exit(EXIT_FAILED if failed else 0)


@main.command()
@folder_options
@click.option("--model", help="As for `run`.")
@click.option("--embeddings-dir", type=click.Path(file_okay=False), help="[SBRENDER_EMBEDDINGS_DIR]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_errors_exit
def models(config_file: str | None, as_json: bool, **flags: Any) -> None:
    """List the model and the embeddings the daemon would use (name, vectors, hash), and why a file is unusable."""
    from .inventory import inventory, table

    listing = inventory(_settings(config_file, **flags))
    click.echo(json.dumps(listing, indent=2, ensure_ascii=False) if as_json else table(listing))


@main.command("config")
@folder_options
@click.option("--model", help="As for `run`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--sources", is_flag=True, help="Show where each value comes from.")
@_errors_exit
def show_config(config_file: str | None, as_json: bool, sources: bool, **flags: Any) -> None:
    """Print the effective configuration."""
    settings = _settings(config_file, **flags)
    if as_json:
        click.echo(json.dumps({"config_file": str(settings.config_file) if settings.config_file else None,
                               "settings": settings.nested(), "sources": dict(settings.sources)}, indent=2))
        return
    click.echo(f"# config file: {settings.config_file or 'none (built-in defaults)'}")
    if sources:
        for s in SETTINGS:
            click.echo(f"{s.key} = {settings[s.key]!r}  # {settings.sources[s.key]}")
    else:
        click.echo(yaml.safe_dump(settings.nested(), sort_keys=False, allow_unicode=True), nl=False)


@main.group("compile-cache")
def compile_cache() -> None:
    """perf.compile's caches: list them, and move this host's bundle of compiled code to another host.

    A bundle only serves a host with the same torch, Triton, Python and GPU model;
    `import` refuses any other. The daemon applies an imported bundle at its next start.
    """


def _cache_options(func: F) -> F:
    func = click.option("--device", type=click.Choice(["auto", "cuda", "cpu", "mps"]), help="[SBRENDER_DEVICE]")(func)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file, as for `run`.")(
        func)


@compile_cache.command("show")
@_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors_exit
def compile_cache_show(config_file: str | None, as_json: bool, **flags: Any) -> None:
    """List the cache folders (one per torch, Triton, Python and device) and their bundles."""
    from . import compilecache

    settings = _settings(config_file, **flags)
    parent = compilecache.root(settings["perf.compile_cache"], settings.cache)
    rows = compilecache.describe(parent) if parent is not None else []
    if as_json:
        click.echo(json.dumps({"folder": str(parent) if parent else None, "hosts": rows}, indent=2))
        return
    click.echo(f"compile caches in {parent}" if parent else "perf.compile_cache is off: torch's own folder")
    for row in rows:
        bundle = row.get("bundle")
        what = (f"bundle of {time.strftime('%Y-%m-%d %H:%M', time.localtime(bundle['created']))}, "
                f"compile {bundle.get('compile')}, batch sizes {bundle.get('batch_sizes')}" if bundle
                else row.get("bundle_error", "no bundle"))
        click.echo(f"  {Path(row['folder']).name}: {row['bytes'] / 1e6:.1f} MB; {what}")


@compile_cache.command("export")
@_cache_options
@click.argument("file", type=click.Path(dir_okay=False))
@_errors_exit
def compile_cache_export(config_file: str | None, file: str, **flags: Any) -> None:
    """Write this host's bundle of compiled code to FILE."""
    from . import compilecache

    header = compilecache.export_bundle(compilecache.for_settings(_settings(config_file, **flags)), Path(file))
    click.echo(f"wrote {file}: {_bundle_line(header)}")


@compile_cache.command("import")
@_cache_options
@click.argument("file", type=click.Path(dir_okay=False))
@_errors_exit
def compile_cache_import(config_file: str | None, file: str, **flags: Any) -> None:
    """Make FILE (from `export` on a host of the same kind) this host's bundle; the daemon applies it at its next start."""
    from . import compilecache

    target = compilecache.for_settings(_settings(config_file, **flags))
    header = compilecache.import_bundle(Path(file), target)
    click.echo(f"imported into {target.bundle}: {_bundle_line(header)}; applied at the daemon's next start")


def _bundle_line(header: dict[str, Any]) -> str:
    from .compilecache import Host

    return (f"{Host(**header['host']).describe()}, compile {header.get('compile')}, "
            f"batch sizes {header.get('batch_sizes')}, artifacts {header.get('artifacts')}")


if __name__ == "__main__":  # pragma: no cover
    main()
