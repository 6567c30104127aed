"""Synthetic follow-up pairs: a prior and a current study of the same phantom patient.

Each pair shows one patient twice; only the finding and the acquisition
differ between the two studies. The pair's *kind* says what the finding does:

========== ========= ========= ====================================================
kind       prior     current   a "new finding" alert on the current study is
========== ========= ========= ====================================================
new        absent    present   true (the only kind where it is)
chronic    present   present   false: healing fracture / older, smaller bleed
negative   absent    absent    false
resolved   present   absent    false
========== ========= ========= ====================================================

Kinds follow a fixed cycle of ten (:data:`KIND_CYCLE`: 4 new, 3 chronic,
2 negative, 1 resolved), so any first ``10 k`` pairs hold exactly that mix.
Pair ``i`` of a seed is a pure function of ``(seed, STREAM_FOLLOWUP, i)``.

Radiographs (:func:`dx_pair`)
-----------------------------
One :class:`~training.synthetic.radiograph.Case` is drawn with fracture
parameters; both studies render it with :func:`~training.synthetic.radiograph.render`
and three generators (:func:`render_visit`):

* the anatomy (``rng``): one stream for both studies, so bones, trabecular
  texture, soft tissue, physes, growth-arrest lines, scars and nutrient
  canals are the same in both;
* the fracture (``finding_rng``): one stream for both studies, so a chronic
  fracture stays where it was and keeps its shape;
* the acquisition (``acquisition_rng``: processing, tone curve, window and
  quantum noise): one stream per study;

and the current study's limb lies a little differently on the detector (a
tilt jitter, SD 1.5 degrees, ``tilt_deg``), with dose and kVp-like contrast
a few per cent apart (:func:`_current_case`).

Where the fracture is absent, it is still placed and all its draws are made
(``fracture_drawn=False``), so the anatomy is the same in both studies. A
chronic fracture in the current study is healing
(:class:`~training.synthetic.radiograph.Healing`): its line keeps 25-60 % of
its contrast and 70 % get a sclerotic callus band along it (lucent lines),
an insufficiency band keeps 50-90 %, and a physeal-level line is narrowed to
35-60 % of its width.

Head CT (:func:`ct_pair`)
-------------------------
The head phantom is a :class:`~training.synthetic.headct.Head`; both studies
share it except for ``lesions`` and the acquisition: the current head lies a
little differently (position SD 2 mm, yaw SD 2 degrees, pitch SD 3 degrees),
has its own dose (SD 20 %) and its own noise seed. Both studies use the same
protocol (:func:`training.evaluate_head_ct.held_out_acquisition`). A chronic
bleed in the current study is older and smaller: 8-20 HU less dense
(at least 20 HU) and 60-95 % of its linear size (interhemispheric and
convexity collections: thickness; intraventricular blood: a level 2-6 mm
higher).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from .dx import dx_dataset
from .headct import Head, Lesion, sample_head
from .radiograph import EVAL_SPACINGS, Case, Healing, Rendered, render, sample_case

# Streams 1-4 are training, validation, held-out and validation series in
# training/evaluate.py and training/evaluate_head_ct.py; this one is ours.
STREAM_FOLLOWUP = 6
KINDS: tuple[str, ...] = ("new", "chronic", "negative", "resolved")
# Finding (prior, current) per kind.
PRESENT: dict[str, tuple[bool, bool]] = {
    "new": (False, True),
    "chronic": (True, True),
    "negative": (False, False),
    "resolved": (True, False),
}
KIND_CYCLE: tuple[str, ...] = (
    "new", "chronic", "negative", "new", "resolved",
    "chronic", "new", "negative", "chronic", "new",
)
PRIOR_DATE = dt.date(2026, 1, 15)


def pair_kind(index: int) -> str:
    """Kind of pair ``index``: the 10-cycle of :data:`KIND_CYCLE`."""
    return KIND_CYCLE[index % len(KIND_CYCLE)]


def _rng(seed: int, index: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_FOLLOWUP, index, *parts])


# --------------------------------------------------------------------------
# Radiographs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DxVisit:
    """One study of a pair.

    ``fracture`` is the ground truth of this image; ``rendered.truth_box``
    is the fracture's box (None where absent).
    """

    rendered: Rendered
    fracture: bool
    healing: Healing | None
    study_date: str
    theta_deg: float


@dataclass(frozen=True)
class DxPair:
    index: int
    kind: str
    case: Case  # the prior's case (the current one differs by dose and contrast)
    prior: DxVisit
    current: DxVisit


def render_visit(case: Case, *, anatomy_seed: int, finding_seed: int, acquisition_seed: int,
                 present: bool, healing: Healing | None = None,
                 tilt_deg: float = 0.0) -> Rendered:
    """Render one study of a pair.

    ``case`` must carry a fracture (``case.fracture``); ``present`` says
    whether it is drawn. Studies rendered with the same ``anatomy_seed`` and
    ``finding_seed`` show the same patient and, where present, the same
    fracture; ``acquisition_seed`` is the study's own.
    """
    if not case.fracture:
        raise ValueError("a follow-up case carries its fracture's parameters (fracture=True)")
    return render(
        case,
        np.random.default_rng(anatomy_seed),
        finding_rng=np.random.default_rng(finding_seed),
        acquisition_rng=np.random.default_rng(acquisition_seed),
        fracture_drawn=present,
        healing=healing,
        tilt_deg=tilt_deg,
    )


def _healing(case: Case, rng: np.random.Generator) -> Healing:
    if case.fracture_site == "physeal":
        return Healing(width=float(rng.uniform(0.35, 0.6)))
    if case.fracture_kind == "sclerotic":
        return Healing(contrast=float(rng.uniform(0.5, 0.9)))
    callus = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.7 else 0.0
    return Healing(contrast=float(rng.uniform(0.25, 0.6)), callus=callus)


def _current_case(case: Case, rng: np.random.Generator) -> tuple[Case, float]:
    """The current study's exposure (dose, contrast) and tilt jitter (degrees)."""
    tilt = float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0))
    dose = float(np.clip(case.dose * math.exp(rng.normal(0.0, 0.25)), 0.5, 2.0))
    contrast = float(np.clip(case.contrast * math.exp(rng.normal(0.0, 0.04)), 0.8, 1.2))
    return replace(case, dose=dose, contrast=contrast), tilt


