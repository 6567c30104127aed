"""Synthetic projection radiographs of a limb, with and without fractures.

The phantom is defined in millimetres and rendered analytically at any pixel
spacing, so the same case looks the same at 0.1 mm (a detector) and at 0.5 mm
(fast training renders): the runtime resamples both to the model's 1 mm grid.

What is modelled, and why
-------------------------
* One or two roughly parallel long bones (radius + ulna, tibia + fibula, or a
  humerus) as projections of hollow tubes: the projected path length through a
  cortical shell plus a medullary cavity holding trabecular bone with an
  oriented band-passed texture. Bones are slightly curved, tilted by up to
  25 degrees, flare at their ends (metaphysis/epiphysis) and end in a rounded
  cap; an adjacent bone across a joint space sits beyond a visible end.
* A soft-tissue envelope (elliptic cross-section with a subcutaneous fat
  layer), air outside the limb (direct exposure).
* Bone mineral density (BMD) from age and sex: rises through childhood, peaks
  near 30 years, declines after 50, faster in women after menopause, with
  individual scatter. BMD scales cortical thickness, bone attenuation and the
  contrast of the trabecular texture.
* Normal anatomy that mimics fractures, so that age and sex matter: open
  physes (lucent, wavy, 1-2.5 mm, until ~15 y in girls and ~17 y in boys),
  growth-arrest (Park-Harris) lines (sclerotic lines, 1-3 mm, common before
  40, rare in the elderly), faint physeal scars in adults, and nutrient canals
  (thin oblique lucency through one cortex, mostly adults) as hard negatives.
* Fractures (the label), each with a look-alike from another age:
  - lucent lines (transverse to 45 degrees oblique, 0.8-2.2 mm, irregular,
    0-3 mm step-off in about half) across one bone, in the shaft or the
    metaphysis, where physes and growth-arrest lines are;
  - in adults, often a transverse line at the level of the closed physis,
    across both bones of a forearm or leg when in view, drawn exactly like an
    open physis: only age tells a child's physis from an adult's fracture;
  - in children, greenstick-like cracks through one cortex, drawn like a
    nutrient canal (adults' canals are normal);
  - in older patients with low BMD, insufficiency fractures seen as sclerotic
    bands (1.2-3.5 mm), drawn like growth-arrest lines (normal in the young).
  Children's complete fractures are mostly oblique. The geometry (which bone
  end is in view) is drawn the same way with and without fracture, so that
  it does not hint at the label.
* Acquisition: field size, pixel spacing, kVp-like contrast, dose-dependent
  quantum noise (larger where attenuation is higher, and per pixel larger at
  finer spacing so that the noise per square millimetre does not depend on
  the spacing), detector blur, "for presentation" processing (large-kernel
  dynamic-range compression and a tone curve), 12-bit stored values, a VOI
  window with jitter, and MONOCHROME1 (inverted) about 30 % of the time.

Everything random is drawn from the ``numpy.random.Generator`` passed in, so a
case is a pure function of the generator's state. :func:`render` can also
draw the fracture and the acquisition from generators of their own, leave a
placed fracture out, draw it healing, or tilt the limb a little more: what
follow-up studies of one patient need (:mod:`training.synthetic.followup`).
With those options at their defaults, ``render(case, rng)`` makes exactly the
draws it always made, in the same order, and the same pixels (training and
the shipped model cards depend on that; ``tests/unit/test_synthetic.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

# Detector pitches of common DX/CR systems (mm); used for evaluation and the demo.
EVAL_SPACINGS: tuple[float, ...] = (0.1, 0.139, 0.143, 0.15, 0.16, 0.175, 0.2)
# Coarse spacings for fast training renders. The runtime resamples every image
# to 1.0 mm, and noise is defined per square millimetre, so a 0.5 mm render
# looks the same to the model as a 0.15 mm one after resampling.
TRAIN_SPACINGS: tuple[float, ...] = (0.4, 0.45, 0.5)

BODY_PARTS: dict[str, float] = {"FOREARM": 0.45, "LEG": 0.35, "ARM": 0.20}

# Finest grid the analytic phantom is evaluated on (mm). Finer outputs are
# upsampled from it (which also stands in for detector blur) before the
# per-pixel quantum noise is added at the output spacing.
_WORK_MM = 0.25
# Grid for the large-kernel "for presentation" processing (mm).
_COARSE_MM = 2.0
# Grid of the trabecular texture (mm).
_TEXTURE_MM = 0.5
_MAX_STORED = 4095  # 12 bits stored

# Line-like structures the renderer reports (Rendered.details["structures"]),
# normal anatomy first, then fracture appearances.
STRUCTURE_KINDS: tuple[str, ...] = (
    "physis",
    "physeal_scar",
    "arrest_line",
    "nutrient_canal",
    "physeal_fracture",
    "fracture_line",
    "incomplete_fracture",
    "sclerotic_fracture",
)


@dataclass(frozen=True)
class Case:
    """What a synthetic examination shows, before rendering.

    Attributes
    ----------
    age_years, sex
        Patient age (years) and sex (``"M"`` or ``"F"``).
    body_part
        ``"FOREARM"`` (radius and ulna), ``"LEG"`` (tibia and fibula) or
        ``"ARM"`` (humerus only).
    bmd
        Bone mineral density relative to the young-adult mean (1.0).
    physes_open
        Growth plates still open (children and adolescents).
    growth_arrest_lines
        Number of Park-Harris lines per bone end.
    physeal_scar
        Faint sclerotic line where a closed physis was (adults).
    nutrient_canal
        A nutrient canal is visible through one cortex (hard negative).
    fracture
        The label: a fracture is present.
    fracture_kind
        ``"lucent"`` (fracture line), ``"sclerotic"`` (insufficiency fracture,
        sclerotic band) or ``None``.
    fracture_site
        Requested site: ``"shaft"``, ``"metaphysis"`` or ``"physeal"`` (at
        the level of the closed growth plate, adults only); ``None`` without
        fracture. The renderer falls back to the metaphysis, then the shaft,
        when the field shows no bone end (``Rendered.details["site"]``).
    fracture_incomplete
        The lucent line crosses only part of the bone from one cortex.
    fracture_gap_mm, fracture_angle_deg, displacement_mm, band_mm
        Fracture line width, obliquity (0 = transverse), step-off, and
        sclerotic band width.
    spacing_mm, field_mm
        Output pixel spacing and field of view (rows, columns) in mm.
    photometric
        ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
    dose, contrast
        Relative dose (sets the quantum noise) and kVp-like bone contrast.
    """

    age_years: float
    sex: str
    body_part: str
    bmd: float
    physes_open: bool
    growth_arrest_lines: int
    physeal_scar: bool
    nutrient_canal: bool
    fracture: bool
    fracture_kind: str | None
    fracture_site: str | None
    fracture_incomplete: bool
    fracture_gap_mm: float
    fracture_angle_deg: float
    displacement_mm: float
    band_mm: float
    spacing_mm: float
    field_mm: tuple[float, float]
    photometric: str
    dose: float
    contrast: float


@dataclass(frozen=True)
class Rendered:
    """A rendered case: stored pixel values plus what a DICOM writer needs.

    Attributes
    ----------
    stored
        (rows, columns) uint16 stored values, 12 bits used.
    spacing_mm
        (row, column) pixel spacing in mm.
    photometric
        ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
    window
        VOI window (center, width) in stored values.
    truth_box
        Fracture bounding box (row0, col0, row1, col1) in continuous source
        pixel coordinates ((0, 0) is the top-left corner of the top-left
        pixel), or ``None`` without fracture.
    case
        The case that was rendered.
    details
        Geometry drawn while rendering, for analysis and tests: tilt
        (``theta_deg``), which bone end is in the field (``visible_end``),
        the fracture's bone, position and site, and two landmarks in output
        pixels, ``bone_px`` (dense bone) and ``air_px`` (direct exposure,
        or None), and ``structures``: (kind, box) of every physis, scar,
        growth-arrest line, nutrient canal and fracture drawn, boxes in
        continuous output pixel coordinates.
    """

    stored: np.ndarray
    spacing_mm: tuple[float, float]
    photometric: str
    window: tuple[float, float]
    truth_box: tuple[float, float, float, float] | None
    case: Case
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Healing:
    """How a healing fracture looks (:func:`render`'s ``healing``); the defaults: acute.

    Attributes
    ----------
    contrast
        Share (0-1] of the acute line's or band's contrast left.
    callus
        Strength [0-1] of a sclerotic callus band (1-3 mm wider than the
        line) drawn along a healing lucent line; 0: none.
    width
        Share (0-1] of the acute width left (physeal-level lines).
    """

    contrast: float = 1.0
    callus: float = 0.0
    width: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.contrast <= 1.0 and 0.0 <= self.callus <= 1.0
                and 0.0 < self.width <= 1.0):
            raise ValueError(f"healing outside its ranges: {self}")


_ACUTE = Healing()


@dataclass(frozen=True)
class _Look:
    """How :func:`render` draws the case's fracture: from which generator, whether, how."""

    rng: np.random.Generator
    drawn: bool = True
    healing: Healing = _ACUTE


# --------------------------------------------------------------------------
# Population model
# --------------------------------------------------------------------------


def mean_bmd(age_years: float, sex: str) -> float:
    """Population mean bone mineral density relative to the young-adult peak.

    Accrual through childhood and adolescence to a peak near 30 years
    (slightly higher in men), a slow decline after 50 and, in women, an
    accelerated loss during the decade after menopause (~51 years).
    """
    age = max(age_years, 0.0)
    growth = 1.0 - 0.58 * math.exp(-age / 9.0)
    peak = 1.04 if sex == "M" else 0.97
    if sex == "M":
        loss = 0.005 * max(age - 50.0, 0.0)
    else:
        loss = (
            0.004 * max(age - 45.0, 0.0)
            + 0.014 * min(max(age - 51.0, 0.0), 10.0)
            + 0.004 * max(age - 61.0, 0.0)
        )
    return max(peak * growth * (1.0 - loss), 0.35)


def physis_closure_age(sex: str) -> float:
    """Typical age (years) at which long-bone physes close."""
    return 15.0 if sex == "F" else 17.0


def _sample_age(rng: np.random.Generator) -> float:
    # Children, adults and the elderly in similar measure, so that every age
    # band has enough cases to learn and evaluate the mimics.
    band = rng.choice(3, p=[0.4, 0.35, 0.25])
    low, high = ((3.0, 18.0), (18.0, 65.0), (65.0, 95.0))[band]
    return float(rng.uniform(low, high))


def sample_case(
    rng: np.random.Generator,
    *,
    fracture: bool | None = None,
    prevalence: float = 0.5,
    spacing_choices: tuple[float, ...] = EVAL_SPACINGS,
    field_range_mm: tuple[float, float] = (180.0, 300.0),
    monochrome1_fraction: float = 0.3,
    age_years: float | None = None,
    sex: str | None = None,
) -> Case:
    """Draw one examination from the synthetic population.

    Parameters
    ----------
    rng
        Source of all randomness.
    fracture
        Force the label; ``None`` draws it with probability ``prevalence``.
    prevalence
        Fracture probability when ``fracture`` is None.
    spacing_choices
        Pixel spacings (mm) to choose from, uniformly.
    field_range_mm
        Range of the field size (mm) for rows and columns.
    monochrome1_fraction
        Share of inverted (MONOCHROME1) images.
    age_years, sex
        Force the demographics (demo studies); drawn when None.

    Returns
    -------
    Case
    """
    age = _sample_age(rng) if age_years is None else float(age_years)
    sex = (("M", "F")[int(rng.integers(2))]) if sex is None else sex
    parts = list(BODY_PARTS)
    body_part = str(rng.choice(parts, p=list(BODY_PARTS.values())))
    # Individual scatter around the population mean (about 12 % SD) keeps BMD
    # a weak, not a decisive, cue to age.
    bmd = float(np.clip(mean_bmd(age, sex) * math.exp(rng.normal(0.0, 0.15)), 0.3, 1.5))
    closure = physis_closure_age(sex) + rng.normal(0.0, 0.8)
    physes_open = age < closure
    # Park-Harris lines: common in the young, fading with remodelling in later life.
    p_arrest = float(np.interp(age, [3.0, 40.0, 70.0], [0.75, 0.6, 0.05]))
    arrest = int(rng.integers(1, 4)) if rng.random() < p_arrest else 0
    p_scar = float(np.interp(age, [18, 50, 80], [0.5, 0.4, 0.15]))
    scar = (not physes_open) and rng.random() < p_scar
    canal = rng.random() < (0.45 if age >= 18.0 else 0.1)

    is_fracture = bool(rng.random() < prevalence) if fracture is None else bool(fracture)
    kind = site = None
    incomplete = False
    gap = angle = displacement = band = 0.0
    if is_fracture:
        # Insufficiency fractures need fragile bone: a sizeable share in the
        # older, low-BMD population, almost none in the young. They look like
        # growth-arrest lines, which are common in the young.
        p_scl = 0.0
        if age >= 50.0:
            p_scl = float(np.clip((1.1 - bmd) / 0.35, 0.0, 1.0)) * 0.85
        kind = "sclerotic" if rng.random() < p_scl else "lucent"
        if kind == "lucent":
            # Each age has its look-alike: in adults a transverse fracture at
            # the level of the closed physis (across both bones of a forearm or
            # leg, like a both-bone fracture) looks like the open physes of a
            # child; in children a greenstick-like crack through one cortex
            # looks like an adult's nutrient canal.
            p_physeal, p_incomplete = (0.0, 0.35) if physes_open else (0.8, 0.05)
            draw = rng.random()
            if draw < p_physeal:
                site = "physeal"
                gap = float(rng.uniform(1.0, 2.5))
                angle = float(rng.uniform(-5.0, 5.0))
                displacement = 0.0 if rng.random() < 0.8 else float(rng.uniform(0.3, 1.0))
            else:
                site = "metaphysis" if rng.random() < 0.45 else "shaft"
                if draw < p_physeal + p_incomplete:
                    incomplete = True
                    gap = float(rng.uniform(0.5, 1.0))
                    angle = float(rng.uniform(35.0, 65.0)) * (1 if rng.random() < 0.5 else -1)
                else:
                    gap = float(rng.uniform(0.8, 2.2))
                    # Children's complete fractures are mostly oblique; a
                    # transverse line near a child's bone end is the physis.
                    transverse = rng.random() < (0.15 if physes_open else 0.45)
                    angle = float(
                        rng.uniform(-10.0, 10.0) if transverse else rng.uniform(-45.0, 45.0)
                    )
                    displacement = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.3, 3.0))
        else:
            site = "metaphysis" if rng.random() < 0.7 else "shaft"
            band = float(rng.uniform(1.2, 3.5))
            angle = float(rng.uniform(-10.0, 10.0))

    low, high = field_range_mm
    rows_mm = float(rng.uniform(low, high))
    cols_mm = float(rng.uniform(low, min(high, rows_mm + 20.0)))
    return Case(
        age_years=age,
        sex=sex,
        body_part=body_part,
        bmd=bmd,
        physes_open=bool(physes_open),
        growth_arrest_lines=arrest,
        physeal_scar=bool(scar),
        nutrient_canal=bool(canal),
        fracture=is_fracture,
        fracture_kind=kind,
        fracture_site=site,
        fracture_incomplete=incomplete,
        fracture_gap_mm=gap,
        fracture_angle_deg=angle,
        displacement_mm=displacement,
        band_mm=band,
        spacing_mm=float(spacing_choices[int(rng.integers(len(spacing_choices)))]),
        field_mm=(rows_mm, cols_mm),
        photometric="MONOCHROME1" if rng.random() < monochrome1_fraction else "MONOCHROME2",
        dose=float(math.exp(rng.uniform(math.log(0.5), math.log(2.0)))),
        contrast=float(rng.uniform(0.8, 1.2)),
    )


