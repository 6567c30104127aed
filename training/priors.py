"""Does comparing with the prior cut false "new finding" alerts? Measured on follow-up pairs.

Run::

    python -m training.priors --model models/limb-fracture-xr [--pairs N]
    python -m training.priors --model models/head-ct-haemorrhage [--pairs N]

Each pair is a prior and a current study of one synthetic patient
(:mod:`training.synthetic.followup`), drawn from a follow-up seed that no
training or evaluation script uses (:data:`FOLLOWUP_SEEDS`, stream
:data:`~training.synthetic.followup.STREAM_FOLLOWUP`). Both studies go the
engine's way: the DICOM file's bytes are parsed, ``prepare_radiograph`` /
``prepare_ct_slice`` make the inputs with the card's parameters,
:class:`inference.backend.InProcessBackend` runs the card's weights in
batches of the engine's default size (stacked by
:func:`inference.backend.batch_of`, as the engine stacks them), and
``to_finding`` (radiographs) or the engine's series aggregation (head CT:
:func:`series_finding`, with :func:`inference.volume.slice_area_mm2` and
:func:`inference.volume.series_finding`, which ``engine/series_job.py``
uses) makes the :class:`~inference.postprocess.Finding`.

The prior's finding becomes an :class:`inference.interval.PriorFinding`,
and :func:`count_alerts` counts "new finding" alerts on the current study
as :func:`inference.interval.is_new_finding_alert` raises them: without the
prior, every positive current finding; with it, only a ``new`` change. An
alert is true only for a pair of kind ``new``.

Writes into the model folder: ``followup_predictions.csv`` (one row per
pair), the block ``metrics.performance_with_priors`` of ``model.json``, and
the section "Prior comparison" of ``README.md`` (replaced when present).
``--no-write`` prints the figures only. The training scripts, which write a
new card and README, end with :func:`refresh` (the same, with the defaults).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from inference.backend import InProcessBackend, batch_of
from inference.card import ModelCard
from inference.interval import PriorFinding, compare, is_new_finding_alert
from inference.postprocess import Finding, to_finding
from inference.preprocess import ModelInput, ct_slice_input, radiograph_input
from inference.registry import Registry
from inference.volume import (
    SeriesAccumulator,
    SliceRef,
    order_slices,
    parse_vector,
    slice_area_mm2,
)
from inference.volume import series_finding as aggregate_series
from training.synthetic import followup

log = logging.getLogger("priors")

# Held-out follow-up seeds. Used elsewhere: limb fracture training 20261130
# (streams 1, 2), its held-out set 20270101 (stream 3); head CT training
# 20261202 (streams 1, 2, 4), its held-out series 9103 (stream 3); demo
# studies 7, 20261201, 20261202 (other seed layouts). Pairs draw from
# (seed, STREAM_FOLLOWUP = 6, index).
FOLLOWUP_SEEDS: dict[str, int] = {"limb-fracture-xr": 20280301, "head-ct-haemorrhage": 20280302}
DEFAULT_PAIRS: dict[str, int] = {"limb-fracture-xr": 400, "head-ct-haemorrhage": 50}
CARD_KEY = "performance_with_priors"
CSV_NAME = "followup_predictions.csv"
README_HEADING = "## Prior comparison (follow-up pairs)"
Z95 = 1.959964


# --------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval of the proportion k / n (None when n is 0)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4)]


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


@dataclass(frozen=True)
class Outcome:
    """One pair as the counting sees it: its kind, the current finding, the prior's."""

    kind: str
    current: Finding
    prior: PriorFinding
    prior_study_uid: str = ""
    prior_study_date: str = ""

    def comparison(self):  # noqa: ANN201 - inference.interval.Comparison
        return compare(self.current, self.prior, prior_study_uid=self.prior_study_uid,
                       prior_study_date=self.prior_study_date)

    @property
    def alert_without_prior(self) -> bool:
        return is_new_finding_alert(self.current, None)

    @property
    def alert_with_prior(self) -> bool:
        return is_new_finding_alert(self.current, self.comparison())


