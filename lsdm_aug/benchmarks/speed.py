"""``lsdm-aug benchmark speed``: where the time goes, measured in one run on this machine.

1. seconds per sample: full-slice generation vs local insertion, DDIM step counts, with and without
   classifier guidance (the model's own slice size);
2. latent vs pixel-space diffusion at equal U-Net width: the same U-Net recipe run on the 1-channel
   slice instead of the f=4 latent (untrained weights: speed does not depend on them);
3. the transforms' cost per sample in each mode inside a MONAI DataLoader loop, ``synthesize`` cases
   per minute, pixels changed (:mod:`lsdm_aug.benchmarks.transform_cost`);
4. the achieved fraction of the machine's measured matmul FLOP/s: U-Net FLOPs per DDIM step (PyTorch's
   ``FlopCounterMode``) over the measured step time, against a large float32 matmul's FLOP/s.

Ratios come from one run, so machine load affects both sides alike.

Example:
    >>> report = run_speed(SpeedSettings(model="default", out="reports/speed"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lsdm_aug.benchmarks import transform_cost
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig, phantom_case
from lsdm_aug.data.prepared import atomic_write_text
from lsdm_aug.models.unet import SemanticCondition, build_unet, predict_noise, semantic_onehot, semantic_to_unit
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.sampling.sampler import sample_latents
from lsdm_aug.sampling.schedulers import build_scheduler

__all__ = ["SpeedSettings", "run_speed", "speed_markdown"]


@dataclass
class SpeedSettings:
    """What to measure. ``repeats``: samples per timing; ``steps``: DDIM step counts compared;
    ``transform_steps``: DDIM steps of the transforms, the bank and ``synthesize``.

    Example:
        >>> SpeedSettings(model="models/phantom-128", steps=(10, 50)).validate()
    """

    model: str = "default"
    out: str = "reports/speed"
    repeats: int = 4
    steps: tuple[int, ...] = (10, 25, 50)
    transform_samples: int = 24
    transform_steps: int = 25
    batch_size: int = 8
    bank_size: int = 40
    synth_count: int = 24
    seed: int = 0

    def validate(self) -> None:
        if self.repeats < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError(f"repeats and steps must be >= 1, got {self.repeats} and {self.steps}")


def _timed(function, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def _slices(pipe: LSDMPipeline, count: int, seed: int) -> list:
    phantom = ChestPhantom(PhantomConfig(size=pipe.recipe.image_size, nodule_free_fraction=0.0))
    cases = [phantom_case(phantom, index, seed) for index in range(count * 3)]
    return [c for c in cases if c.nodule_mask.any()][:count]


def generation_and_insertion(pipe: LSDMPipeline, settings: SpeedSettings) -> list[dict]:
    """Seconds per sample for generation and insertion at each DDIM step count, guided or not."""
    case = _slices(pipe, 1, settings.seed)[0]
    lung = np.argwhere(case.semantic_map == 4)
    centre = tuple(lung[len(lung) // 2])
    outline = np.zeros((5, 5), bool)
    outline[1:4, 1:4] = True
    rows = []
    for steps in settings.steps:
        for scale in (0.0, 1.0):
            features = {"malignancy": 5.0, "texture": 5.0} if scale else {}
            generate = _timed(lambda: pipe.generate(case.semantic_map, features, steps=steps, guidance_scale=scale,
                                                      spacing_mm=case.spacing_mm),
                              settings.repeats)
            insert = _timed(lambda: pipe.insert(case.image, case.semantic_map, outline, centre, features, steps=steps,
                                                guidance_scale=scale, spacing_mm=case.spacing_mm), settings.repeats)
            rows.append({"steps": steps, "guided": bool(scale), "generate_s": generate, "insert_s": insert})
    return rows


def _condition(maps: torch.Tensor, pixel: bool, pipe: LSDMPipeline) -> SemanticCondition:
    if pixel:
        return SemanticCondition(semantic_to_unit(maps), semantic_onehot(maps))
    return pipe.condition(maps)


def latent_vs_pixel(pipe: LSDMPipeline, settings: SpeedSettings) -> dict:
    """One DDIM run (the middle step count) of the LSDM U-Net on the latent and on the slice itself, over the
    edit window (:attr:`LSDMPipeline.window_px`, the U-Net's training window; the central crop of a slice): at
    512 px the pixel-space U-Net's attention over a whole slice alone would take minutes per step."""
    steps = sorted(settings.steps)[len(settings.steps) // 2]
    case = _slices(pipe, 1, settings.seed)[0]
    size, factor = min(pipe.window_px, pipe.recipe.image_size), pipe.factor
    top = (case.semantic_map.shape[0] - size) // 2
    left = (case.semantic_map.shape[1] - size) // 2
    maps = torch.as_tensor(case.semantic_map[top:top + size, left:left + size])[None, None].long()
    pixel_unet = build_unet(pipe.recipe.diffusion, 1).eval()
    result = {"steps": steps, "window_px": size}
    for name, unet, shape in (("latent", pipe.unet.cpu(), (1, pipe.recipe.autoencoder.latent_channels,
                                                             size // factor, size // factor)),
                              ("pixel", pixel_unet, (1, 1, size, size))):
        condition = _condition(maps, name == "pixel", pipe)
        scheduler = build_scheduler(pipe.recipe.diffusion, "ddim", steps)
        run = lambda: sample_latents(unet, scheduler, condition, shape=shape,  # noqa: E731
                                     generator=torch.Generator().manual_seed(0))
        seconds = _timed(run, max(1, settings.repeats // 2))
        noisy = torch.randn(shape)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            predict_noise(unet, noisy, torch.tensor([500]), condition)
        result[name] = {"seconds_per_sample": seconds, "flops_per_step": int(counter.get_total_flops()),
                        "parameters": sum(p.numel() for p in unet.parameters())}
    pipe.unet.to(pipe.device)
    result["pixel_over_latent"] = result["pixel"]["seconds_per_sample"] / result["latent"]["seconds_per_sample"]
    return result


def matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square float32 matmul on the CPU (the machine's practical peak for dense work)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = _timed(lambda: torch.mm(a, b), repeats)
    return 2 * size ** 3 / seconds


def run_speed(settings: SpeedSettings) -> dict:
    """Measure everything above and write ``speed.md`` / ``speed.json`` into ``settings.out``."""
    settings.validate()
    pipe = LSDMPipeline.from_pretrained(settings.model, device="cpu")
    report = {"settings": asdict(settings),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()},
              "model": pipe.model_id, "image_size": pipe.recipe.image_size}
    report["generation_and_insertion"] = generation_and_insertion(pipe, settings)
    report["latent_vs_pixel"] = latent_vs_pixel(pipe, settings)
    peak = matmul_flops()
    latent = report["latent_vs_pixel"]["latent"]
    step_seconds = latent["seconds_per_sample"] / report["latent_vs_pixel"]["steps"]
    report["flops"] = {"matmul_flops_per_s": peak, "unet_flops_per_s": latent["flops_per_step"] / step_seconds,
                       "fraction_of_matmul": latent["flops_per_step"] / step_seconds / peak}
    report["transforms"] = transform_cost.transform_cost(
        settings.model, settings.transform_samples, settings.transform_steps, settings.batch_size, settings.bank_size,
        settings.synth_count, settings.seed, size=pipe.recipe.image_size)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.json", json.dumps(report, indent=1))
    atomic_write_text(out / "speed.md", speed_markdown(report))
    return report


def speed_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    command = (f"lsdm-aug benchmark speed --model {s['model']} --out {s['out']} --repeats {s['repeats']} --steps "
               f"{','.join(str(n) for n in s['steps'])} --transform-samples {s['transform_samples']} --batch-size "
               f"{s['batch_size']} --bank-size {s['bank_size']} --synth-count {s['synth_count']}")
    lines = ["# Speed", "", f"Command: `{command}`", "",
             f"Machine: {m['cpus']} CPUs ({m['processor']}), torch {m['torch']} with {m['torch_threads']} threads, "
             f"CUDA {m['cuda']}. Model `{report['model']}` at {report['image_size']} px; {s['repeats']} samples per "
             "timing after a warm-up.", "", "## Generation vs local insertion (seconds per sample)", "",
             "| DDIM steps | guidance | full slice | local insertion | ratio |", "| --- | --- | --- | --- | --- |"]
    for r in report["generation_and_insertion"]:
        lines.append(f"| {r['steps']} | {'malignancy + texture' if r['guided'] else 'none'} | {r['generate_s']:.3f} | "
                     f"{r['insert_s']:.3f} | {r['generate_s'] / r['insert_s']:.2f} |")
    lp = report["latent_vs_pixel"]
    lines += ["", f"## Latent vs pixel-space diffusion, same U-Net recipe (DDIM {lp['steps']} steps, "
                  f"{lp.get('window_px', '?')} px window)", "",
              "| space | s / sample | GFLOPs per U-Net step | parameters |", "| --- | --- | --- | --- |"]
    for name in ("latent", "pixel"):
        r = lp[name]
        lines.append(f"| {name} | {r['seconds_per_sample']:.3f} | {r['flops_per_step'] / 1e9:.2f} | {r['parameters']:,} |")
    f = report["flops"]
    lines += ["", f"Pixel space costs {lp['pixel_over_latent']:.1f}x the latent time per sample.", "",
              f"Achieved U-Net throughput: {f['unet_flops_per_s'] / 1e9:.2f} GFLOP/s, "
              f"{100 * f['fraction_of_matmul']:.1f} % of the measured float32 matmul rate "
              f"({f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s).", "", "## Transforms and synthesize", ""]
    lines += transform_cost.transform_cost_markdown(report["transforms"])
    return "\n".join(lines) + "\n"
