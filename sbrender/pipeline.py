"""The real renderer: a diffusers Stable Diffusion pipeline kept warm.

Torch and diffusers are imported here and only here (and in ``models``), so the
CLI's light commands never pay for them.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import platform
import re
import time
import types
from pathlib import Path
from typing import Any

# Quiet the libraries' own console output (progress bars, import notices); our
# log says what happens. SBRENDER log.level debug turns them back on.
for _name, _value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402

from . import (__version__, adapters, checkpoints, conditioning, editing, embeddings, faults, initimage, loras,
               modelpool, models, prompts, samplers, speedups)
from .config import Settings
from .errors import JobError, ModelError, RenderError, SbrenderError, ShutdownRequested, first_line
from .jobs import Job
from .promptcache import PromptCache
from .renderer import RenderOutput, StepCallback, call_key, only

log = structlog.get_logger("sbrender")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(setting: str, device: str) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    return torch.float16 if device in ("cuda", "mps") else torch.float32


def library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"sbrender": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "diffusers": str(diffusers.__version__), "transformers": str(transformers.__version__)}


class DiffusersRenderer:
    """``Renderer`` over ``StableDiffusionPipeline``s kept warm (``modelpool``): the
    job's model is picked, or loaded, before its call; samplers are swapped per
    job with ``from_config``, VAEs by putting the job's in the pipeline."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_device(settings["device"])
        self.dtype = pick_dtype(settings["dtype"], self.device)
        self.faults = faults.from_env()
        self.pool = modelpool.Pool(settings["models.keep_loaded"], settings["models.max_memory_mb"] << 20)
        self.current: modelpool.WarmModel | None = None
        self._started = False
        self.models = checkpoints.models_of(settings)
        self.vaes = checkpoints.vaes_of(settings)
        self._broken: dict[tuple[Any, ...], ModelError] = {}  # a file that failed to load, until it changes
        self._sha256s: dict[tuple[Any, ...], str] = {}  # VAE files' hashes by path, size and time
        self._loras: loras.Catalog | None = None  # loras_dir, scanned when a job first names a LoRA
        # (prompt text, positive, denoiser calls, clip skip, embeddings, text encoder and its LoRAs) -> its encoding
        self._prompts: PromptCache[tuple[conditioning.Scheduled, list[str]]] = PromptCache(
            settings["perf.prompt_cache_mb"] << 20,
            lambda entry: entry[0].embeds.element_size() * entry[0].embeds.nelement())

    # The model of the call in progress (the last one picked), as the rest of the renderer sees it.
    @property
    def model(self) -> modelpool.WarmModel:
        assert self.current is not None, "load() first"
        return self.current

    @property
    def pipe(self) -> Any:
        return self.model.pipe

    @property
    def ref(self) -> models.ModelRef | None:
        return self.current.ref if self.current is not None else None

    @property
    def perf(self) -> dict[str, Any]:
        return self.current.perf if self.current is not None else {}

    @property
    def catalog(self) -> embeddings.Catalog:
        return self.model.embeddings

    @property
    def _text_encoder(self) -> Any:
        return self.model.text_encoder

    @property
    def _adapters(self) -> adapters.Adapters:
        return self.model.adapters

    def load(self) -> float:
        """Load the configured model (the one jobs naming none render with)."""
        start = time.perf_counter()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ModelError("device is cuda but torch sees no CUDA GPU",
                             hint="set device: auto or cpu, or install a CUDA build of torch")
        if self.faults.get("") == faults.LOAD:
            raise ModelError("cannot load the model: injected fault (SBRENDER_TEST_FAULTS=load)")
        self._use_model("")
        self._started = True
        return time.perf_counter() - start

    def _use_model(self, name: str) -> float:
        """Make the named model (catalog name; "" the configured one) the current one,
        loading it when it is not warm (or its file was replaced since); the seconds
        spent loading. Raises ``JobError`` (a name no file has), ``ModelError`` (a
        file that cannot be loaded)."""
        entry = self.models.lookup(name or self.settings.model, "model")
        key = "" if entry.kind == "default" else entry.name
        model = self.pool.get(key)
        if model is not None and entry.path is not None and _stamp(entry.path) != model.stamp:
            log.info("model file changed; loading it again", model=self._shown(key), file=entry.file)
            self.pool.drop(key)
            if self.current is model:
                self.current = None
            model = None
        seconds = 0.0
        if model is None:
            start = time.perf_counter()
            model = self._load_model(key, entry)
            seconds = time.perf_counter() - start
        if model is not self.current:
            if self.current is not None:
                self.current.adapters.use([])  # parts it shares with the next model carry none of its LoRAs
            self.current = model
        return seconds

    def _shown(self, key: str) -> str:
        return key or self.settings.model  # the configured model by its setting, in logs

    def _load_model(self, key: str, entry: checkpoints.Entry) -> modelpool.WarmModel:
        """Load a model beside the warm ones, its text encoder and VAE taken from a
        warm model that holds the same weights; only then do the least recently used
        leave (a file that fails to load costs no warm model). Raises ``ModelError``."""
        offline = models.is_offline(self.settings["offline"])
        stamp = _stamp(entry.path)
        if stamp in self._broken:
            raise self._broken[stamp]
        try:
            ref = models.resolve(str(entry.path) if entry.path is not None else self.settings.model,
                                 self.settings.cache, self.settings["model_config"], offline=offline)
            if key:
                ref = dataclasses.replace(ref, name=key)
            known = {part: modelpool.part_digest(ref, part, self.dtype, self.settings.cache)
                     for part in modelpool.SHARED_PARTS}
            start = time.perf_counter()
            donors = {part: donor for part, digest in known.items()
                      if digest and (donor := self.pool.shared(part, digest))}
            pipe = self._load_pipeline(ref, donors, offline)
        except ModelError as err:
            # A file that is not a model of this architecture is not read again until it changes;
            # a lack of memory, an I/O error or the configured model may do better next time.
            if entry.path is not None and err.lasting:
                self._broken[stamp] = err
            raise
        # A part loaded from another file or layout than a warm model's, with the same weights:
        # the warm module replaces it (the copy just loaded is dropped before it reaches the device).
        digests = {part: known[part] or modelpool.part_digest(ref, part, self.dtype, self.settings.cache,
                                                              getattr(pipe, part))
                   for part in modelpool.SHARED_PARTS}
        for part in modelpool.SHARED_PARTS:
            if part not in donors and (donor := self.pool.shared(part, digests[part])) is not None:
                setattr(pipe, part, donor.own_vae if part == "vae" else donor.pipe.text_encoder)
                donors[part] = donor
        pipe = self._on_device(pipe, donors)
        if "text_encoder" in donors:
            text_encoder = donors["text_encoder"].text_encoder
        else:
            # Prompts are encoded in float32 (A1111's rules divide by a mean); a float32
            # copy of the text encoder when the pipeline runs in half precision.
            text_encoder = pipe.text_encoder
            if text_encoder.dtype != torch.float32:
                text_encoder = copy.deepcopy(text_encoder).to(torch.float32)
        fresh = {"unet", *(() if "vae" in donors else ("vae",))}
        perf = speedups.apply(pipe, self.settings, self.device, parts=fresh)
        # LoRAs go into the UNet and this float32 text encoder (the one that encodes).
        lora_layers = adapters.Adapters(pipe, text_encoder, self.settings["loras_cache"], self.settings.cache)
        model = modelpool.WarmModel(key, ref, pipe, text_encoder, lora_layers, digests, pipe.vae, perf, 0.0,
                                    stamp=stamp, shared=tuple(sorted(donors)),
                                    base_scheduler_config=pipe.scheduler.config)
        self._load_embeddings(model)
        if self.settings["perf.compile"] != "off":
            self._warm_up_new(model)
        gone = self.pool.add(model)
        if self.current is not None and self.current.name not in self.pool.warm:
            self.current = None
        if gone:
            self._release()
        model.load_s = time.perf_counter() - start
        if self._started:  # the first load, at start, is the service's to log
            log.info("model loaded", model=self._shown(key), source=ref.kind, seconds=round(model.load_s, 3),
                     shared=list(model.shared), evicted=[self._shown(name) for name in gone],
                     warm=[self._shown(name) for name in self.pool.warm])
        return model

    def _warm_up_new(self, model: modelpool.WarmModel) -> None:
        """Compile a model just loaded before it joins the pool (and before any model
        leaves for it): a warm-up that fails leaves the pool as it was. Its routers are
        sealed by the warm-up, so its jobs never compile on the render's path."""
        previous = self.current
        if previous is not None:
            previous.adapters.use([])  # a text encoder they share encodes the warm-up without its LoRAs
        self.pool.warm[model.name] = model  # reachable by the warm-up's renders; nothing leaves yet
        self.current = model
        failed = True
        try:
            self.warm_up(model.name)
            failed = False
        except (SbrenderError, RuntimeError) as err:
            raise ModelError(f"cannot compile model {self._shown(model.name)}: {first_line(err)}",
                             hint="perf.compile warms every model up at its load; lower perf.batch_size or "
                                  "models.keep_loaded if the device runs out of memory", lasting=False) from err
        finally:
            del self.pool.warm[model.name]  # joins for good in pool.add, which makes room for it
            self.current = previous
            if failed:
                model.adapters.use([])
                self._release()

    def _release(self) -> None:
        """Give the memory of models that left back to the device."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _load_pipeline(self, ref: models.ModelRef, donors: dict[str, modelpool.WarmModel], offline: bool) -> Any:
        """The pipeline read from its files (on the CPU), the donors' parts given. Raises ``ModelError``."""
        given = {part: donor.own_vae if part == "vae" else donor.pipe.text_encoder for part, donor in donors.items()}
        pipe = models.load_pipeline(ref, dtype=self.dtype, offline=offline,
                                    safety_checker=self.settings["safety_checker"], components=given)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _on_device(self, pipe: Any, donors: dict[str, modelpool.WarmModel]) -> Any:
        """The pipeline on the device. Out of device memory: warm models leave, least
        recently used first (not the ones it shares parts with), one at a time until it
        fits; a ``ModelError`` when none is left to go. On the CPU, the weights are
        copied out of the files they were read from (safetensors maps them: a file
        truncated under a running daemon would kill it with SIGBUS)."""
        while True:
            try:
                pipe = pipe.to(self.device)
                break
            except torch.cuda.OutOfMemoryError as err:
                keep = {donor.name for donor in donors.values()}
                victim = next((name for name in self.pool.warm if name not in keep), None)
                if victim is None:
                    pipe.to("cpu")
                    self._release()
                    raise ModelError(f"not enough device memory to load this model ({first_line(err)})",
                                     hint="lower models.keep_loaded, or use a smaller dtype") from None
                self.pool.drop(victim)
                log.warning("out of device memory loading a model; a warm model left",
                            evicted=self._shown(victim))
                if self.current is not None and self.current.name == victim:
                    self.current = None
                self._release()
        if self.device == "cpu":
            for part in ("unet", "vae", "text_encoder"):
                if part not in donors:
                    with torch.no_grad():
                        for tensor in (*getattr(pipe, part).parameters(), *getattr(pipe, part).buffers()):
                            tensor.data = tensor.data.clone()
        return pipe

    def _load_embeddings(self, model: modelpool.WarmModel) -> None:
        """The embeddings folder: vectors of the text encoder's width, on its device,
        and their names as the tokenizer splits them. Read when a model loads, and
        again before a render when a file there was added, removed or changed (as A1111 does)."""
        model.embeddings_stamp = embeddings.stamp(self.settings.embeddings_dir)
        width = int(model.text_encoder.config.hidden_size)
        catalog = embeddings.load(self.settings.embeddings_dir, self.settings.cache, width)
        for entry in catalog.files:
            if not entry.usable:  # not used; the log says which file and why
                log.warning("embedding skipped", file=entry.path, reason=entry.problem)
        if catalog.vectors:
            log.info("embeddings loaded", folder=str(self.settings.embeddings_dir), names=list(catalog.vectors),
                     model=model.name or self.settings.model)
        device = next(model.text_encoder.parameters()).device
        model.embeddings = embeddings.Catalog(catalog.files, {n: v.to(device) for n, v in catalog.vectors.items()})
        model.embedding_names = conditioning.EmbeddingNames(model.pipe.tokenizer, model.embeddings.counts())

    def warm_up(self, model: str = "") -> None:
        """Render throw-away images at the default size, once per compiled batch
        size (``speedups.warm_up_counts``), so compiling happens before the daemon
        says it is ready (or before a model loaded later renders its job); then
        only those shapes run compiled."""
        from .jobs import Job

        d = self.settings.section("defaults")
        started, before = time.perf_counter(), speedups.warm_up_started()
        # Each batch size at the default CFG (two UNet rows per image), and one image at CFG 1
        # (one row: LCM and turbo jobs), so that any number of rows splits into compiled ones.
        counts = [(count, d["guidance_scale"]) for count in speedups.warm_up_counts(self.settings)]
        if d["guidance_scale"] > 1:
            counts.append((1, 1.0))
        for count, cfg in counts:
            job = Job(id="warm-up", prompt="warm-up", negative_prompt="", steps=2, guidance_scale=cfg,
                      width=d["width"], height=d["height"], seed=None, count=count, sampler=d["sampler"], priority=0,
                      scheduler=d["scheduler"], model=model, vae=checkpoints.NONE)
            self.render(job, list(range(count)))
        self.perf.update(speedups.warmed_up(self.pipe, self.settings, self.device, before, started))

    def describe(self) -> dict[str, Any]:
        """The configured model (jobs' own are in their results), device, dtype, versions."""
        default = self.pool.warm.get("") or self.current
        assert default is not None, "load() first"
        return {"model": default.ref.to_dict(), "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "perf": dict(default.perf),
                "versions": library_versions()}

    def _use_sampler(self, name: str, schedule: str) -> dict[str, Any]:
        row = samplers.resolve(name, schedule)
        model = self.model
        # From the model's own scheduler config, never the current one: building from it
        # would carry a previous row's options over ("DPM++ 2M" after "... Karras").
        if row.key not in model.schedulers:
            import diffusers

            cls = getattr(diffusers, row.scheduler)
            model.schedulers[row.key] = cls.from_config(model.base_scheduler_config, **row.options)
        self.pipe.scheduler = model.schedulers[row.key]
        return {"name": row.name, "schedule": row.schedule, "class": row.scheduler, "options": row.options}

    def _use_vae(self, job: Job) -> dict[str, Any]:
        """Put the job's VAE in the pipeline; its record (name, hash) when it is a
        file, {} for the model's own. Raises ``JobError``, ``ModelError``."""
        model = self.model
        entry = self._vae_entry(model, job.vae)
        vae = model.own_vae if entry is None else self._vae_module(model, entry)
        if self.pipe.vae is not vae:
            self.pipe.vae = vae
        if entry is None or entry.path is None:
            return {}
        sha256 = self._file_sha256(entry.path)
        return {"name": entry.path.name, "hash": sha256[:10], "sha256": sha256}

    def _file_sha256(self, path: Path) -> str:
        """A VAE file's sha256 by its path, size and time, kept here: asked at every
        job that uses it (the cache file holds it across restarts, but reading it is
        not free)."""
        stamp = _stamp(path)
        if stamp not in self._sha256s:
            self._sha256s[stamp] = models.file_sha256(path, self.settings.cache)
        return self._sha256s[stamp]

    def _vae_entry(self, model: modelpool.WarmModel, choice: str) -> checkpoints.Entry | None:
        if choice == checkpoints.NONE:
            return None
        if choice == checkpoints.AUTOMATIC:
            entry = checkpoints.automatic(model.ref, self.vaes)
            if entry is not None and entry.problem:
                raise JobError(f"VAE {entry.file} (vae Automatic, for model {model.name or self.settings.model}) "
                               f"cannot be used: it {entry.problem}", field="vae",
                               hint="replace or remove the file, or give the job vae: None")
            return entry
        return self.vaes.lookup(choice, "vae")

    def _vae_module(self, model: modelpool.WarmModel, entry: checkpoints.Entry) -> Any:
        """A VAE file loaded with the model's VAE config, once per file and config."""
        assert entry.path is not None
        if model.vae_config_key is None:
            config = json.dumps({k: v for k, v in model.own_vae.config.items() if not k.startswith("_")},
                                sort_keys=True, default=str)
            model.vae_config_key = hashlib.sha256(config.encode()).hexdigest()
        key = f"{self._file_sha256(entry.path)}:{model.vae_config_key}"
        vae = self.pool.vae(key)
        if vae is not None:
            return vae
        from diffusers import AutoencoderKL

        root = model.ref.config if model.ref.kind == "checkpoint" else model.ref.location
        start = time.perf_counter()
        try:
            vae = AutoencoderKL.from_single_file(str(entry.path), config=root, subfolder="vae", local_files_only=True,
                                                 torch_dtype=self.dtype)
        except Exception as err:  # noqa: BLE001 - any library error on a bad file fails this job only
            raise ModelError(f"cannot load VAE {entry.name} ({entry.path}) for model "
                             f"{model.name or self.settings.model}: {first_line(err)}",
                             hint="a VAE file must be an SD1.x VAE (A1111's models/VAE); other jobs are not affected"
                             ) from None
        vae = vae.to(self.device)
        speedups.apply(types.SimpleNamespace(vae=vae), self.settings, self.device, parts={"vae"})
        self.pool.add_vae(key, vae)
        log.info("vae loaded", vae=entry.name, file=str(entry.path), seconds=round(time.perf_counter() - start, 3))
        return vae

    def _use_vae_tiling(self, width: int, height: int) -> None:
        wanted = speedups.vae_tiling_wanted(self.settings["perf.vae_tiling"], width, height)
        vae = self.pipe.vae
        if wanted != bool(getattr(vae, "use_tiling", False)):
            vae.enable_tiling() if wanted else vae.disable_tiling()

    batch_key = staticmethod(call_key)

    def render(self, job: Job, seeds: list[int], on_step: StepCallback | None = None) -> RenderOutput:
        return only(self.render_batch([(job, seeds)], on_step))

    def render_batch(self, items: list[tuple[Job, list[int]]],
                     on_step: StepCallback | None = None) -> list[RenderOutput | RenderError]:
        """One pipeline call for jobs that share size, steps, sampler, CFG and clip skip
        (prompts of any length: padded and masked, see ``conditioning``). Each
        image keeps its own seed (one CPU generator per image, so the same seed gives
        the same starting noise on any device and in any batch). Returns per job its
        images, or the error that spoils only that job (NaN images)."""
        job = items[0][0]
        timings: dict[str, float] = {}
        start = time.perf_counter()
        loaded_s = self._use_model(job.model)  # model and VAE are one per call: they are in the batch key
        vae = self._use_vae(job)
        model = {**self.model.ref.to_dict(), **({"vae": vae} if vae else {}),
                 **({"loaded_s": round(loaded_s, 3)} if loaded_s else {})}
        scheduler = self._use_sampler(job.sampler, job.scheduler)
        self._use_vae_tiling(job.width, job.height)
        counts = [len(seeds) for _, seeds in items]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seeds in items for seed in seeds]
        used = self._use_loras(job)  # one set per call: it is part of the batch key; before encoding
        try:
            with torch.inference_mode():
                schedule, facts = self._conditioning(items)
        except ValueError as err:
            raise RenderError(f"cannot encode the prompt: {first_line(err)}") from err
        if used:
            facts = [{**fact, "loras": used} for fact in facts]
        cond = schedule.at(0)
        pipe, call = self._call_for(items)
        total = call.get("steps_run", job.steps)
        fault = next((f for j, _ in items if (f := self.faults.get(j.id)) is not None), None)
        stopped = False

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal stopped, cond
            if fault is not None:
                kwargs = faults.inject(fault, kwargs)
            if schedule.changes and (following := schedule.at(step + 1)) is not cond:
                # Prompt editing: the next call's embeddings, as the pipeline holds them ([uncond; cond] with CFG).
                cond = following
                both = torch.cat([cond.uncond, cond.cond]) if pipe.do_classifier_free_guidance else cond.cond
                kwargs["prompt_embeds"] = both.to(self.dtype)
            if on_step is not None and on_step(step + 1, total):
                stopped = True
                pipe._interrupt = True
            return kwargs

        timings["prepare_s"] = time.perf_counter() - start
        start = time.perf_counter()
        timings["inference_started"] = time.time()
        try:
            with torch.inference_mode(), conditioning.MaskedUnet(self.pipe.unet, cond):
                result = pipe(
                    prompt_embeds=cond.cond.to(self.dtype), negative_prompt_embeds=cond.uncond.to(self.dtype),
                    num_inference_steps=job.steps, guidance_scale=job.guidance_scale, num_images_per_prompt=1,
                    generator=generators, callback_on_step_end=step_end, output_type="np", **call["kwargs"])
        except torch.cuda.OutOfMemoryError as err:
            self._free_memory()
            raise RenderError(f"out of GPU memory rendering {sum(counts)} image(s) of {job.width}x{job.height} "
                              f"({first_line(err)})",
                              hint="use a smaller width/height or count (or perf.batch_size); the daemon goes on"
                              ) from err
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise RenderError(f"the pipeline failed: {type(err).__name__}: {first_line(err)}") from err
        if stopped:
            raise ShutdownRequested()
        timings["inference_finished"] = time.time()
        timings["inference_s"] = time.perf_counter() - start
        arrays = np.asarray(result.images)
        nsfw = list(getattr(result, "nsfw_content_detected", None) or [False] * len(arrays))
        outputs: list[RenderOutput | RenderError] = []
        first = 0
        for (job, seeds), fact in zip(items, facts):
            part = slice(first, first + len(seeds))
            first += len(seeds)
            output = self._check(arrays[part], nsfw[part], seeds, scheduler, timings, fact)
            if isinstance(output, RenderOutput):
                output.warnings.extend(prompts.notes(job.prompt, job.negative_prompt) + self._skipped_notes(job))
                output.model.update(model)
            outputs.append(output)
        return outputs

    def _call_for(self, items: list[tuple[Job, list[int]]]) -> tuple[Any, dict[str, Any]]:
        """The pipeline for the call and what it takes besides the prompts: the size
        for txt2img; for img2img (the jobs share its strength: it is in the batch
        key) the pipeline over the same modules, each image's init image prepared
        as A1111 does, and the strength that makes diffusers run A1111's steps."""
        job = items[0][0]
        if job.init_image is None or job.denoising_strength is None:
            return self.pipe, {"kwargs": {"width": job.width, "height": job.height}}
        plan = initimage.a1111_steps(job.steps, job.denoising_strength)
        images = [initimage.prepare(j.init_image, j.width, j.height, j.resize_mode or 0)
                  for j, seeds in items if j.init_image is not None for _ in seeds]
        return self._img2img(), {"steps_run": plan.steps_run, "kwargs": {"image": images, "strength": plan.strength}}

    def _img2img(self) -> Any:
        """The model's img2img pipeline: built once over the txt2img pipeline's very
        modules (no second UNet, the same dtype: not ``from_pipe``, which upcasts
        shared half-precision modules), given its current sampler, VAE and UNet."""
        model = self.model
        if model.img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            model.img2img = StableDiffusionImg2ImgPipeline(**model.pipe.components)
            model.img2img.set_progress_bar_config(disable=True)
        for part in ("scheduler", "vae", "unet"):  # swapped per job (or compiled) on the txt2img pipeline
            if getattr(model.img2img, part) is not getattr(model.pipe, part):
                setattr(model.img2img, part, getattr(model.pipe, part))
        return model.img2img

    def _use_loras(self, job: Job) -> list[dict[str, Any]]:
        """Make the job's LoRA set the active one (none: adapters off); per LoRA its
        record for the result. Raises ``JobError`` for a name no file has, ``RenderError``."""
        assert self._adapters is not None, "load() first"
        uses = job.lora_set
        if uses and self.settings["perf.fuse_qkv"]:
            raise RenderError("LoRAs cannot be used with perf.fuse_qkv: the fused q/k/v projections would "
                              "bypass the LoRA's layers", hint="set perf.fuse_qkv: false to render LoRAs")
        if uses:
            try:
                if self._loras is None:
                    raise JobError("loras_dir not scanned yet")
                loras.requested(job.prompt, job.loras, self._loras)
                if not all(self._loras.lookup(u.name).path.exists() for u in uses):
                    raise JobError("a LoRA file is gone")
            except JobError:
                # loras_dir as it is now (files added, removed or renamed since), once.
                self._loras = loras.scan(self.settings.loras_dir)
                loras.requested(job.prompt, job.loras, self._loras)  # its error is the job's
        catalog = self._loras
        return self._adapters.use([(catalog.lookup(u.name), u) for u in uses] if catalog is not None else [])

    def _conditioning(self, items: list[tuple[Job, list[int]]]
                      ) -> tuple[conditioning.CallSchedule, list[dict[str, Any]]]:
        """Per image its job's prompt and negative embeddings (A1111's rules) over
        the denoiser's calls (prompt editing and alternation change them between
        calls), and per job how many chunks each took and which textual-inversion
        embeddings it used (the prompt's, then the negative's: A1111's TI hashes
        order). Raises ``ValueError``."""
        model = self.model
        if embeddings.stamp(self.settings.embeddings_dir) != model.embeddings_stamp:
            self._load_embeddings(model)
        first = items[0][0]  # clip skip, sampler and steps are one per call: they are in the batch key
        clip_skip = first.clip_skip
        # A1111 counts a second-order sampler's steps twice: its denoiser runs twice per step.
        calls = first.steps * (2 if samplers.resolve(first.sampler, first.scheduler).sampler.second_order else 1)
        # The text encoder's weights, not the model: models that share one share their prompts' encodings.
        encoder_state = (clip_skip, model.embeddings_stamp, model.parts["text_encoder"], self._text_encoder_loras())

        def encode(text: str, positive: bool) -> tuple[conditioning.Scheduled, list[str]]:
            # Extra-network tags leave the positive prompt before it is scheduled, as in A1111.
            plain = prompts.extract_networks(text)[0] if positive else text
            entries = editing.schedule(plain, calls)
            variants = [conditioning.chunks(prompts.parse(variant, False), self.pipe.tokenizer,
                                            embeddings=model.embedding_names) for _, variant in entries]
            embeds = conditioning.encode_variants(self._text_encoder, variants, clip_skip, self.catalog.vectors)
            used = conditioning.used([chunk for chunks in variants for chunk in chunks])
            return conditioning.Scheduled(tuple(end for end, _ in entries), embeds), used

        def embed(text: str, positive: bool) -> tuple[conditioning.Scheduled, list[str]]:
            # A schedule's step count only matters to a prompt that has one.
            steps = calls if "[" in text and editing.is_scheduled(text) else 0
            return self._prompts.get((text, positive, steps, encoder_state), lambda: encode(text, positive))

        conds, unconds, facts = [], [], []
        for job, seeds in items:
            (cond, cond_used), (uncond, uncond_used) = embed(job.prompt, True), embed(job.negative_prompt, False)
            conds += [cond] * len(seeds)
            unconds += [uncond] * len(seeds)
            fact: dict[str, Any] = {"chunks": cond.embeds.shape[1] // 77,
                                    "negative_chunks": uncond.embeds.shape[1] // 77}
            if len(cond.ends) > 1 or len(uncond.ends) > 1:
                fact["schedule"] = {"prompt": len(cond.ends), "negative_prompt": len(uncond.ends)}
            used = ([self.catalog.record(name, "prompt") for name in cond_used]
                    + [self.catalog.record(name, "negative_prompt") for name in uncond_used])
            if used:
                fact["embeddings"] = used
            facts.append(fact)
        return conditioning.CallSchedule(conds, unconds, embed("", False)[0].embeds), facts

    def _skipped_notes(self, job: Job) -> list[str]:
        """A word of the prompts that names an embeddings file the daemon skipped is
        drawn as text, as in A1111; the result says so, and why the file was skipped."""
        usable = self.catalog.usable()
        notes = []
        for entry in self.catalog.files:
            if entry.usable or entry.name.lower() in (name.lower() for name in usable):
                continue
            word = re.compile(rf"(?<![\w]){re.escape(entry.name)}(?![\w])", re.IGNORECASE)
            for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
                if word.search(text):
                    notes.append(f"{field}: {entry.name} is drawn as text: its embedding file {entry.path} was "
                                 f"skipped ({entry.problem})")
        return notes

    def _text_encoder_loras(self) -> tuple[Any, ...]:
        """The LoRAs active in the text encoder, with their weights: part of a cached prompt's key."""
        return self._adapters.text_encoder_state() if self._adapters is not None else ()

    def _check(self, arrays: np.ndarray, nsfw: list[bool], seeds: list[int], scheduler: dict[str, Any],
               timings: dict[str, float], prompt: dict[str, Any]) -> RenderOutput | RenderError:
        broken = [k + 1 for k in range(len(arrays)) if not np.isfinite(arrays[k]).all()]
        if broken:
            if self.dtype == torch.float16:
                hint = "float16 overflow is the usual cause: try dtype bfloat16 or float32"
            else:
                hint = (f"in {str(self.dtype).removeprefix('torch.')} this comes from the model or a LoRA's "
                        "weights (NaN or inf in the file), or emphasis on a text encoder whose outputs average 0")
            if prompt.get("loras"):
                hint += f"; the job used LoRAs {', '.join(str(u['name']) for u in prompt['loras'])}: try without them"
            return RenderError(
                f"the model produced NaN values (image {', '.join(map(str, broken))} of {len(arrays)}); "
                f"nothing usable to save", hint=hint)
        black = [k + 1 for k in range(len(arrays)) if float(arrays[k].max()) <= 0.0]
        warnings = [f"image {k} is entirely black" + (" (flagged by the safety checker)" if nsfw[k - 1] else "")
                    for k in black]
        return RenderOutput(self.pipe.numpy_to_pil(arrays), seeds, scheduler, dict(timings), warnings, prompt)

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stamp(path: Path | None) -> tuple[Any, ...]:
    """A model file or folder as it is now: a load that failed is tried again once it changed."""
    return ("default",) if path is None else models.file_stamp(path)