def _mode(alerts: Sequence[bool], kinds: Sequence[str]) -> dict[str, Any]:
    n_new = sum(k == "new" for k in kinds)
    n_alerts = sum(alerts)
    false = sum(a and k != "new" for a, k in zip(alerts, kinds, strict=True))
    true = n_alerts - false
    return {
        "alerts": n_alerts,
        "false_alerts": false,
        "true_alerts": true,
        "false_alert_rate": _share(false, n_alerts),
        "false_alert_rate_ci95": wilson(false, n_alerts),
        "sensitivity_new": _share(true, n_new),
        "sensitivity_new_ci95": wilson(true, n_new),
        "missed_new": n_new - true,
    }


def count_alerts(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    """New-finding alerts on the current studies, without and with the prior.

    Returns
    -------
    dict
        ``n_pairs``, ``kinds`` (pairs per kind), ``without_prior`` and
        ``with_prior`` (each: alerts, false_alerts (pair not "new"),
        true_alerts, false_alert_rate = false / alerts with its Wilson 95 %
        interval, sensitivity_new = true alerts / "new" pairs with its
        interval, missed_new), ``false_alert_reduction_percent`` (relative
        reduction of false alerts; the alerts with the prior are a subset of
        those without, so its interval is the Wilson interval of the share
        of false alerts the comparison removed), ``true_new_hidden_by_prior``
        ("new" pairs alerted without the prior but not with it: the prior
        was itself positive) and ``by_kind`` (alerts in both modes and the
        interval changes per kind).
    """
    items = list(outcomes)
    kinds = [o.kind for o in items]
    unknown = set(kinds) - set(followup.KINDS)
    if unknown:
        raise ValueError(f"unknown pair kind(s) {sorted(unknown)}")
    without = [o.alert_without_prior for o in items]
    with_prior = [o.alert_with_prior for o in items]
    if any(w and not a for a, w in zip(without, with_prior, strict=True)):
        raise AssertionError("an alert with the prior must also be one without it")
    a, b = _mode(without, kinds), _mode(with_prior, kinds)
    removed = a["false_alerts"] - b["false_alerts"]
    ci = wilson(removed, a["false_alerts"])
    by_kind: dict[str, Any] = {}
    for kind in followup.KINDS:
        sel = [i for i, k in enumerate(kinds) if k == kind]
        changes = Counter(items[i].comparison().change.value for i in sel)
        by_kind[kind] = {
            "n": len(sel),
            "alerts_without_prior": sum(without[i] for i in sel),
            "alerts_with_prior": sum(with_prior[i] for i in sel),
            "changes": dict(sorted(changes.items())),
        }
    return {
        "n_pairs": len(items),
        "kinds": {k: kinds.count(k) for k in followup.KINDS},
        "without_prior": a,
        "with_prior": b,
        "false_alert_reduction_percent": None if not a["false_alerts"] else
        round(100.0 * removed / a["false_alerts"], 1),
        "false_alert_reduction_ci95_percent": None if ci is None else
        [round(100.0 * ci[0], 1), round(100.0 * ci[1], 1)],
        "true_new_hidden_by_prior": sum(
            x and not y and k == "new" for x, y, k in zip(without, with_prior, kinds, strict=True)
        ),
        "by_kind": by_kind,
    }


# --------------------------------------------------------------------------
# The engine's path
# --------------------------------------------------------------------------


def engine_defaults() -> tuple[int, int]:
    """(batch size, max pixel bytes) of the engine's default configuration."""
    from engine.config import AIConfig

    fields = AIConfig.model_fields
    return int(fields["batch_size"].default), int(fields["max_pixel_bytes"].default)


def load_card(model_dir: Path) -> ModelCard:
    """The card as the engine's registry reads it from the models directory."""
    model_dir = Path(model_dir).resolve()
    registry = Registry.scan(model_dir.parent)
    if model_dir.name in registry.errors:
        raise SystemExit(f"{model_dir}: {registry.errors[model_dir.name]}")
    for card in registry.cards.values():
        if card.folder.resolve() == model_dir:
            return card
    raise SystemExit(f"{model_dir}: no model card")


@functools.lru_cache(maxsize=4)
def _card(model_dir: str) -> ModelCard:
    return ModelCard.from_folder(Path(model_dir))


def as_received(ds: Dataset) -> Dataset:
    """The dataset as the engine gets it: the file's bytes, parsed again."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def prepare_instance(card: ModelCard, ds: Dataset) -> ModelInput:
    """``engine.instance_job.prepare`` without its context."""
    return radiograph_input(card, ds, max_pixel_bytes=engine_defaults()[1])


def prepare_slice(card: ModelCard, ds: Dataset) -> ModelInput:
    """The per-slice preprocessing of ``engine.series_job.analyse``."""
    return ct_slice_input(card, ds, max_pixel_bytes=engine_defaults()[1])


def slice_ref(ds: Dataset, instance: str) -> SliceRef:
    """What Orthanc's series listing tells the engine about one slice."""
    return SliceRef(
        instance=instance,
        sop_instance_uid=str(ds.SOPInstanceUID),
        position=parse_vector(ds.get("ImagePositionPatient"), 3),
        orientation=parse_vector(ds.get("ImageOrientationPatient"), 6),
    )


def instance_findings(card: ModelCard, backend: InProcessBackend,
                      inputs: Sequence[ModelInput]) -> list[Finding]:
    """One model call for the batch, a finding per image (``engine.instance_job.run``)."""
    outputs = backend.predict(card, batch_of(card, inputs))
    return [to_finding(card, raw, mi.image.geometry)
            for mi, raw in zip(inputs, outputs, strict=True)]


def series_finding(card: ModelCard, backend: Any,
                   slices: Sequence[tuple[SliceRef, ModelInput]],
                   batch_size: int) -> tuple[Finding, int]:
    """The series finding and key slice index, as ``engine.series_job.analyse`` makes them.

    Its loop without the downloads: slices in the order of
    :func:`inference.volume.order_slices`, model calls in batches of
    ``batch_size``, each slice's :func:`inference.volume.slice_area_mm2`
    times the slab it stands for (:class:`inference.volume.SeriesAccumulator`),
    and :func:`inference.volume.series_finding` of the best slice.
    """
    ordered = order_slices([ref for ref, _ in slices])
    by_instance = {ref.instance: mi for ref, mi in slices}
    acc = SeriesAccumulator()
    items = list(enumerate(ordered.slices))
    step = max(1, batch_size)
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        prepared = [by_instance[ref.instance] for _, ref in chunk]
        outputs = backend.predict(card, batch_of(card, prepared))
        for (index, _), prep, raw in zip(chunk, prepared, outputs, strict=True):
            keep = (raw, prep.image.geometry) if raw.probability > acc.best_probability else None
            acc.add(index, raw.probability, slice_area_mm2(card, raw), ordered.slab_mm[index],
                    keep)
    raw, geometry = acc.best  # type: ignore[misc]
    return aggregate_series(card, acc, raw, geometry), acc.best_index


def prior_of(finding: Finding) -> PriorFinding:
    """The prior's finding as its job recorded it."""
    return PriorFinding(finding.probability, finding.threshold, finding.volume_ml)


# --------------------------------------------------------------------------
# Pairs (rendered in worker processes)
# --------------------------------------------------------------------------


def _dx_job(args: tuple[str, int, int]) -> dict[str, Any]:
    model_dir, seed, index = args
    card = _card(model_dir)
    pair = followup.dx_pair(seed, index)
    prior_ds, current_ds = followup.dx_pair_datasets(pair, seed)
    case, healing = pair.case, pair.current.healing
    return {
        "facts": {
            "index": index,
            "kind": pair.kind,
            "age": round(case.age_years, 2),
            "sex": case.sex,
            "body_part": case.body_part,
            "fracture_kind": case.fracture_kind,
            "fracture_site": pair.prior.rendered.details.get("site")
            or pair.current.rendered.details.get("site") or case.fracture_site,
            "spacing_mm": case.spacing_mm,
            "tilt_jitter_deg": round(pair.current.theta_deg - pair.prior.theta_deg, 3),
            "healing_contrast": "" if healing is None else round(healing.contrast, 3),
            "healing_callus": "" if healing is None else round(healing.callus, 3),
            "healing_width": "" if healing is None else round(healing.width, 3),
            "prior_truth": int(pair.prior.fracture),
            "current_truth": int(pair.current.fracture),
        },
        "prior_study_uid": str(prior_ds.StudyInstanceUID),
        "prior_study_date": pair.prior.study_date,
        "inputs": [prepare_instance(card, as_received(ds)) for ds in (prior_ds, current_ds)],
    }


def _ct_series(card: ModelCard, head: Any, acquisition: Any, uid: str,
               date: str) -> list[tuple[SliceRef, ModelInput]]:
    out = []
    for k, ds in enumerate(followup.ct_series(head, acquisition, uid=uid, study_date=date)):
        ds = as_received(ds)
        out.append((slice_ref(ds, f"{uid}/{k}"), prepare_slice(card, ds)))
    return out


def _true_volume(head: Any) -> float:
    from training.synthetic.headct import true_volume_ml

    volume = true_volume_ml(head, 1.0)
    return true_volume_ml(head, 0.5) if 0.0 < volume < 3.0 else volume  # as the held-out set


def _ct_job(args: tuple[str, int, int]) -> dict[str, Any]:
    model_dir, seed, index = args
    card = _card(model_dir)
    pair = followup.ct_pair(seed, index)
    head = pair.prior if pair.prior.lesions else pair.current
    lesion = head.lesions[0] if head.lesions else None
    base = f"2.25.{seed}.{followup.STREAM_FOLLOWUP}.{index}"
    prior = _ct_series(card, pair.prior, pair.acquisition, f"{base}.1", pair.prior_date)
    current = _ct_series(card, pair.current, pair.acquisition, f"{base}.2", pair.current_date)
    return {
        "facts": {
            "index": index,
            "kind": pair.kind,
            "age": round(head.age_years, 2),
            "sex": head.sex,
            "lesion_kind": "" if lesion is None else lesion.kind,
            "lesion_variant": "" if lesion is None else lesion.variant,
            "isodense": "" if lesion is None else int(lesion.isodense),
            "thickness": pair.acquisition.thickness_mm,
            "n_slices_prior": len(prior),
            "n_slices_current": len(current),
            "prior_truth": int(pair.prior.haemorrhage),
            "current_truth": int(pair.current.haemorrhage),
            "prior_true_volume_ml": round(_true_volume(pair.prior), 3),
            "current_true_volume_ml": round(_true_volume(pair.current), 3),
        },
        "prior_study_uid": f"{base}.1.1",
        "prior_study_date": pair.prior_date,
        "series": [prior, current],
    }


def _iter_jobs(job: Any, args: list[tuple[str, int, int]], workers: int) -> Iterator[dict]:
    """Results of ``job`` over ``args`` in order; a few in flight at a time."""
    if workers <= 1:
        for a in args:
            yield job(a)
        return
    # "spawn": this process holds TensorFlow's threads, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: list[Future] = []
        for a in args:
            pending.append(pool.submit(job, a))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _row(facts: dict[str, Any], prior: Finding, current: Finding, outcome: Outcome,
         series: bool) -> dict[str, Any]:
    row = dict(facts)
    row.update({
        "threshold": current.threshold,
        "prior_probability": round(prior.probability, 6),
        "current_probability": round(current.probability, 6),
    })
    if series:
        row["prior_volume_ml"] = "" if prior.volume_ml is None else prior.volume_ml
        row["current_volume_ml"] = "" if current.volume_ml is None else current.volume_ml
    row.update({
        "change": outcome.comparison().change.value,
        "alert_without_prior": int(outcome.alert_without_prior),
        "alert_with_prior": int(outcome.alert_with_prior),
    })
    return row


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


def evaluate_pairs(model_dir: Path, *, n_pairs: int, seed: int,
                   workers: int | None = None) -> dict[str, Any]:
    """Run the model on ``n_pairs`` follow-up pairs; per-pair rows and the counts."""
    start = time.monotonic()
    card = load_card(model_dir)
    series = card.accepts.level == "series"
    used = {card.training.get("seed"), card.metrics.get("held_out", {}).get("seed")}
    if seed in used:
        raise SystemExit(f"seed {seed} is the card's training or held-out seed")
    batch_size, _ = engine_defaults()
    backend = InProcessBackend()
    backend.load(card)
    workers = workers or os.cpu_count() or 1
    job = _ct_job if series else _dx_job
    args = [(str(card.folder), seed, i) for i in range(n_pairs)]
    rows: list[dict[str, Any]] = []
    outcomes: list[Outcome] = []
    group: list[dict[str, Any]] = []

    def finish(items: list[dict[str, Any]]) -> None:
        if series:
            findings = [[series_finding(card, backend, s, batch_size)[0] for s in it["series"]]
                        for it in items]
        else:
            # Prior and current of a few pairs per model call, as the engine batches jobs.
            flat = instance_findings(card, backend, [mi for it in items for mi in it["inputs"]])
            findings = [flat[2 * k : 2 * k + 2] for k in range(len(items))]
        for it, (prior, current) in zip(items, findings, strict=True):
            outcome = Outcome(it["facts"]["kind"], current, prior_of(prior),
                              it["prior_study_uid"], it["prior_study_date"])
            outcomes.append(outcome)
            rows.append(_row(it["facts"], prior, current, outcome, series))

    with _progress() as progress:
        task = progress.add_task(f"{card.id}: follow-up pairs", total=n_pairs)
        for item in _iter_jobs(job, args, workers):
            group.append(item)
            if series or 2 * len(group) >= batch_size:
                finish(group)
                progress.advance(task, len(group))
                group = []
        if group:
            finish(group)
            progress.advance(task, len(group))
    counts = count_alerts(outcomes)
    return {"card": card, "seed": seed, "rows": rows, "counts": counts,
            "duration_s": round(time.monotonic() - start, 1)}


# --------------------------------------------------------------------------
# Card, CSV and README
# --------------------------------------------------------------------------


def card_block(result: dict[str, Any], command: str) -> dict[str, Any]:
    """``metrics.performance_with_priors``: the counts and how they were made."""
    card: ModelCard = result["card"]
    series = card.accepts.level == "series"
    counts = dict(result["counts"])
    return {
        "seed": result["seed"],
        "stream": followup.STREAM_FOLLOWUP,
        "n_pairs": counts.pop("n_pairs"),
        "kinds": counts.pop("kinds"),
        "threshold": card.series_threshold if series else card.threshold,
        "rule": "inference/interval.py: with a prior only a 'new' change alerts; without a "
                "prior every positive finding does. An alert is true only for a 'new' pair.",
        **counts,
        "per_pair": CSV_NAME,
        "generator": "training/synthetic/followup.py",
        "command": command,
        "duration_s": result["duration_s"],
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})