# --------------------------------------------------------------------------
# Small numerical helpers
# --------------------------------------------------------------------------


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling with Pillow (antialiased when shrinking)."""
    if arr.shape == shape:
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    out = img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.float32)  # a writable copy


def _fast_len(n: int) -> int:
    """Smallest 5-smooth number >= n (FFT sizes with only factors 2, 3, 5 are fast)."""
    best = 1 << max(n - 1, 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _gaussian_fft(arr: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing by FFT on a small grid (edge-padded to limit wrap-around)."""
    pad = int(math.ceil(3 * sigma_px))
    padded = np.pad(arr, pad, mode="edge")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return out[pad:-pad, pad:-pad].astype(np.float32)


def _band(dist: np.ndarray, half_width: float | np.ndarray, px: float) -> np.ndarray:
    """Antialiased band |dist| < half_width (1 inside, 0 outside, ramp over a pixel)."""
    return np.clip((half_width - np.abs(dist)) / px + 0.5, 0.0, 1.0)


def _wiggle(
    rng: np.random.Generator, t: np.ndarray, amp: float, wavelengths: tuple[float, float]
) -> np.ndarray:
    """A smooth random 1-D profile (sum of three sinusoids) evaluated at ``t`` (mm)."""
    out = np.zeros_like(t)
    for _ in range(3):
        lam = rng.uniform(*wavelengths)
        out += rng.uniform(0.3, 1.0) * amp * np.sin(2 * np.pi * t / lam + rng.uniform(0, 2 * np.pi))
    return out / 1.6


