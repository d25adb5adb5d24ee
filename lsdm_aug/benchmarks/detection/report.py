"""The detection benchmark's report: Markdown tables (headline figures, per-malignancy sensitivity, paired
differences with their bootstrap intervals, the scarce-data curve, where the time went) and the FROC and
scarce-data PNG plots.

Example:
    >>> _window_words(None), _window_words((-1024, 800))
    ("nnU-Net's foreground 0.5 / 99.5 percentiles", '[-1024, 800] HU')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lsdm_aug.benchmarks.detection.recipe import NNUNET_DEFAULTS
from lsdm_aug.benchmarks.detection.runs import CONFIGURATION
from lsdm_aug.benchmarks.detection.scoring import SIZE_GROUPS_MM
from lsdm_aug.data.prepared import atomic_write_figure
from lsdm_aug.metrics.detection import LUNA16_FP_RATES

__all__ = ["detection_markdown", "save_froc_png", "save_curve_png"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_froc_png(report: dict[str, Any], path: Path) -> None:
    """FROC per arm: the mean sensitivity over seeds at each false-positive rate (log axis), a band of ± one
    std over seeds, and the LUNA16 rates marked."""
    plt = _pyplot()
    grid = np.geomspace(1 / 16, 16, 60)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, result in report["arms"].items():
        curves = np.array([np.interp(grid, r["froc"]["fps_per_slice"], r["froc"]["sensitivity"])
                           for r in result["runs"]])
        mean, std = curves.mean(0), curves.std(0)
        axes.plot(grid, mean, label=f"{arm} (CPM {result['summary']['cpm']['mean']:.2f})")
        axes.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
    for rate in LUNA16_FP_RATES:
        axes.axvline(rate, color="0.85", lw=0.6, zorder=0)
    axes.set(xscale="log", xlabel="false positives per slice", ylabel="sensitivity", ylim=(0, 1),
             title=f"FROC on {report['test_patients']} test patients, mean ± std over {len(report['recipe']['seeds'])} seeds")
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    atomic_write_figure(path, figure, dpi=110)
    plt.close(figure)


def save_curve_png(report: dict[str, Any], path: Path) -> None:
    """CPM against the number of real training patients, one line per curve arm (± std over seeds)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for arm in dict.fromkeys(p["arm"] for p in report["curve"]):
        points = sorted((p for p in report["curve"] if p["arm"] == arm), key=lambda p: p["train_patients"])
        axes.errorbar([p["train_patients"] for p in points], [p["cpm"]["mean"] for p in points],
                      yerr=[p["cpm"]["std"] for p in points], marker="o", capsize=3, label=arm)
    axes.set(xlabel="real training patients", ylabel="CPM", ylim=(0, 1), title="Scarce real data")
    axes.set_xticks(sorted({p["train_patients"] for p in report["curve"]}))
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write_figure(path, figure, dpi=110)
    plt.close(figure)


def _spread(value: dict[str, float], digits: int = 3) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _setup_lines(report: dict[str, Any]) -> list[str]:
    r = report["recipe"]
    batch = r["batch_size"] or f"{report.get('planned_batch_size', '?')} (as nnU-Net planned it for the real set)"
    patch = f"patch {r['patch_size'][0]} x {r['patch_size'][1]} px" if r.get("patch_size") else "nnU-Net's planned patch"
    return [f"Command: `lsdm-aug benchmark detection --recipe {r['name']}`", "",
            f"Real data: {'phantom' if r['prepared'] is None else r['prepared']}, {r['train_patients']} training "
            f"patients and {report.get('test_patients', r['test_patients'])} held-out test patients x "
            f"{r['slices_per_patient']} slices ({r['nodule_free_fraction']:.0%} drawn nodule-free), {r['image_size']} px "
            f"at the patients' own pixel spacing. Synthetic arms: {r['synthetic_count']} cases (model `{r['model']}`"
            f"{' = ' + report['lsdm_model'] if report.get('lsdm_model') else ''}, "
            f"malignancy balanced, on the real training slices as backgrounds). {_slab_words(r)}nnU-Net 2D, configuration "
            f"`{CONFIGURATION}` = nnU-Net's 2d plan reduced to {patch} (stages as nnU-Net's planner gives that patch), "
            f"features per stage {list(r['features_per_stage'] or ()) or 'as planned'} and batch size {batch} in every arm; CT "
            f"clipped to {_window_words(r.get('ct_window'))}; {_training_words(r)}; {r['num_epochs']} epochs x "
            f"{r['iterations_per_epoch']} iterations; seeds {list(r['seeds'])}; nnU-Net's sliding-window predictor on whole test slices ("
            f"{_tile_words(r)}step {r.get('tile_step_size', 0.5)}, mirroring {'on' if r['test_time_mirroring'] else 'off'}). "
            "Mean ± std "
            "over seeds.", "", _candidates_sentence(r)]