def update_card(model_dir: Path, block: dict[str, Any]) -> None:
    path = Path(model_dir) / "model.json"
    data = json.loads(path.read_text())
    data.setdefault("metrics", {})[CARD_KEY] = block
    path.write_text(json.dumps(data, indent=2) + "\n")


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def readme_section(block: dict[str, Any], series: bool) -> str:
    """The README section (Markdown), from the card block."""
    a, b = block["without_prior"], block["with_prior"]
    kinds = block["kinds"]
    mix = ", ".join(f"{kinds[k]} {k}" for k in followup.KINDS)
    if series:
        how = (
            "Each pair is two head CT series of one synthetic head "
            "(`training/synthetic/followup.py`, `ct_pair`): the same phantom anatomy and "
            "protocol, the current head repositioned a little (position SD 2 mm, yaw SD 2 deg, "
            "pitch SD 3 deg) with its own dose and noise, 1-14 days later. A *chronic* bleed is "
            "8-20 HU less dense and 60-95 % of its linear size in the current study (the prior "
            "shows it acute). The plugin's series path makes both findings (every slice "
            "through `prepare_ct_slice`, `InProcessBackend`, the series aggregation of "
            "`engine/series_job.py` with `inference.volume`), at the card's series threshold "
            f"{block['threshold']}."
        )
        model_limit = (
            "the model was trained on single series, never on follow-up, and a smaller, "
            "less dense bleed is harder for it than an acute one"
        )
    else:
        how = (
            "Each pair is two radiographs of one synthetic patient "
            "(`training/synthetic/followup.py`, `dx_pair`): the same phantom case, bones, "
            "texture, soft tissue and look-alikes (physes, growth-arrest lines, scars, "
            "nutrient canals), the current study 14-84 days later with its own processing "
            "and noise, a tilt jitter (SD 1.5 deg) and a few per cent of dose and contrast. "
            "A *chronic* fracture is healing in the current study (the line keeps 25-60 % of "
            "its contrast, 70 % with a sclerotic callus band; insufficiency bands keep "
            "50-90 %; physeal-level lines 35-60 % of their width). The plugin's instance "
            "path makes both findings (`prepare_radiograph`, `InProcessBackend`, "
            f"`to_finding`), at the card's threshold {block['threshold']}."
        )
        model_limit = (
            "the model was trained on acute fractures of single radiographs, never on "
            "follow-up; a healing fracture is out of its training distribution"
        )
    rows = [
        ("\"new finding\" alerts", a["alerts"], b["alerts"]),
        ("false alerts (pair not *new*)", a["false_alerts"], b["false_alerts"]),
        ("false-alert rate (false / alerts)",
         _pct(a["false_alert_rate"]) + _ci(a["false_alert_rate_ci95"]),
         _pct(b["false_alert_rate"]) + _ci(b["false_alert_rate_ci95"])),
        (f"sensitivity for new findings ({kinds['new']} *new* pairs)",
         _pct(a["sensitivity_new"]) + _ci(a["sensitivity_new_ci95"]),
         _pct(b["sensitivity_new"]) + _ci(b["sensitivity_new_ci95"])),
        ("new findings missed", a["missed_new"], b["missed_new"]),
    ]
    table = "\n".join(f"| {name} | {x} | {y} |" for name, x, y in rows)
    per_kind = "\n".join(
        f"| {k} | {v['n']} | {v['alerts_without_prior']} | {v['alerts_with_prior']} | "
        + ", ".join(f"{c} {n}" for c, n in v["changes"].items()) + " |"
        for k, v in block["by_kind"].items()
    )
    reduction = block["false_alert_reduction_percent"]
    ci = block["false_alert_reduction_ci95_percent"]
    cut = "-" if reduction is None else f"{reduction:.1f} %"
    cut_ci = "" if ci is None else f" (95 % CI {ci[0]:.1f}-{ci[1]:.1f} %)"
    hidden = block["true_new_hidden_by_prior"]
    intro = (
        'Does comparing with the prior study cut false "new finding" alerts? The rule is '
        "`inference/interval.py`: with a prior, only a finding that was absent before and is "
        "present now (`new`) alerts; without one, every positive finding does. Measured on "
        f"{block['n_pairs']} synthetic follow-up pairs ({mix}; held-out seed {block['seed']}, "
        f"stream {block['stream']}, which no training or evaluation script draws from). {how}"
    )
    result = (
        f"Prior comparison cut the false alerts by {cut}{cut_ci}. It also hid {hidden} of the "
        f"{a['true_alerts']} true new findings alerted without the prior: their prior was "
        "itself falsely positive, so the change reads `unchanged` (or a volume change). "
        "Intervals are Wilson 95 % intervals; the reduction's is that of the share of the "
        "false alerts without a prior that the comparison removed (the alerts with a prior "
        "are a subset of those without). By kind:"
    )
    limits = (
        "Limits: synthetic phantoms only, generated by our own code; one pair per patient, "
        "with a fixed mix of kinds that sets the figures (a real follow-up population has "
        f"its own mix, and the relative reduction depends on it); {model_limit}. Prior and "
        "current are more alike than two real studies (the same phantom, the same look-alike "
        "anatomy, only small positioning and exposure changes), so a false positive caused "
        "by the anatomy tends to recur on the prior. That inflates both the cut in false "
        "alerts and the share of true new findings hidden; the figures say how the rule "
        "behaves on this phantom, not what it would do on real follow-up studies."
    )

    def wrap(text: str) -> str:
        return textwrap.fill(text, width=78, break_long_words=False, break_on_hyphens=False)

    return f"""{README_HEADING}

{wrap(intro)}

| | without prior | with prior |
|---|---|---|
{table}

{wrap(result)}

| kind | pairs | alerts without prior | alerts with prior | interval change |
|---|---|---|---|---|
{per_kind}

Per-pair results: `{block["per_pair"]}`; command:
`{block["command"]}` ({block["duration_s"]:.0f} s).

{wrap(limits)}
"""