def _oriented_texture(
    rng: np.random.Generator, shape: tuple[int, int], px: float, theta: float
) -> np.ndarray:
    """Band-passed noise elongated along the bone axis (trabecular pattern), unit SD.

    Trabeculae in long bones run mostly along the axis, so the texture's
    correlation length is longer along the axis (~6-10 mm) than across it
    (~1.7-2.5 mm).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[0], d=px).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=px).astype(np.float32)[None, :]
    # Frequency components along (fu) and across (fv) the bone axis.
    c, s = math.cos(theta), math.sin(theta)
    fu = fy * c + fx * s
    fv = -fy * s + fx * c
    rho = np.sqrt((fu * 3.0) ** 2 + fv**2)
    f0 = rng.uniform(0.4, 0.6)  # cycles/mm across the axis
    kernel = np.exp(-(((rho - f0) / 0.2) ** 2)) * (1.0 - np.exp(-((rho / 0.08) ** 2)))
    tex = np.fft.irfft2(np.fft.rfft2(white) * kernel.astype(np.complex64), s=shape)
    tex = tex.astype(np.float32)
    return tex / max(float(tex.std()), 1e-6)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

# Shaft radius (mm) ranges of the bones of each body part, first bone first,
# and the soft-tissue margin around the bones (mm).
_ANATOMY: dict[str, dict[str, object]] = {
    "FOREARM": {"radii": ((6.0, 8.0), (5.0, 6.5)), "gap": (3.0, 9.0), "margin": (9.0, 20.0)},
    "LEG": {"radii": ((11.0, 14.5), (5.0, 7.0)), "gap": (5.0, 14.0), "margin": (14.0, 32.0)},
    "ARM": {"radii": ((10.0, 13.0),), "gap": (0.0, 0.0), "margin": (18.0, 36.0)},
}


@dataclass
class _Bone:
    """Geometry of one long bone in the limb's (u along, v across) frame (mm)."""

    v0: float  # centreline offset
    kappa: float  # curvature (1/mm)
    u_lo: float  # proximal tip (smaller u)
    u_hi: float  # distal tip
    radius: float  # shaft outer radius
    flare: float  # relative widening at the ends
    flare_len: float  # decay length of the flare (mm)
    cortex: float  # shaft cortical thickness (mm)
    epi_len: float  # tip-to-physis distance (mm)
    epi_scale: float  # epiphysis radius relative to the metaphysis (children)

    def centre(self, u: np.ndarray | float) -> np.ndarray | float:
        return self.v0 + 0.5 * self.kappa * u * u