def dx_pair(seed: int, index: int, kind: str | None = None) -> DxPair:
    """Pair ``index`` of ``seed``: a limb radiograph and its follow-up.

    Parameters
    ----------
    seed
        Follow-up seed (must differ from every training and held-out seed).
    index
        Pair number; the kind is :func:`pair_kind` unless ``kind`` is given.
    kind
        Override the kind (tests).
    """
    kind = pair_kind(index) if kind is None else kind
    prior_present, current_present = PRESENT[kind]
    rng = _rng(seed, index)
    case = sample_case(rng, fracture=True, spacing_choices=EVAL_SPACINGS)
    anatomy, finding, acq_prior, acq_current = (int(s) for s in rng.integers(0, 2**62, 4))
    current_case, tilt = _current_case(case, rng)
    healing = _healing(case, rng) if kind == "chronic" else None
    interval = int(rng.integers(14, 85))  # days: a fracture follow-up
    prior = render_visit(case, anatomy_seed=anatomy, finding_seed=finding,
                         acquisition_seed=acq_prior, present=prior_present)
    current = render_visit(current_case, anatomy_seed=anatomy, finding_seed=finding,
                           acquisition_seed=acq_current, present=current_present,
                           healing=healing, tilt_deg=tilt)
    return DxPair(
        index=index,
        kind=kind,
        case=case,
        prior=DxVisit(prior, prior_present, None, PRIOR_DATE.strftime("%Y%m%d"),
                      float(prior.details["theta_deg"])),
        current=DxVisit(current, current_present, healing,
                        (PRIOR_DATE + dt.timedelta(days=interval)).strftime("%Y%m%d"),
                        float(current.details["theta_deg"])),
    )