def update_readme(model_dir: Path, section: str) -> None:
    """Put ``section`` before "## Limits" (or replace the one there)."""
    path = Path(model_dir) / "README.md"
    text = path.read_text()
    start = text.find(README_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + len(README_HEADING))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        at = text.find("\n## Limits")
        if at < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            text = text[: at + 1] + section.rstrip("\n") + "\n\n" + text[at + 1 :]
    path.write_text(text)


def refresh(model_dir: Path, *, n_pairs: int | None = None, seed: int | None = None,
            workers: int | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate the model folder's card on follow-up pairs and write the results.

    ``n_pairs`` and ``seed`` default to the card's model's (:data:`DEFAULT_PAIRS`,
    :data:`FOLLOWUP_SEEDS`). Writes the CSV, ``metrics.performance_with_priors``
    and the README section (unless ``write`` is false); returns the card block.
    """
    model_dir = Path(model_dir)
    model_id = load_card(model_dir).id
    chosen = seed if seed is not None else FOLLOWUP_SEEDS.get(model_id)
    n = n_pairs if n_pairs is not None else DEFAULT_PAIRS.get(model_id, 200)
    if chosen is None:
        raise SystemExit(f"no default follow-up seed for {model_id}; give --seed")
    if n < 1:
        raise SystemExit("--pairs must be at least 1")
    result = evaluate_pairs(model_dir, n_pairs=n, seed=chosen, workers=workers)
    command = f"python -m training.priors --model {model_dir} --pairs {n}"
    if seed is not None:
        command += f" --seed {chosen}"
    block = card_block(result, command)
    if write:
        write_csv(model_dir / CSV_NAME, result["rows"])
        update_card(model_dir, block)
        update_readme(model_dir, readme_section(block, result["card"].accepts.level == "series"))
        log.info("wrote %s, model.json (metrics.%s) and README.md in %s", CSV_NAME, CARD_KEY,
                 model_dir)
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"number of pairs (default {DEFAULT_PAIRS})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"follow-up seed (default {FOLLOWUP_SEEDS})")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes")
    parser.add_argument("--no-write", action="store_true",
                        help="print the figures; write no card, README or CSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be at least 1")
    block = refresh(args.model, n_pairs=args.pairs, seed=args.seed, workers=args.workers,
                    write=not args.no_write)
    print(json.dumps(block, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