def _tile_words(r: dict[str, Any]) -> str:
    """The prediction tile when the recipe sets one larger than the training patch."""
    return f"{r['tile_size']} px tiles, " if r.get("tile_size") else "tiles of the training patch, "


def _training_words(r: dict[str, Any]) -> str:
    """Optimizer, foreground sampling and the augmentation's scaling, each as the recipe set it or nnU-Net's."""
    optimizer = "AdamW" if r.get("optimizer") == "adamw" else "SGD"
    rate, share, p_scaling, (low, high) = (NNUNET_DEFAULTS[key] if r.get(key) is None else r[key]
                                           for key in ("initial_lr", "oversample_foreground", "p_scaling", "scaling"))
    placed = ("holding a nodule anywhere within a third of the patch from its centre" if r.get("random_crop")
              else "centred on a nodule")
    return (f"nnU-Net's {optimizer} from learning rate {rate:g}, {share:.0%} of patches {placed}, "
            f"scaling augmentation {low:g}-{high:g}x on {p_scaling:.0%} of patches")


def _slab_words(r: dict[str, Any]) -> str:
    """The 2.5D sentence of the set-up (empty for single slices)."""
    if not r.get("neighbour_slices"):
        return ""
    n, thickness = r["neighbour_slices"], r["slice_thickness_mm"]
    return (f"2.5D: every case is a phantom slab whose middle slice is labelled and whose {n} slice(s) on each side, "
            f"{thickness} mm apart, are {2 * n} more nnU-Net input channels (one 3D vessel tree per patient; nodules "
            "centred on the labelled slice; LSDM and copy-paste nodules span the slab's slices too). ")


def _headline_lines(report: dict[str, Any]) -> list[str]:
    rates = [str(float(x)) for x in LUNA16_FP_RATES]
    lines = ["| arm | CPM | sensitivity | FPs / slice | Dice | " + " | ".join(f"sens @ {x}" for x in rates) + " |",
             "| --- " * (5 + len(rates)) + "|"]
    rows = {**report["arms"], **({"chance (random candidates)": report["chance"]} if "chance" in report else {})}
    for arm, result in rows.items():
        s = result["summary"]
        cells = [_spread(s[k]) for k in ("cpm", "sensitivity", "false_positives_per_slice", "dice")]
        cells += [_spread(s["sensitivity_at"][x], 2) for x in rates]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


SIZE_ORDER = (f"< {SIZE_GROUPS_MM[0]:g} mm", f"{SIZE_GROUPS_MM[0]:g}-{SIZE_GROUPS_MM[1]:g} mm",
              f">= {SIZE_GROUPS_MM[1]:g} mm")
BASELINE_CPM = 0.5  # a real-only detector below this learns too little for the benchmark to judge synthetic data


def _baseline_lines(report: dict[str, Any]) -> list[str]:
    """Whether the real-only arm learns enough for the comparison to mean something: CPM >= ``BASELINE_CPM`` and
    some lesion found at the threshold."""
    real = report["arms"].get("real")
    if real is None:
        return []
    cpm, sensitivity = real["summary"]["cpm"]["mean"], real["summary"]["sensitivity"]["mean"]
    verdict = "met" if cpm >= BASELINE_CPM and sensitivity > 0 else \
        "not met, so the arms are compared on a detector that learns little"
    return ["", f"Baseline check: real only reaches CPM {cpm:.3f} and sensitivity {sensitivity:.3f} at p >= "
                f"{report['recipe']['threshold']:g} (needed: CPM >= {BASELINE_CPM} and a lesion found at the "
                f"threshold): {verdict}."]