def _tip_profile(d: np.ndarray, cap: float) -> np.ndarray:
    """Rounded end: radius factor sqrt(1 - (1 - d/cap)^2) over the last ``cap`` mm."""
    x = np.clip(d / cap, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - (1.0 - x) ** 2, 0.0, 1.0))


def _window_slices(region: np.ndarray, pad_px: int) -> tuple[slice, slice] | None:
    """Bounding slices of a boolean region (grown by ``pad_px``), or None when empty."""
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(region.any(axis=0))
    n_r, n_c = region.shape
    return (
        slice(max(rows[0] - pad_px, 0), min(rows[-1] + pad_px + 1, n_r)),
        slice(max(cols[0] - pad_px, 0), min(cols[-1] + pad_px + 1, n_c)),
    )


def render(
    case: Case,
    rng: np.random.Generator,
    *,
    finding_rng: np.random.Generator | None = None,
    acquisition_rng: np.random.Generator | None = None,
    fracture_drawn: bool = True,
    healing: Healing | None = None,
    tilt_deg: float = 0.0,
) -> Rendered:
    """Render ``case`` to 12-bit stored values.

    With the keyword arguments at their defaults, everything is drawn from
    ``rng``, and ``render(case, rng)`` is what it has always been: the same
    draws, in the same order, and the same pixels. The keyword arguments
    serve follow-up studies of one patient (:mod:`training.synthetic.followup`):
    two renders of one case with generators seeded alike for the anatomy
    (``rng``) and the fracture (``finding_rng``) show the same bones,
    texture, soft tissue and look-alikes, and the same fracture where drawn.

    Parameters
    ----------
    case
        What to render (see :func:`sample_case`).
    rng
        Source of the anatomy: the limb's tilt, bones, texture, soft tissue,
        physes, scars, growth-arrest lines and nutrient canals; and of
        everything else unless given its own generator below.
    finding_rng
        Source of the fracture's draws: its place along the bone, step-off
        direction, irregularity, depth and density. ``None``: ``rng``.
    acquisition_rng
        Source of the "for presentation" processing, the tone curve and
        window, and the quantum noise. ``None``: ``rng``.
    fracture_drawn
        ``False`` places the case's fracture and makes all its draws (so the
        other draws are those made with it drawn, bar the rare structure a
        step-off would have moved out of its window) but leaves the image
        without it: no line, no step-off, ``truth_box`` None, no
        fracture structure and no ``site`` in ``details``. What the fracture
        would replace stays left out (the physeal scar where a physeal-level
        line goes).
    healing
        Draw the fracture healing (:class:`Healing`); ``None``: acute. Needs
        a fracture (``case.fracture``) that is drawn.
    tilt_deg
        Added to the limb's drawn tilt on the detector (degrees).

    Returns
    -------
    Rendered
        ``case`` is the case passed in, even where its fracture is not drawn.
    """
    if healing is not None and not (case.fracture and fracture_drawn):
        raise ValueError("healing needs a fracture that is drawn")
    look = _Look(rng if finding_rng is None else finding_rng, bool(fracture_drawn),
                 _ACUTE if healing is None else healing)
    acquisition = rng if acquisition_rng is None else acquisition_rng
    spacing = case.spacing_mm
    height, width = case.field_mm
    out_shape = (max(round(height / spacing), 8), max(round(width / spacing), 8))
    ws = max(spacing, _WORK_MM)
    shape = (max(round(height / ws), 8), max(round(width / ws), 8))
    # Work-grid pixel size (mm) along each axis, exact for the rounded grid.
    wy, wx = height / shape[0], width / shape[1]
    px = 0.5 * (wy + wx)

    theta = math.radians(float(rng.uniform(-25.0, 25.0)) + tilt_deg)
    ct, st = math.cos(theta), math.sin(theta)
    yy = ((np.arange(shape[0], dtype=np.float32) + 0.5) * wy - height / 2)[:, None]
    xx = ((np.arange(shape[1], dtype=np.float32) + 0.5) * wx - width / 2)[None, :]
    u = (yy * ct + xx * st).astype(np.float32)
    v = (-yy * st + xx * ct).astype(np.float32)

    bones, details = _place_bones(case, rng, height, width, theta)
    frac = None
    if case.fracture:
        frac = _place_fracture(case, look.rng, bones, str(details["visible_end"]), height, width,
                               theta)
        if look.drawn:
            details.update({"site": frac["site"], "fractured_bones": sorted(frac["u"])})

    # Trabecular texture on a fixed 0.5 mm grid (its pass band ends below
    # 1 cycle/mm), so that it is the same at every output spacing.
    tex_shape = (max(round(height / _TEXTURE_MM), 8), max(round(width / _TEXTURE_MM), 8))
    fft_shape = (_fast_len(tex_shape[0]), _fast_len(tex_shape[1]))
    texture = _oriented_texture(rng, fft_shape, _TEXTURE_MM, theta)
    texture = _resize(texture[: tex_shape[0], : tex_shape[1]], shape)
    bmd, contrast = case.bmd, case.contrast
    # Excess attenuation over soft tissue per mm (soft tissue = 1.0 per mm,
    # scaled later): cortex and trabecular bone; density raises both and the
    # contrast of the trabecular pattern.
    mu_cortex = 1.35 * (0.55 + 0.45 * bmd) * contrast
    mu_trab = 0.55 * bmd**1.5 * contrast
    tex_amp = 0.25 + 0.25 * min(bmd, 1.3)

    bone_att = np.zeros(shape, np.float32)
    box = None
    structures: list[tuple[str, tuple[float, float, float, float]]] = []
    scale = (out_shape[0] / shape[0], out_shape[1] / shape[1])
    for index, bone in enumerate(bones):
        # Each bone is computed only within its bounding window.
        win = _bone_window(bone, u, v)
        if win is None:
            continue
        frac_u = frac["u"].get(index) if frac is not None else None
        att, fmask, found = _render_bone(
            case,
            rng,
            look,
            bone,
            u[win],
            v[win],
            texture[win],
            px,
            (mu_cortex, mu_trab, tex_amp),
            frac_u,
            frac["end"] if frac is not None and frac_u is not None else None,
        )
        bone_att[win] += att
        origin = (win[0].start, win[1].start)
        if fmask is not None:
            box = _union(box, _mask_box(fmask, scale, origin))
        for kind, (r0, c0, r1, c1) in found:
            structures.append(
                (
                    kind,
                    (
                        (origin[0] + r0) * scale[0],
                        (origin[1] + c0) * scale[1],
                        (origin[0] + r1) * scale[0],
                        (origin[1] + c1) * scale[1],
                    ),
                )
            )
    bone_att += _render_joint_partners(rng, bones, u, v, mu_cortex, mu_trab, texture, tex_amp)

    soft = _render_soft_tissue(case, rng, bones, u, v, shape, px)
    # Line integral in arbitrary log units: soft tissue ~0.02/mm.
    atten = 0.02 * (soft + bone_att)
    # Landmarks on the middle row, in output pixels: the densest bone and
    # the first direct-exposure (air) pixel, if any. Used by tests.
    mid = shape[0] // 2
    details["bone_px"] = _to_out(mid, int(np.argmax(bone_att[mid])), scale)
    air = np.flatnonzero(atten[mid] <= 1e-6)
    details["air_px"] = _to_out(mid, int(air[0]), scale) if air.size else None
    if spacing <= _WORK_MM:
        # Detector blur (~0.15 mm): a 1-2-1 kernel on the work grid.
        atten = _blur121(atten)
    processed, sigma = _present(case, acquisition, atten, (wy, wx))
    value, sigma, window = _tone_map(case, acquisition, processed, sigma)

    # To the output grid, then per-pixel quantum noise.
    value = _resize(value, out_shape)
    sigma = _resize(sigma, out_shape)
    value += sigma * acquisition.standard_normal(out_shape, dtype=np.float32)
    stored = np.clip(np.rint(value), 0, _MAX_STORED).astype(np.uint16)
    if case.photometric == "MONOCHROME1":
        # Inverted: white (bone) is the minimum stored value.
        np.subtract(_MAX_STORED, stored, out=stored)
        window = (_MAX_STORED - window[0], window[1])
    details["theta_deg"] = math.degrees(theta)
    details["structures"] = structures
    return Rendered(
        stored=stored,
        spacing_mm=(height / out_shape[0], width / out_shape[1]),
        photometric=case.photometric,
        window=window,
        truth_box=box,
        case=case,
        details=details,
    )


