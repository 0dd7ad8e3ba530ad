"""What switching models costs: the renderer on a queue alternating between two
warm models against one that stays on a single model, and a cold load against a
render, as ratios measured in one run (rounds alternate: the machine is noisy).

    .venv/bin/python examples/bench/models.py [--rounds 5] [--jobs 12] [--steps 4]

Tiny SD1.5-shaped checkpoints (tiny-random's weights, one with another UNet) are
written to a temp folder; on a GPU box, pass --model-config and --checkpoints to
time real ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def tiny_checkpoints(folder: Path, cache: Path) -> tuple[Path, list[Path]]:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from ldm_checkpoint import ldm_state_dict
    from sbrender import models

    config = models.ensure_builtin(models.BUILTINS["tiny-random"], cache)
    base = ldm_state_dict(StableDiffusionPipeline.from_pretrained(config, local_files_only=True))
    paths = []
    for k, name in enumerate(("first", "second")):
        tensors = {key: (t + 0.01 * k if key.startswith("model.diffusion_model.") else t) for key, t in base.items()}
        save_file(tensors, str(folder / f"{name}.safetensors"))
        paths.append(folder / f"{name}.safetensors")
    return config, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=12, help="jobs per round and queue")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))

    from sbrender.config import load_settings
    from sbrender.jobs import Rules, build_job
    from sbrender.pipeline import DiffusersRenderer

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "models").mkdir()
        config, paths = tiny_checkpoints(root / "models", root / "cache")
        empty = root / "empty.yaml"
        empty.write_text("")
        settings = load_settings(empty, env={}, overrides={
            "model": str(paths[0]), "model_config": str(config), "cache": str(root / "cache"), "offline": True,
            "device": args.device, "models_dir": str(root / "models"), "models.keep_loaded": 2})
        renderer = DiffusersRenderer(settings)
        renderer.load()
        rules = Rules.from_settings(settings)

        def job(model: str, k: int):  # noqa: ANN202
            return build_job(f"j{k}", {"prompt": "a lighthouse", "steps": args.steps, "width": width,
                                       "height": height, "seed": k, "sampler": "Euler", "model": model}, rules)

        def queue(alternate: bool) -> float:
            start = time.perf_counter()
            for k in range(args.jobs):
                renderer.render(job("second" if alternate and k % 2 else "first", k), [k])
            return (time.perf_counter() - start) / args.jobs

        renderer.render(job("second", 0), [0])  # both warm
        same, alternating, cold = [], [], []
        for _ in range(args.rounds):
            for alternate, out in ((False, same), (True, alternating)):
                out.append(queue(alternate))
            renderer.pool.warm.pop("second")  # cold again (the first model stays)
            start = time.perf_counter()
            renderer.render(job("second", 0), [0])
            cold.append(time.perf_counter() - start)
        ratios = [a / s for a, s in zip(alternating, same)]
        print(f"per job, one model: {statistics.median(same) * 1000:.1f} ms; alternating between two warm "
              f"models: {statistics.median(alternating) * 1000:.1f} ms")
        print(f"alternating / one model: median {statistics.median(ratios):.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
        print(f"a job that loads its model cold / a warm job: median "
              f"{statistics.median(cold) / statistics.median(same):.1f}x ({statistics.median(cold) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