def _malignancy_lines(report: dict[str, Any]) -> list[str]:
    r, lines = report["recipe"], []
    for key, title in (("sensitivity_by_malignancy", f"at threshold {r['threshold']}"),
                       ("sensitivity_by_malignancy_at_operating_point",
                        f"at the FROC operating point of {r['operating_fps']:g} FPs per slice")):
        lines += ["", f"Sensitivity per malignancy level, {title}:", "",
                  "| arm | " + " | ".join(f"malignancy {m}" for m in range(1, 6)) + " |", "| --- " * 6 + "|"]
        for arm, result in report["arms"].items():
            by = result["summary"][key]
            lines.append(f"| {arm} | " + " | ".join(_spread(by[str(m)], 2) if str(m) in by else "-"
                                                    for m in range(1, 6)) + " |")
    return lines


def _size_lines(report: dict[str, Any]) -> list[str]:
    """Sensitivity per lesion diameter (equivalent circle on the labelled slice) at the FROC operating point."""
    key = "sensitivity_by_size_at_operating_point"
    groups = [g for g in SIZE_ORDER if any(g in result["summary"].get(key, {}) for result in report["arms"].values())]
    if not groups:
        return []
    lines = ["", f"Sensitivity per lesion diameter, at the FROC operating point of {report['recipe']['operating_fps']:g} "
                 "FPs per slice:", "", "| arm | " + " | ".join(groups) + " |", "| --- " * (len(groups) + 1) + "|"]
    for arm, result in report["arms"].items():
        by = result["summary"].get(key, {})
        lines.append(f"| {arm} | " + " | ".join(_spread(by[g], 2) if g in by else "-" for g in groups) + " |")
    return lines


def _comparison_lines(report: dict[str, Any]) -> list[str]:
    comparisons = report.get("comparisons") or []
    if not comparisons:
        return []
    resamples = comparisons[0].get("resamples", 0)
    over = ("test patients and the seeds" if comparisons[0].get("resampled") == "patients and seeds"
            else "test patients")
    lines = ["", f"Paired CPM differences (seed means; 95 % interval from {resamples} bootstrap resamples of the "
                 f"{report.get('test_patients', '?')} {over}; resolved when the interval excludes 0):", "",
             "| arm | against | CPM difference | 95 % interval | resolved | per seed |", "| --- " * 6 + "|"]
    lines += [f"| {c['arm']} | {c['baseline']} | {_difference_cells(c)} |" for c in comparisons]
    return lines


def _difference_cells(c: dict[str, Any]) -> str:
    """A paired difference's table cells: mean, 95 % interval, resolved, and the per-seed differences."""
    interval = f"[{c['low']:+.3f}, {c['high']:+.3f}]" if "low" in c else "-"
    resolved = ("yes" if c["resolved"] else "no") if "resolved" in c else "-"
    seeds = ", ".join(f"{d:+.2f}" for d in c["seed_differences"])
    return f"{c['mean']:+.3f} | {interval} | {resolved} | {seeds}"


def _curve_lines(report: dict[str, Any]) -> list[str]:
    if not report.get("curve"):
        return []
    sizes = sorted({p["train_patients"] for p in report["curve"]})
    arms = list(dict.fromkeys(p["arm"] for p in report["curve"]))
    by = {(p["arm"], p["train_patients"]): p for p in report["curve"]}
    lines = ["", "Scarce-data curve: CPM (mean ± std over seeds) by number of real training patients "
                 "(`scarce_curve.png`):", "", "| arm | " + " | ".join(f"{n} patients" for n in sizes) + " |",
             "| --- " * (1 + len(sizes)) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(_spread(by[(arm, n)]["cpm"]) if (arm, n) in by else "-"
                                                for n in sizes) + " |")
    if report.get("curve_comparisons"):
        lines += ["", "Paired CPM differences against real only at each size (95 % interval over test patients and "
                      "seeds):", "", "| real patients | arm | difference | 95 % interval | resolved | per seed |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['train_patients']} | {c['arm']} | {_difference_cells(c)} |"
                  for c in report["curve_comparisons"]]
    return lines


