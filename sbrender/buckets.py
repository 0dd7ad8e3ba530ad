"""Compiled code only for the sizes that were warmed up; anything else runs eager.

A compiled method (the UNet's forward, the VAE's decode) is wrapped in a
``Router``. While the daemon warms up, calls go to the compiled code, which
compiles one static graph per batch size (``dynamic=False``), and the router
notes each call's signature: the batch size, and the shapes, dtypes and devices
of the rest. Once ``seal``-ed:

- a call of a warmed-up signature runs compiled; a batch size that was not
  warmed up is split along the batch into warmed-up sizes (largest first), never
  padded: the UNet's and the VAE's rows do not depend on each other;
- a call of any other signature (another image size, a long prompt, an
  attention mask) runs the uncompiled method at once, instead of stalling the
  queue for minutes of compiling, and says so in the log, once per signature;
- a call that would still make torch compile (a guard that fails for another
  reason: a LoRA changed the modules) is stopped by the ``fail_on_recompile``
  stance and runs uncompiled too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
import torch

log = structlog.get_logger("sbrender")

RECOMPILE_MESSAGE = "Detected recompile"  # torch's RuntimeError under the fail_on_recompile stance
Signature = tuple[Any, ...]
# Per method name, the signatures and batch sizes warm-ups compiled in this process.
# Modules of one architecture share compiled graphs (torch guards on shapes, not on
# the module), so a module loaded later (a VAE file) can route by them at once.
WARMED: dict[str, dict[Signature, set[int]]] = {}


def plan(rows: int, sizes: Sequence[int]) -> list[int] | None:
    """``rows`` as a sum of ``sizes``, largest first (5 with 1, 2, 4: [4, 1]);
    None when they cannot make it."""
    parts: list[int] = []
    left = rows
    for size in sorted(set(sizes), reverse=True):
        while left >= size:
            parts.append(size)
            left -= size
    return parts if left == 0 else None


def _rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The batch size: the first tensor argument's first dimension."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _describe(value: Any, rows: int | None) -> Any:
    if isinstance(value, torch.Tensor):
        batched = rows is not None and value.dim() > 0 and value.shape[0] == rows
        shape = tuple(value.shape[1:]) if batched else tuple(value.shape)
        return ("tensor", batched, shape, str(value.dtype), str(value.device))
    if value is None or isinstance(value, (bool, str)):
        return value  # flags such as return_dict: part of the compiled graph
    return type(value).__name__  # numbers (a step's timestep), lists: their values change per call


def signature(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int | None, Signature]:
    """A call's batch size, and everything else a static graph depends on."""
    rows = _rows(args, kwargs)
    described = tuple(_describe(a, rows) for a in args) + tuple(
        (k, _describe(v, rows)) for k, v in sorted(kwargs.items()))
    return rows, described