def _union(
    a: tuple[float, float, float, float] | None, b: tuple[float, float, float, float] | None
) -> tuple[float, float, float, float] | None:
    """Bounding box of two boxes, either of which may be None."""
    if a is None or b is None:
        return a if b is None else b
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _to_out(row: int, col: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Work-grid pixel to the output pixel holding its centre."""
    return int((row + 0.5) * scale[0]), int((col + 0.5) * scale[1])


def _bone_window(bone: _Bone, u: np.ndarray, v: np.ndarray) -> tuple[slice, slice] | None:
    """Work-grid window holding a bone (with room for flare, step-off and the tip cap)."""
    step = 8
    us, vs = u[::step, ::step], v[::step, ::step]
    reach = bone.radius * (1 + bone.flare) + 8.0
    inside = (
        (np.abs(vs - bone.centre(us)) < reach) & (us > bone.u_lo - 8.0) & (us < bone.u_hi + 8.0)
    )
    win = _window_slices(inside, 1)
    if win is None:
        return None
    n_r, n_c = u.shape
    return (
        slice(win[0].start * step, min(win[0].stop * step, n_r)),
        slice(win[1].start * step, min(win[1].stop * step, n_c)),
    )


def _blur121(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[1:-1, :] = 0.25 * a[:-2, :] + 0.5 * a[1:-1, :] + 0.25 * a[2:, :]
    res = out.copy()
    res[:, 1:-1] = 0.25 * out[:, :-2] + 0.5 * out[:, 1:-1] + 0.25 * out[:, 2:]
    return res


def _place_bones(
    case: Case, rng: np.random.Generator, height: float, width: float, theta: float
) -> tuple[list[_Bone], dict[str, object]]:
    """Bone sizes and positions along the limb axis; which ends are in the field."""
    anatomy = _ANATOMY[case.body_part]
    radii = anatomy["radii"]
    # Children have somewhat smaller bones; body size varies more than that,
    # so size is only a weak hint of age.
    size = float(np.interp(case.age_years, [3.0, 16.0], [0.92, 1.0])) * rng.normal(1.0, 0.09)
    half_len = height / 2 / max(math.cos(theta), 0.5)
    length = rng.uniform(1.1, 1.6) * max(height, 200.0)
    # Which end of the first bone is inside (or just outside) the field. Drawn
    # the same way with and without fracture: geometry must not hint at the label.
    which = str(rng.choice(["none", "lo", "hi"], p=[0.1, 0.45, 0.45]))
    if which == "none":
        centre = rng.uniform(-0.1, 0.1) * length
        length = max(length, 2 * half_len + 60.0 + 2 * abs(centre))
        u_lo, u_hi = centre - length / 2, centre + length / 2
    else:
        # Tip between 35 % into the field and 12 mm beyond its edge.
        tip = rng.uniform(0.3 * half_len, half_len + 12.0)
        if which == "hi":
            u_hi, u_lo = tip, tip - length
        else:
            u_lo, u_hi = -tip, -tip + length
    bones = []
    offset = rng.uniform(-15.0, 15.0)
    side = 1.0 if rng.random() < 0.5 else -1.0
    v_next = offset
    for k, (r_lo, r_hi) in enumerate(radii):
        radius = rng.uniform(r_lo, r_hi) * size
        if k == 0:
            v0 = offset
        else:
            gap = rng.uniform(*anatomy["gap"])
            v0 = v_next + side * (bones[0].radius * (1 + bones[0].flare * 0.3) + gap + radius)
        # Bone ends are staggered so that physes of the two bones do not line up.
        shift = 0.0 if k == 0 else rng.uniform(-20.0, 20.0)
        flare = rng.uniform(0.45, 0.9)
        bones.append(
            _Bone(
                v0=v0,
                kappa=rng.uniform(-1.0, 1.0) / 3000.0,
                u_lo=u_lo + shift + (0.0 if k == 0 else rng.uniform(-5.0, 5.0)),
                u_hi=u_hi + shift,
                radius=radius,
                flare=flare,
                flare_len=rng.uniform(14.0, 24.0) * size,
                # Cortical thickness follows BMD (endosteal resorption in the elderly).
                cortex=radius * rng.uniform(0.22, 0.3) * min(case.bmd, 1.25) ** 1.1,
                epi_len=radius * (1 + flare) * rng.uniform(0.8, 1.2),
                epi_scale=float(np.interp(case.age_years, [3.0, 10.0], [0.9, 1.0])),
            )
        )
    return bones, {"visible_end": which, "n_bones": len(bones)}


def _place_fracture(
    case: Case,
    rng: np.random.Generator,
    bones: list[_Bone],
    end: str,
    height: float,
    width: float,
    theta: float,
) -> dict[str, object]:
    """Where the fracture goes: inside the field and inside the 256 mm the model sees.

    Metaphyseal and physeal-level fractures need a bone end in view (``end``);
    without one, or when their place falls outside the view, the fracture
    goes to the shaft. Returns ``site``, ``end`` (physeal level only) and
    ``u``: the fracture's position along the axis for each fractured bone.
    """
    lim_y = min(height, 256.0) / 2 - 22.0
    lim_x = min(width, 256.0) / 2 - 22.0
    ct, st = math.cos(theta), math.sin(theta)

    def in_view(bone: _Bone, uf: float) -> bool:
        vf = float(bone.centre(uf))
        return abs(uf * ct - vf * st) < lim_y and abs(uf * st + vf * ct) < lim_x

    def from_tip(bone: _Bone, depth: float) -> float:
        return bone.u_hi - depth if end == "hi" else bone.u_lo + depth

    site = case.fracture_site or "shaft"
    if site == "physeal" and end != "none":
        # At the physis level of every bone whose physis is in view.
        at = {k: from_tip(b, b.epi_len) for k, b in enumerate(bones)}
        at = {k: uf for k, uf in at.items() if in_view(bones[k], uf)}
        if 0 in at:
            return {"site": "physeal", "end": end, "u": at}
        site = "metaphysis"
    if site == "metaphysis" and end != "none":
        # Between the physis and ~30 mm into the metaphysis: where the physis
        # and growth-arrest lines are.
        for _ in range(60):
            index = 0 if (len(bones) == 1 or rng.random() < 0.65) else 1
            uf = from_tip(bones[index], bones[index].epi_len + rng.uniform(1.0, 30.0))
            if in_view(bones[index], uf):
                return {"site": "metaphysis", "end": None, "u": {index: uf}}
    for _ in range(200):
        index = 0 if (len(bones) == 1 or rng.random() < 0.65) else 1
        bone = bones[index]
        uf = float(rng.uniform(-lim_y - 40, lim_y + 40))
        if min(uf - bone.u_lo, bone.u_hi - uf) < bone.epi_len + 20.0:
            continue
        if in_view(bone, uf):
            return {"site": "shaft", "end": None, "u": {index: uf}}
    # Could not honour the constraints (tiny field): centre of the first bone.
    return {"site": "shaft", "end": None, "u": {0: 0.0}}


def _render_bone(
    case: Case,
    rng: np.random.Generator,
    look: _Look,
    bone: _Bone,
    u: np.ndarray,
    v: np.ndarray,
    texture: np.ndarray,
    px: float,
    mu: tuple[float, float, float],
    frac_u: float | None,
    physeal_end: str | None,
) -> tuple[np.ndarray, np.ndarray | None, list[tuple[str, tuple[int, int, int, int]]]]:
    """Excess attenuation of one bone, its fracture mask, and the line-like structures drawn.

    ``u``, ``v`` and ``texture`` cover the bone's window; ``mu`` holds the
    cortical and trabecular attenuation and the texture amplitude.
    ``frac_u`` is where this bone is fractured (None: intact), at the level
    of the physis of ``physeal_end`` ("lo"/"hi") for physeal-level fractures.
    The structures are (kind, box) with boxes in window pixels (row0, col0,
    row1, col1); kinds are listed in :data:`STRUCTURE_KINDS`. The anatomy
    comes from ``rng``, the fracture from ``look`` (its generator; where
    it is not drawn, its draws are made and its mask is None).
    """
    mu_cortex, mu_trab, tex_amp = mu
    frng, healing = look.rng, look.healing
    centre = bone.centre(u)
    dv = v - centre
    s_frac = None
    fmask = None
    found: list[tuple[str, tuple[int, int, int, int]]] = []

    def note(kind: str, m: np.ndarray, win: tuple[slice, slice]) -> None:
        local = _local_box((m > 0.3) & inside[win], win)
        if local is not None:
            found.append((kind, local))

    if frac_u is not None:
        uf = frac_u
        phi = math.radians(case.fracture_angle_deg)
        # Signed distance to the fracture line through (uf, centre(uf)).
        s_frac = (u - uf) * math.cos(phi) - dv * math.sin(phi)
        if case.displacement_mm > 0:
            # Step-off: the distal fragment slides across the axis.
            sign = 1.0 if frng.random() < 0.5 else -1.0
            if look.drawn:
                step = np.clip(s_frac / px + 0.5, 0.0, 1.0)
                dv = dv - sign * case.displacement_mm * step

    d_lo = u - bone.u_lo
    d_hi = bone.u_hi - u
    near = np.exp(-np.clip(d_lo, 0, None) / bone.flare_len) + np.exp(
        -np.clip(d_hi, 0, None) / bone.flare_len
    )
    near = np.minimum(near, 1.0)
    cap = bone.radius * (1 + bone.flare) * 0.7
    r_out = bone.radius * (1 + bone.flare * near)
    r_out = r_out * _tip_profile(d_lo, cap) * _tip_profile(d_hi, cap)
    if bone.epi_scale < 1.0:
        epi = (d_lo < bone.epi_len) | (d_hi < bone.epi_len)
        r_out = np.where(epi, r_out * bone.epi_scale, r_out)
    # Thin cortex at the metaphysis/epiphysis, thick along the shaft.
    thick = bone.cortex * (1.0 - 0.8 * near) + 0.35
    r_in = np.maximum(r_out - thick, 0.0)
    dv2 = dv * dv
    outer = np.sqrt(np.maximum(r_out * r_out - dv2, 0.0))
    inner = np.sqrt(np.maximum(r_in * r_in - dv2, 0.0))
    cortex_path = 2.0 * (outer - inner)
    medulla_path = 2.0 * inner
    # Cancellous bone fills the ends; the diaphysis is mostly marrow.
    trab_density = 0.3 + 0.7 * np.minimum(
        np.exp(-np.clip(d_lo, 0, None) / 28.0) + np.exp(-np.clip(d_hi, 0, None) / 28.0), 1.0
    )
    medulla = mu_trab * trab_density * (1.0 + tex_amp * texture) * medulla_path
    cortex = mu_cortex * cortex_path
    inside = outer > 0
    pad = int(math.ceil(4.0 / px))

    # Physes (open) or physeal scars (closed) at each end; a physeal-level
    # fracture is drawn like an open physis, which is what makes it a mimic.
    for end_name, end_d in (("lo", d_lo), ("hi", d_hi)):
        region = inside & (np.abs(end_d - bone.epi_len) < 6.0)
        win = _window_slices(region, pad)
        if win is None:
            continue
        d_w, dv_w = end_d[win], dv[win]
        r_here = bone.radius * (1 + bone.flare)
        # Wavy, gently curved plate (real physes undulate).
        pos = (
            bone.epi_len
            + _wiggle(rng, dv_w, 0.6, (4.0, 12.0))
            + rng.uniform(-1.5, 1.5) * (dv_w / r_here) ** 2
        )
        if case.physes_open:
            width_mm = rng.uniform(1.0, 2.5)
            if case.age_years > physis_closure_age(case.sex) - 2.0:
                width_mm *= 0.6  # narrowing before closure
            m = _band(d_w - pos, width_mm / 2, px)
            # Cartilage replaces bone across the whole width, cortex included.
            keep = 1.0 - 0.9 * m
            medulla[win] *= keep
            cortex[win] *= keep
            note("physis", m, win)
        elif case.physeal_scar and physeal_end != end_name:
            # (A fracture along the old plate replaces the scar: a sclerotic
            # rim beside it would tell adult from child at a glance.)
            m = _band(d_w - pos, rng.uniform(0.3, 0.6), px)
            medulla[win] += m * medulla_path[win] * mu_trab * rng.uniform(0.4, 1.0)
            note("physeal_scar", m, win)
        if physeal_end == end_name:
            m = _band(d_w - pos - frng.uniform(-0.5, 1.0),
                      case.fracture_gap_mm * healing.width / 2, px)
            keep = 1.0 - frng.uniform(0.75, 0.95) * healing.contrast * m
            if look.drawn:
                medulla[win] *= keep
                cortex[win] *= keep
                fmask = np.zeros(u.shape, dtype=bool)
                fmask[win] = (m > 0.3) & inside[win]
                note("physeal_fracture", m, win)

    # Growth-arrest lines: thin sclerotic lines in the medulla, parallel to the physis.
    for end_d in (d_lo, d_hi):
        for _ in range(case.growth_arrest_lines):
            at = bone.epi_len + rng.uniform(3.0, 35.0)
            region = inside & (np.abs(end_d - at) < 3.0)
            win = _window_slices(region, pad)
            if win is None:
                continue
            pos = at + _wiggle(rng, dv[win], 0.6, (3.0, 10.0))
            # 1-3 mm, as dense as an insufficiency band: only age tells them apart.
            m = _band(end_d[win] - pos, rng.uniform(0.5, 1.5), px * rng.uniform(1.0, 2.5))
            gain = rng.uniform(0.8, 1.8) * mu_trab / max(case.bmd, 0.5) ** 0.5
            medulla[win] += m * medulla_path[win] * gain
            cortex[win] *= 1.0 + 0.15 * m
            note("arrest_line", m, win)

    # Nutrient canal: thin oblique lucency through one cortex only.
    if case.nutrient_canal:
        un = rng.uniform(-60.0, 60.0)
        side = 1.0 if rng.random() < 0.5 else -1.0
        # 35-65 degrees from transverse, like a greenstick crack (its mimic).
        slope = math.tan(math.radians(rng.uniform(35.0, 65.0))) * (1 if rng.random() < 0.5 else -1)
        region = inside & (np.abs(u - un) < 20.0)
        win = _window_slices(region, pad)
        if win is not None:
            sd = side * dv[win]
            r_w = r_out[win]
            in_cortex = np.clip((sd - (r_w - thick[win] * rng.uniform(1.2, 2.0))) / px, 0.0, 1.0)
            line = (u[win] - un) - slope * (sd - r_w)
            m = _band(line * math.cos(math.atan(slope)), rng.uniform(0.25, 0.45), px) * in_cortex
            keep = 1.0 - rng.uniform(0.6, 0.95) * m
            cortex[win] *= keep
            medulla[win] *= keep
            note("nutrient_canal", m, win)

    if s_frac is not None and physeal_end is None:
        geometry = (bone, u, dv, s_frac, inside, px, pad, medulla, cortex, medulla_path, mu_trab)
        line = _apply_fracture(case, frng, *geometry,
                               strength=healing.contrast if look.drawn else 0.0)
        if healing.callus > 0 and case.fracture_kind == "lucent":
            # Callus: a sclerotic band along the healing line (its mask is not the line's).
            band = case.fracture_gap_mm + float(frng.uniform(1.0, 3.0))
            _apply_fracture(replace(case, fracture_kind="sclerotic", band_mm=band), frng,
                            *geometry, strength=healing.callus)
        if look.drawn:
            fmask = line
            if case.fracture_kind == "sclerotic":
                kind = "sclerotic_fracture"
            else:
                kind = "incomplete_fracture" if case.fracture_incomplete else "fracture_line"
            full = (slice(0, u.shape[0]), slice(0, u.shape[1]))
            note(kind, fmask.astype(np.float32), full)
    return cortex + medulla, fmask, found


def _apply_fracture(
    case: Case,
    rng: np.random.Generator,
    bone: _Bone,
    u: np.ndarray,
    dv: np.ndarray,
    s_frac: np.ndarray,
    inside: np.ndarray,
    px: float,
    pad: int,
    medulla: np.ndarray,
    cortex: np.ndarray,
    medulla_path: np.ndarray,
    mu_trab: float,
    *,
    strength: float = 1.0,
) -> np.ndarray:
    """Draw the fracture into ``medulla``/``cortex`` in place; return its mask (work grid).

    ``strength`` scales its contrast (a healing line keeps a share of it);
    at 0 the draws are made and the arrays are left alone.
    """
    phi = math.radians(case.fracture_angle_deg)
    reach = 8.0 if case.fracture_kind == "lucent" else 6.0
    region = inside & (np.abs(s_frac) < reach)
    mask = np.zeros(u.shape, dtype=bool)
    win = _window_slices(region, pad)
    if win is None:
        return mask
    s_w, dv_w = s_frac[win], dv[win]
    along = (u[win] * math.sin(phi) + dv_w * math.cos(phi)).astype(np.float32)
    if case.fracture_kind == "lucent":
        s_irr = s_w + _wiggle(rng, along, 0.5, (2.0, 9.0))
        half = case.fracture_gap_mm / 2 * (1.0 + 0.35 * _wiggle(rng, along, 1.0, (3.0, 12.0)))
        m = _band(s_irr, np.maximum(half, 0.2), px)
        if case.fracture_incomplete:
            # Through one cortex only (greenstick-like), as a nutrient canal.
            side = 1.0 if rng.random() < 0.5 else -1.0
            cut = bone.radius * rng.uniform(0.5, 0.8)
            m = m * np.clip((side * dv_w - cut) / px, 0.0, 1.0)
        depth = rng.uniform(0.6, 0.95)
        if strength > 0:
            keep = 1.0 - depth * strength * m
            medulla[win] *= keep
            cortex[win] *= keep
    else:
        s_irr = s_w + _wiggle(rng, along, 0.8, (3.0, 10.0))
        m = _band(s_irr, case.band_mm / 2, px * 2.5)
        gain = rng.uniform(0.8, 1.8) * mu_trab / max(case.bmd, 0.5) ** 0.5 * strength
        if strength > 0:
            medulla[win] += m * medulla_path[win] * gain
            cortex[win] *= 1.0 + 0.25 * strength * m
        if rng.random() < 0.3 and strength > 0:  # a faint fracture line inside the band
            keep = 1.0 - 0.4 * strength * _band(s_irr, 0.3, px)
            medulla[win] *= keep
            cortex[win] *= keep
    mask[win] = (m > 0.3) & inside[win]
    return mask


def _render_joint_partners(
    rng: np.random.Generator,
    bones: list[_Bone],
    u: np.ndarray,
    v: np.ndarray,
    mu_cortex: float,
    mu_trab: float,
    texture: np.ndarray,
    tex_amp: float,
) -> np.ndarray:
    """The bone across the joint beyond each end tip (an ellipsoid of cancellous bone)."""
    out = np.zeros(u.shape, np.float32)
    u_min, u_max = float(u.min()), float(u.max())
    for bone in bones[:1]:
        for tip, direction in ((bone.u_lo, -1.0), (bone.u_hi, 1.0)):
            if not (u_min - 5.0 < tip < u_max):
                continue
            if rng.random() < 0.25:
                continue
            a_u = rng.uniform(12.0, 25.0)
            a_v = bone.radius * (1 + bone.flare) * rng.uniform(1.0, 1.6)
            cu = tip + direction * (rng.uniform(2.5, 6.0) + a_u)
            cv = float(bone.centre(tip)) + rng.uniform(-0.3, 0.3) * a_v
            q = ((u - cu) / a_u) ** 2 + ((v - cv) / a_v) ** 2
            depth = a_v * 0.8
            outer = 2 * depth * np.sqrt(np.clip(1.0 - q, 0.0, None))
            inner = 2 * 0.88 * depth * np.sqrt(np.clip(1.0 - q / 0.88**2, 0.0, None))
            out += mu_cortex * 0.6 * (outer - inner) + mu_trab * (1 + tex_amp * texture) * inner
    return out


def _render_soft_tissue(
    case: Case,
    rng: np.random.Generator,
    bones: list[_Bone],
    u: np.ndarray,
    v: np.ndarray,
    shape: tuple[int, int],
    px: float,
) -> np.ndarray:
    """Projected soft-tissue thickness (mm) with a subcutaneous fat layer."""
    anatomy = _ANATOMY[case.body_part]
    lo = min(b.v0 - b.radius * (1 + b.flare) for b in bones)
    hi = max(b.v0 + b.radius * (1 + b.flare) for b in bones)
    margin = rng.uniform(*anatomy["margin"])
    centre = 0.5 * (lo + hi) + rng.uniform(-3.0, 3.0) + 0.5 * bones[0].kappa * u * u
    half = (0.5 * (hi - lo) + margin) * (
        1.0 + 0.08 * np.sin(2 * np.pi * u / rng.uniform(150, 300) + rng.uniform(0, 2 * np.pi))
    )
    depth = half * rng.uniform(0.7, 0.95)
    q = ((v - centre) / half) ** 2
    total = 2 * depth * np.sqrt(np.clip(1.0 - q, 0.0, None))
    fat = rng.uniform(2.0, 9.0)
    qi = ((v - centre) / np.maximum(half - fat, 1.0)) ** 2
    inner = 2 * (depth - fat) * np.sqrt(np.clip(1.0 - qi, 0.0, None))
    # Fat attenuates ~15 % less than muscle.
    soft = total - 0.15 * (total - inner)
    # Gentle large-scale inhomogeneity (muscle bellies, vessels).
    small = rng.standard_normal((max(shape[0] // 40, 4), max(shape[1] // 40, 4))).astype(np.float32)
    soft *= 1.0 + 0.03 * _resize(small, shape)
    return soft


def _present(
    case: Case, rng: np.random.Generator, atten: np.ndarray, spacing: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """ "For presentation" processing on the work grid, and the noise SD map.

    The large-kernel subtraction mimics the dynamic-range compression of
    vendor processing: soft-tissue thickness is flattened, bone edges stay.
    """
    shape = atten.shape
    coarse_shape = (
        max(round(shape[0] * spacing[0] / _COARSE_MM), 4),
        max(round(shape[1] * spacing[1] / _COARSE_MM), 4),
    )
    coarse = _resize(atten, coarse_shape)
    low = _resize(_gaussian_fft(coarse, rng.uniform(6.0, 12.0) / _COARSE_MM), shape)
    processed = atten - rng.uniform(0.35, 0.65) * low
    # Quantum noise: SD in log units ~ 1/sqrt(photons) grows with attenuation;
    # per pixel it scales with 1/spacing so that the noise per mm^2 does not
    # depend on the pixel size (sigma at 1 mm ~ 0.004-0.015 here).
    per_mm = 0.006 / math.sqrt(case.dose)
    sigma = per_mm / case.spacing_mm * np.exp(np.minimum(atten, 4.0) * 0.5)
    return processed, sigma.astype(np.float32)


def _tone_map(
    case: Case, rng: np.random.Generator, processed: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Tone curve to 12-bit values, the noise SD in those units, and a VOI window.

    Done on the work grid (before upsampling) because it is smooth; the
    window covers air to the densest bone with some jitter, as a vendor's
    default window does.
    """
    sample = processed[::4, ::4]
    p_lo, p_hi = (float(x) for x in np.percentile(sample, [1.0, 99.8]))
    span = max(p_hi - p_lo, 1e-6)
    y = np.clip((processed - p_lo) / span, 0.0, 1.2)
    # A mild power curve, as in vendor look-up tables.
    gamma = rng.uniform(0.85, 1.15)
    offset = rng.uniform(0.04, 0.12)
    gain = rng.uniform(0.7, 0.85)
    curve = y**gamma
    value = (offset + gain * curve) * _MAX_STORED
    slope = gain * _MAX_STORED * gamma * np.maximum(y, 0.05) ** (gamma - 1.0) / span
    center = (offset + gain * rng.uniform(0.42, 0.56)) * _MAX_STORED
    width = gain * rng.uniform(0.95, 1.2) * _MAX_STORED
    window = (round(float(center), 1), round(float(width), 1))
    return value.astype(np.float32), (sigma * slope).astype(np.float32), window


def _local_box(mask: np.ndarray, win: tuple[slice, slice]) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, col0, row1, col1) of a sub-window mask in window pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r, c = win[0].start, win[1].start
    return (r + int(rows[0]), c + int(cols[0]), r + int(rows[-1]) + 1, c + int(cols[-1]) + 1)


def _mask_box(
    mask: np.ndarray, scale: tuple[float, float], origin: tuple[int, int]
) -> tuple[float, float, float, float] | None:
    """Bounding box of a window mask in continuous output pixel coordinates.

    ``origin`` is the window's top-left work-grid pixel, ``scale`` the
    output pixels per work pixel.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = origin
    return (
        float((r0 + rows[0]) * scale[0]),
        float((c0 + cols[0]) * scale[1]),
        float((r0 + rows[-1] + 1) * scale[0]),
        float((c0 + cols[-1] + 1) * scale[1]),
    )