DIAGNOSED = {"test": "real, held-out test", "real": "real training", "real+synthetic": "LSDM cases",
             "real+synthetic-unguided": "LSDM cases, unguided", "real+copy-paste": "copy-paste (real, moved)"}


def _quartiles(values: list[float], digits: int = 1) -> str:
    return f"{values[1]:.{digits}f} ({values[0]:.{digits}f}-{values[2]:.{digits}f})" if values else "-"


def _diagnosis_lines(report: dict[str, Any]) -> list[str]:
    """Each training set's nodules against the held-out real ones (:mod:`.diagnosis`), then the verdict on LSDM
    against copy-paste in words."""
    diagnosis = report.get("diagnosis")
    if not diagnosis:
        return []
    lines = ["", "Why: each set's nodules on the labelled slice against the held-out real ones (median and "
                 "quartiles; appearance AUC: a logistic regression on intensity statistics, edge and radial "
                 "profile, 5-fold cross-validated, telling the set's nodules from the test nodules, 0.5 = not "
                 "told apart; copy-paste moves real nodules, so its AUC is what 'indistinguishable' reads as at "
                 "these counts):", "",
             "| nodules | count | diameter mm | pleura distance mm | vessel contact | mean HU | contrast HU | "
             "edge HU/mm | appearance AUC |", "| --- " * 9 + "|"]
    for key, result in diagnosis.items():
        auc = "-" if result.get("appearance_auc") is None else f"{result['appearance_auc']:.2f}"
        contact = "-" if result.get("vessel_contact") is None else f"{result['vessel_contact']:.2f}"
        lines.append(f"| {DIAGNOSED.get(key, key)} | {result['count']} | {_quartiles(result['diameter_mm'])} | "
                     f"{_quartiles(result['pleura_mm'])} | {contact} | {_quartiles(result['mean_hu'], 0)} | "
                     f"{_quartiles(result['contrast_hu'], 0)} | {_quartiles(result['edge_hu_per_mm'], 0)} | {auc} |")
    verdict = _verdict(report)
    return lines + (["", verdict] if verdict else [])


def _verdict(report: dict[str, Any]) -> str:
    """LSDM cases against copy-paste, in one plain paragraph, with the evidence for where they differ."""
    pair = next((c for c in report.get("comparisons") or []
                 if c["arm"] == "real+synthetic" and c["baseline"] == "real+copy-paste"), None)
    diagnosis = report.get("diagnosis") or {}
    if pair is None or "real+synthetic" not in diagnosis:
        return ""
    resolved = pair.get("resolved")
    if pair["mean"] > 0 and resolved:
        words = "LSDM cases beat copy-paste"
    elif pair["mean"] < 0 and resolved:
        words = "LSDM cases did worse than copy-paste"
    else:
        words = "LSDM cases did not beat copy-paste (the difference is not resolved)"
    lsdm, copy, test = diagnosis["real+synthetic"], diagnosis.get("real+copy-paste", {}), diagnosis["test"]
    evidence = []
    if lsdm.get("appearance_auc") is not None:
        control = copy.get("appearance_auc")
        evidence.append(f"a classifier tells LSDM nodules from real ones with AUC {lsdm['appearance_auc']:.2f}"
                        + (f" (copy-paste: {control:.2f})" if control is not None else ""))
    if lsdm["mean_hu"] and test["mean_hu"]:
        evidence.append(f"their median HU is {lsdm['mean_hu'][1]:.0f} against {test['mean_hu'][1]:.0f} for real "
                        f"nodules, contrast {lsdm['contrast_hu'][1]:.0f} against {test['contrast_hu'][1]:.0f}")
    if lsdm["diameter_mm"] and test["diameter_mm"]:
        evidence.append(f"median diameter {lsdm['diameter_mm'][1]:.1f} mm against {test['diameter_mm'][1]:.1f}")
    if lsdm.get("vessel_contact") is not None and test.get("vessel_contact") is not None:
        evidence.append(f"vessel contact {lsdm['vessel_contact']:.2f} against {test['vessel_contact']:.2f}, pleura "
                        f"distance {lsdm['pleura_mm'][1]:.1f} mm against {test['pleura_mm'][1]:.1f}")
    return (f"Verdict: {words}: CPM difference {pair['mean']:+.3f}"
            + (f" [{pair['low']:+.3f}, {pair['high']:+.3f}]" if "low" in pair else "") + ". "
            + ("How their nodules differ: " + "; ".join(evidence) + "." if evidence else ""))