def dx_pair_datasets(pair: DxPair, seed: int) -> tuple[Dataset, Dataset]:
    """The prior and current studies as DX datasets (same patient, two studies)."""
    out = []
    for n, visit in enumerate((pair.prior, pair.current), start=1):
        uid = f"2.25.{seed}.{STREAM_FOLLOWUP}.{pair.index}.{n}"
        out.append(dx_dataset(
            visit.rendered,
            patient_id=f"FU{pair.index:06d}",
            patient_name="SYNTHETIC^FOLLOWUP",
            patient_sex=pair.case.sex,
            patient_age_years=pair.case.age_years,
            study_uid=f"{uid}.1",
            series_uid=f"{uid}.2",
            sop_uid=f"{uid}.3",
            study_date=visit.study_date,
            body_part=pair.case.body_part,
        ))
    return out[0], out[1]


# --------------------------------------------------------------------------
# Head CT
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CtPair:
    index: int
    kind: str
    prior: Head
    current: Head
    acquisition: Any  # training.evaluate_head_ct.Acquisition (same protocol for both)
    prior_date: str
    current_date: str


def age_lesion(lesion: Lesion, rng: np.random.Generator) -> Lesion:
    """The same bleed some days later: less dense and smaller."""
    hu = max(lesion.hu - float(rng.uniform(8.0, 20.0)), 20.0)
    shrink = float(rng.uniform(0.6, 0.95))
    a, b, c = lesion.size
    if lesion.kind == "iph":  # semi-axes
        size = (a * shrink, b * shrink, c * shrink)
    elif lesion.kind == "sah":  # radius of the affected region
        size = (a * shrink, b, c)
    elif lesion.kind in ("sdh", "edh"):  # thickness (both variants)
        size = (max(a * shrink, 1.5), b, c)
    else:  # ivh: the dependent level rises (less blood)
        size = (a + float(rng.uniform(2.0, 6.0)), b, c)
    return replace(lesion, hu=hu, size=size)  # type: ignore[arg-type]


def _reposition(head: Head, rng: np.random.Generator) -> Head:
    """The same head scanned again: lies a little differently, own dose and noise."""
    x, y, z = head.position
    return replace(
        head,
        position=(x + float(rng.normal(0, 2.0)), y + float(rng.normal(0, 2.0)), z),
        yaw_deg=head.yaw_deg + float(rng.normal(0, 2.0)),
        pitch_deg=head.pitch_deg + float(rng.normal(0, 3.0)),
        dose=float(np.clip(head.dose * math.exp(rng.normal(0, 0.2)), 0.5, 2.0)),
        seed=int(rng.integers(2**31)),
    )


def ct_pair(seed: int, index: int, kind: str | None = None) -> CtPair:
    """Pair ``index`` of ``seed``: a head CT and its follow-up (see module doc)."""
    from training.evaluate_head_ct import held_out_acquisition

    kind = pair_kind(index) if kind is None else kind
    prior_present, current_present = PRESENT[kind]
    rng = _rng(seed, index)
    head = sample_head(rng, haemorrhage=True)
    acquisition = held_out_acquisition(rng)
    visit_rng = _rng(seed, index, 1)
    current = _reposition(head, visit_rng)
    lesions = head.lesions
    current_lesions = lesions
    if kind == "chronic":
        current_lesions = tuple(age_lesion(les, visit_rng) for les in lesions)
    interval = int(visit_rng.integers(1, 15))  # days: a follow-up head CT
    return CtPair(
        index=index,
        kind=kind,
        prior=replace(head, lesions=lesions if prior_present else ()),
        current=replace(current, lesions=current_lesions if current_present else ()),
        acquisition=acquisition,
        prior_date=PRIOR_DATE.strftime("%Y%m%d"),
        current_date=(PRIOR_DATE + dt.timedelta(days=interval)).strftime("%Y%m%d"),
    )


def ct_series(head: Head, acquisition: Any, *, uid: str, study_date: str) -> Iterator[Dataset]:
    """The series of one study, slice by slice, as the held-out series are made.

    Slices every ``acquisition.spacing_mm`` over :meth:`Head.z_range_mm`
    (:func:`training.evaluate_head_ct.slice_dataset`).
    """
    from training.evaluate_head_ct import slice_dataset

    lo, hi = head.z_range_mm()
    n = max(1, math.floor((hi - lo) / acquisition.spacing_mm) + 1)
    for k in range(n):
        ds = slice_dataset(head, float(lo + k * acquisition.spacing_mm), acquisition, uid=uid,
                           number=k + 1)
        for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            if tag in ds:
                setattr(ds, tag, study_date)
        yield ds