def _slice(value: Any, rows: int, start: int, size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[start:start + size]
    return value


def _concat(outputs: list[Any]) -> Any:
    """Join per-part outputs along the batch, keeping their type (a tensor, a
    tuple, or a diffusers output dataclass)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, Mapping):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(first)(**{k: _concat([o[k] for o in outputs]) for k in first})
    return first


def _own(output: Any) -> Any:
    """A copy that the next replay of the same CUDA graph cannot overwrite."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_own(o) for o in output)
    if isinstance(output, Mapping):
        return type(output)(**{k: _own(v) for k, v in output.items()})
    return output


class Router:
    """One compiled method and its uncompiled original; see the module's docstring."""

    def __init__(self, name: str, eager: Callable[..., Any], compiled: Callable[..., Any],
                 prepare: Prepare | None = None) -> None:
        self.name = name
        self.eager = eager
        self.compiled = compiled
        self.prepare = prepare  # puts a call's arguments in one form before its signature is taken
        self.sizes: dict[Signature, set[int]] = {}
        self.sealed = False
        self.calls: Counter[str] = Counter()  # compiled, split, eager
        self._noted: set[Any] = set()

    def seal(self) -> dict[str, list[int]]:
        """End of the warm-up: from now on only warmed-up signatures run compiled.
        Returns the batch sizes warmed up."""
        self.sealed = True
        for sig, sizes in self.sizes.items():
            WARMED.setdefault(self.name, {}).setdefault(sig, set()).update(sizes)
        return {self.name: sorted({size for sizes in self.sizes.values() for size in sizes})}

    def adopt(self) -> None:
        """For a module loaded with no warm-up of its own: route by what earlier
        warm-ups compiled (a graph that does not fit it is caught as a recompile)."""
        for sig, sizes in WARMED.get(self.name, {}).items():
            self.sizes.setdefault(sig, set()).update(sizes)
        self.sealed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.prepare is not None:
            args, kwargs = self.prepare(args, kwargs)
        rows, sig = signature(args, kwargs)
        if not self.sealed:
            if rows is not None:
                self.sizes.setdefault(sig, set()).add(rows)
            return self.compiled(*args, **kwargs)
        sizes = self.sizes.get(sig)
        parts = plan(rows, sorted(sizes)) if rows is not None and sizes else None
        if parts is None:
            self._note(("shape", sig), "not warmed up: runs uncompiled", rows=rows,
                       warmed_up=sorted(sizes) if sizes else [])
            self.calls["eager"] += 1
            return self.eager(*args, **kwargs)
        if len(parts) == 1:
            output, compiled = self._compiled(args, kwargs)
            self.calls["compiled" if compiled else "eager"] += 1
            return output
        outputs, start, all_compiled = [], 0, True
        for size in parts:
            part_args = [_slice(a, rows, start, size) for a in args]
            part_kwargs = {k: _slice(v, rows, start, size) for k, v in kwargs.items()}
            output, compiled = self._compiled(part_args, part_kwargs)
            outputs.append(_own(output))
            all_compiled = all_compiled and compiled
            start += size
        self.calls["split" if all_compiled else "eager"] += 1
        return _concat(outputs)

    def _compiled(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, bool]:
        """The compiled method's output, or the uncompiled one's where torch would
        have to compile; and whether it was the compiled one."""
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.compiled(*args, **kwargs), True
        except RuntimeError as err:
            if RECOMPILE_MESSAGE not in str(err):
                raise
            reason = str(err).split("guard failure(s):", 1)[-1].strip().splitlines()
            self._note(("guard", tuple(reason[:2])), "would compile again: runs uncompiled",
                       reason=" ".join(line.strip("- ") for line in reason[:2]))
            return self.eager(*args, **kwargs), False

    def _note(self, key: Any, message: str, **facts: Any) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.warning(f"compiled {self.name}: {message}", **facts)


def float_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The UNet's timestep (its second argument) as a float32 tensor: samplers give
    it as int64 (DPM++), float32 (Euler, Karras sigmas) or a number, and each form
    would need its own graph. The same values: the UNet's timestep embedding takes
    ``timesteps.float()`` first."""
    if "timestep" in kwargs:
        value, where = kwargs["timestep"], "kwargs"
    elif len(args) > 1:
        value, where = args[1], "args"
    else:
        return args, kwargs
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return args, kwargs
    sample = args[0] if args else kwargs.get("sample")
    device = sample.device if isinstance(sample, torch.Tensor) else None
    value = torch.as_tensor(value, device=device).to(torch.float32)
    if where == "kwargs":
        return args, {**kwargs, "timestep": value}
    return (args[0], value, *args[2:]), kwargs


Prepare = Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


def install(owner: Any, attribute: str, name: str, compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]],
            prepare: Prepare | None = None) -> Router:
    """Replace ``owner.<attribute>`` (a bound method) by a router over it and its
    compiled form. The module itself stays what it was: LoRAs, diffusers and
    ``MaskedUnet`` see the real UNet."""
    eager = getattr(owner, attribute)
    router = Router(name, eager, compile_fn(eager), prepare)
    setattr(owner, attribute, router)
    return router


def routers(*owners: Any) -> list[Router]:
    """The routers installed on ``owners`` (UNet, VAE)."""
    return [value for owner in owners for value in vars(owner).values() if isinstance(value, Router)]