def _profile_lines(report: dict[str, Any]) -> list[str]:
    p = report.get("profile")
    if not p:
        return []
    transforms = sorted(p["transforms_s"].items(), key=lambda item: -item[1])
    parts = ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in transforms[:6])
    return ["", f"Where an iteration's time goes (profiled over {p['iterations']} iterations in one process, batch "
                f"{p['batch_size']} of {p['patch_size'][0]} x {p['patch_size'][1]} px, {p['torch_threads']} torch "
                f"threads): {p['iteration_s'] * 1000:.0f} ms in all, network step {p['network_s'] * 1000:.0f} ms, "
                f"batch {p['batch_s'] * 1000:.0f} ms (loading and cropping {p['loading_s'] * 1000:.0f}; transforms in "
                f"ms: {parts}). In the runs nnU-Net makes batches in a background process, beside the network step."]


def _time_lines(report: dict[str, Any]) -> list[str]:
    """Training and prediction time per (arm, seed), from the runs that recorded it."""
    minutes = [run["minutes"] for arm in report["arms"].values() for run in arm["runs"] if run.get("minutes")]
    if not minutes:
        return []
    workers = report["recipe"].get("workers", 1)
    runs = [run for arm in report["arms"].values() for run in arm["runs"]]
    parts = [run.get(key) for run in runs for key in ("train_minutes", "predict_minutes")]
    split = ""
    if parts and all(v is not None for v in parts):
        split = (f" (training {np.mean([r['train_minutes'] for r in runs]):.1f}, predicting the test set "
                 f"{np.mean([r['predict_minutes'] for r in runs]):.1f}, the rest starting the process)")
    lines = ["", f"Training and predicting took {np.mean(minutes):.1f} min per (arm, seed) run{split} (range "
                 f"{min(minutes):.1f} to {max(minutes):.1f}), {sum(minutes):.0f} min for the {len(minutes)} runs "
                 f"timed ({workers} at a time), on device `{report['recipe']['device']}` with "
                 f"{report.get('cpu_count', '?')} CPU cores."]
    if report.get("wall_minutes") is not None:
        lines.append(f"The whole benchmark took {report['wall_minutes']:.1f} min of wall time in this invocation, "
                     f"{report.get('data_minutes', 0):.1f} of them making and preprocessing the datasets (work "
                     "finished by an earlier invocation is not counted).")
    return lines


def detection_markdown(report: dict[str, Any]) -> str:
    """The report's Markdown (``detection.md``)."""
    lines = ["# Downstream detection with nnU-Net v2", "", *_setup_lines(report), "", *_headline_lines(report),
             *_baseline_lines(report), "", "FROC per arm (mean ± std over seeds): `froc.png`.",
             *_malignancy_lines(report), *_size_lines(report),
             *_comparison_lines(report), *_diagnosis_lines(report), *_curve_lines(report), *_profile_lines(report),
             *_time_lines(report)]
    return "\n".join(lines) + "\n"


def _window_words(window: list[float] | tuple[float, ...] | None) -> str:
    if window is None:
        return "nnU-Net's foreground 0.5 / 99.5 percentiles"
    return f"[{window[0]:g}, {window[1]:g}] HU"


def _candidates_sentence(r: dict[str, Any]) -> str:
    if r["candidates_per_slice"]:
        return (f"Candidates: the {r['candidates_per_slice']} highest local maxima of each slice's foreground "
                f"probability, so the FROC ranks the network's output even below the {r['threshold']} threshold; "
                f"sensitivity, FPs / slice and Dice are read at {r['threshold']}.")
    return f"Candidates: connected components of the foreground probability >= {r['threshold']}."
