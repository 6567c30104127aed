"""Synthetic head CT: an analytic head phantom in millimetres and Hounsfield units.

The phantom is a set of closed-form shapes evaluated point by point, so any
axial slice at any pixel spacing is rendered on its own: a 1,000-slice series
never needs the volume in memory, and the same head looks the same at 0.45 mm
(a scanner) and at 0.9 mm (fast training renders).

What is modelled, and why
-------------------------
* Geometry: an ellipsoidal cranial cavity (flattened below the orbito-meatal
  plane) whose size follows sex and age (growth to ~10 years), with a
  stepped skull base (anterior, middle, posterior fossae); the head may be
  off-centre, rotated (yaw) and tilted (pitch) in the scanner.
* Skull: inner and outer tables (cortical bone, 1,300-1,900 HU) around the
  diploe (400-900 HU), thinner in children; a solid skull base with
  sphenoid and mastoid air cells below the cavity floor; scalp (skin and a
  subcutaneous fat layer); air (-1,000 HU) outside.
* Brain: grey matter (~40 HU) in the cortex and deep nuclei, white matter
  (~30 HU; ~22 HU before myelination completes at ~2 years), a smooth
  low-frequency variation, CSF (~5 HU) in a subarachnoid rim, sulci (the
  zero set of a band-limited random field, so gyri are 3-D consistent
  between slices), the interhemispheric and Sylvian fissures, the basal
  cisterns and the ventricles. Rim, sulci, fissures and ventricles widen
  with age (atrophy, with individual scatter).
* Dura: the falx and the superior sagittal sinus, denser and thicker in
  young children (high haematocrit, unmyelinated brain: the
  "pseudo-subarachnoid" look), where it mimics an interhemispheric subdural.
* Calcifications (pineal, choroid plexus, falx plaques, basal ganglia,
  scattered granulomas; 60-600 HU, 2.5-8 mm): rare under 20 years, common
  from 40. Once averaged over a slice many land at 60-150 HU, like blood;
  faint, sometimes one-sided basal ganglia calcification and granulomas at
  the grey-white junction sit exactly where haematomas and shear injuries
  do.
* Haemorrhage (the label): intraparenchymal (a lobulated blob, often deep,
  with perihaematomal oedema; or, mostly in the young, several small
  contusion / shear-injury foci that look like calcifications), subdural
  (a crescent along the inner table, not crossing the midline, or a band
  along the falx), epidural (a biconvex lens), subarachnoid (blood in
  sulci, fissures and cisterns) and intraventricular (dependent, in the
  occipital horns); about 0.5-60 mL. The mix depends on age. In the elderly
  more than half of the convexity subdurals are subacute and isodense
  (35-52 HU), recognisable mainly by the missing CSF rim that an atrophic
  brain should have: a young brain without a rim is normal, an old one is
  not. With the calcifications and the dense young falx, this is where age
  helps; the haemorrhage prevalence itself does not depend on age.
* Acquisition, applied by :func:`render_slice`: through-plane partial volume
  (sub-slices averaged over the slice thickness), beam-hardening cupping
  near the inner table and streaks from the skull base, and correlated
  quantum noise whose level follows the dose and the slice thickness.
  Anatomy is evaluated on a grid of at most :data:`PHANTOM_GRID_MM` (0.9 mm)
  and upsampled to finer output grids (0.45 mm scanner pixels), noise is
  added at the output grid: the model works at 1 mm, and a 512 x 512 slice
  costs a quarter as much.

Coordinates are DICOM patient coordinates (LPS): x to the patient's left,
y posterior, z superior, in mm. Everything random is drawn in
:func:`sample_head` from the generator passed in; rendering is a pure
function of the :class:`Head` and the slice geometry (the noise is seeded
from the head and the slice), so the same call gives the same pixels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

AIR_HU = -1000.0
LESION_KINDS: tuple[str, ...] = ("iph", "sdh", "edh", "sah", "ivh")
# Through-plane sampling step (mm) for partial volume: a slice of thickness T
# averages ceil(T / SUB_SLICE_MM) evenly spaced planes.
SUB_SLICE_MM = 1.25
# Volume limits of a sampled haemorrhage (mL).
VOLUME_RANGE_ML: tuple[float, float] = (0.5, 60.0)
# The phantom's finest detail (mm): finer output grids are evaluated on a
# grid of about this size and upsampled (bilinear). The model sees 1 mm
# pixels, so this costs it nothing and makes 0.45 mm slices 4x cheaper.
PHANTOM_GRID_MM = 0.9
_REF_NOISE_HU = 3.6  # noise SD in brain at 5 mm and reference dose
_NOISE_CORR_MM = 0.55  # correlation length of the reconstruction-kernel noise

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Blob:
    """An ellipsoidal inclusion (calcification) in head coordinates.

    Attributes
    ----------
    kind
        ``"pineal"``, ``"choroid"``, ``"falx"``, ``"basal_ganglia"`` or
        ``"granuloma"``.
    centre, radii
        Centre and semi-axes (mm).
    hu
        Density (HU).
    """

    kind: str
    centre: Vec3
    radii: Vec3
    hu: float


@dataclass(frozen=True)
class Lesion:
    """One haemorrhage, in head coordinates.

    Attributes
    ----------
    kind
        One of :data:`LESION_KINDS`.
    hu
        Density of the blood (HU).
    centre
        ``iph``: centre of the blob; ``sah``: centre of the affected region;
        ``sdh``/``edh``: unit direction (in the cavity's normalised
        coordinates) of the thickest point; ``ivh``: unused (0, 0, 0).
    size
        ``iph``: semi-axes (mm); ``sdh``/``edh``: (maximum thickness mm,
        half-angle rad, profile exponent); ``sah``: (radius mm, 0, 0);
        ``ivh``: (dependent level y in mm, side: -1 right, +1 left, 0 both, 0).
    lobulation
        ``iph``: (amplitude, phase 1, phase 2) of the boundary lobulation.
    isodense
        Subacute subdural at grey-matter density (the hard case).
    variant
        ``"contusion"`` for one of several small traumatic foci (``iph``);
        ``"interhemispheric"`` for a subdural along the falx (then ``centre``
        is (side: -1, 0 both, +1; y; z of the centre) and ``size`` is
        (maximum thickness, half-length in y, half-height in z)).
    """

    kind: str
    hu: float
    centre: Vec3
    size: Vec3
    lobulation: Vec3 = (0.0, 0.0, 0.0)
    isodense: bool = False
    variant: str = ""


@dataclass(frozen=True)
class Head:
    """A synthetic patient's head and how it lies in the scanner.

    Attributes
    ----------
    age_years, sex
        Demographics (``"M"`` or ``"F"``).
    axes
        Inner-table semi-axes (a: left-right, b: antero-posterior, c_up:
        vertex, c_down: below the orbito-meatal plane), mm.
    floor
        Cavity floor heights (anterior, middle, posterior fossa), mm.
    skull_mm, diploe_fraction, scalp_mm
        Skull thickness at the vertex, share of it that is diploe, scalp.
    bone_hu
        (cortical, diploe) densities.
    atrophy
        0 (young adult) to ~1.3 (marked atrophy); drives the CSF spaces.
    csf_rim_mm, sulcal_width_mm, fissure_mm, ventricle_scale
        CSF spaces that follow from atrophy.
    grey_hu, white_hu, csf_hu, dura_hu
        Tissue densities.
    falx_mm
        Thickness of the falx (thick and dense in infants and young children).
    gyri
        (n, 4) rows of (kx, ky, kz, phase) of the random field whose zero
        set draws the sulci (wave numbers in rad/mm).
    calcifications
        Physiological calcifications (hyperdense mimics).
    lesions
        Haemorrhages; empty for a normal head.
    position
        Scanner coordinates of the head's origin (mm).
    yaw_deg, pitch_deg
        Rotation about z, then tilt about x (chin down positive).
    dose
        Relative dose (1 = reference); noise SD scales with 1/sqrt(dose).
    cupping_hu
        Beam-hardening overshoot just inside the inner table.
    seed
        Seeds the per-slice noise and streaks.
    """

    age_years: float
    sex: str
    axes: tuple[float, float, float, float]
    floor: Vec3
    skull_mm: float
    diploe_fraction: float
    scalp_mm: float
    bone_hu: tuple[float, float]
    atrophy: float
    csf_rim_mm: float
    sulcal_width_mm: float
    fissure_mm: float
    ventricle_scale: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    dura_hu: float
    falx_mm: float
    gyri: tuple[tuple[float, float, float, float], ...]
    calcifications: tuple[Blob, ...]
    lesions: tuple[Lesion, ...]
    position: Vec3
    yaw_deg: float
    pitch_deg: float
    dose: float
    cupping_hu: float
    seed: int

    @property
    def haemorrhage(self) -> bool:
        """The label: at least one haemorrhage."""
        return bool(self.lesions)

    def z_range_mm(self) -> tuple[float, float]:
        """Scanner z from just below the posterior fossa floor to above the vertex.

        A routine head CT covers this range (foramen magnum to vertex).
        """
        a, b, c_up, c_down = self.axes
        t = np.linspace(0.0, 2.0 * math.pi, 73)
        u = np.linspace(-1.0, 1.0, 41)
        tt, uu = np.meshgrid(t, u)
        s = np.sqrt(1.0 - uu**2)
        outer = self.skull_mm * 1.3 + self.scalp_mm
        x = (a + outer) * s * np.cos(tt)
        y = (b + outer) * s * np.sin(tt)
        z = np.where(uu >= 0, (c_up + outer) * uu, (c_down + outer) * uu)
        zs = self._to_scanner(x.ravel(), y.ravel(), z.ravel())[2]
        # Lowest cavity point: the posterior fossa floor at the back.
        fy = np.linspace(-b, b, 41)
        fz = np.asarray([_floor_z(self.floor, v) for v in fy])
        floor_pts = self._to_scanner(np.zeros_like(fy), fy, fz)[2]
        return float(floor_pts.min() - 6.0), float(zs.max())

    def _rotation(self) -> np.ndarray:
        """Head-to-scanner rotation (yaw about z, then pitch about x)."""
        cy, sy = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        cp, sp = math.cos(math.radians(self.pitch_deg)), math.sin(math.radians(self.pitch_deg))
        yaw = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
        pitch = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
        return pitch @ yaw

    def _to_scanner(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self._rotation()
        px, py, pz = self.position
        return (
            r[0, 0] * x + r[0, 1] * y + r[0, 2] * z + px,
            r[1, 0] * x + r[1, 1] * y + r[1, 2] * z + py,
            r[2, 0] * x + r[2, 1] * y + r[2, 2] * z + pz,
        )

    def _to_head(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self._rotation().T.astype(np.float32)
        px, py, pz = self.position
        dx, dy, dz = x - np.float32(px), y - np.float32(py), z - np.float32(pz)
        return (
            r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz,
            r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz,
            r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz,
        )


# --------------------------------------------------------------------------
# Population model
# --------------------------------------------------------------------------


def head_scale(age_years: float) -> float:
    """Linear head size relative to an adult: ~0.84 at 1 year, ~0.98 at 10 years."""
    return 1.0 - 0.2 * math.exp(-max(age_years, 0.0) / 4.5)


def mean_atrophy(age_years: float) -> float:
    """Population mean atrophy: none before ~35 years, ~1 at 85 years."""
    return max(age_years - 35.0, 0.0) / 50.0


def calcification_prevalence(age_years: float, sex: str) -> float:
    """Probability of having physiological intracranial calcifications.

    About 3 % under 15 years, 6 % at 20, 30 % at 30, 75 % at 40 and 85 %
    from 50; a little higher in men (pineal and falx calcification are).
    The steep rise falls in adult years in which the brain itself hardly
    changes, so the image alone says little about which side of it a
    patient is on.
    """
    p = 0.03 + 0.84 / (1.0 + math.exp(-(age_years - 33.0) / 5.0))
    return min(p * (1.1 if sex == "M" else 0.95), 0.95)


def lesion_kind_weights(age_years: float) -> dict[str, float]:
    """Haemorrhage type mix by age (children: extra-axial trauma; elderly: subdurals)."""
    if age_years < 18.0:
        return {"iph": 0.35, "sdh": 0.2, "edh": 0.25, "sah": 0.15, "ivh": 0.05}
    if age_years < 60.0:
        return {"iph": 0.4, "sdh": 0.25, "edh": 0.1, "sah": 0.15, "ivh": 0.1}
    return {"iph": 0.25, "sdh": 0.5, "edh": 0.0, "sah": 0.15, "ivh": 0.1}


def sample_age(rng: np.random.Generator) -> float:
    """Children, adults and the elderly in roughly equal measure (1-95 years)."""
    band = int(rng.choice(3, p=[0.25, 0.40, 0.35]))
    low, high = ((1.0, 18.0), (18.0, 60.0), (60.0, 95.0))[band]
    return float(rng.uniform(low, high))


def sample_head(
    rng: np.random.Generator,
    *,
    haemorrhage: bool | None = None,
    prevalence: float = 0.5,
    age_years: float | None = None,
    sex: str | None = None,
    lesion_kind: str | None = None,
    volume_ml: float | None = None,
) -> Head:
    """Draw one head from the synthetic population.

    Parameters
    ----------
    rng
        Source of all randomness.
    haemorrhage
        Force the label; ``None`` draws it with probability ``prevalence``.
    prevalence
        Haemorrhage probability when ``haemorrhage`` is None. It does not
        depend on age or sex, so metadata helps only through the images.
    age_years, sex
        Force the demographics; drawn when None.
    lesion_kind, volume_ml
        Force the haemorrhage type and (approximate) volume.

    Returns
    -------
    Head
    """
    age = sample_age(rng) if age_years is None else float(age_years)
    sex = ("M", "F")[int(rng.integers(2))] if sex is None else sex
    scale = head_scale(age) * (1.0 if sex == "M" else 0.955) * math.exp(rng.normal(0, 0.035))
    a = 68.0 * scale * math.exp(rng.normal(0, 0.03))
    b = 86.0 * scale * math.exp(rng.normal(0, 0.03))
    c_up = 72.0 * scale * math.exp(rng.normal(0, 0.03))
    # Below the orbito-meatal plane the skull walls go on down (face, neck);
    # the cavity is closed by the floor, not by the ellipsoid.
    c_down = 120.0 * scale
    floor = (
        -20.0 * scale + rng.normal(0, 2),
        -38.0 * scale + rng.normal(0, 2),
        -50.0 * scale + rng.normal(0, 2),
    )
    maturity = 1.0 - math.exp(-age / 8.0)
    skull = (3.0 + 4.5 * maturity) * math.exp(rng.normal(0, 0.12))
    # Wide individual scatter: atrophy is a loose clue to age, not a clock.
    atrophy = max(mean_atrophy(age) + rng.normal(0.0, 0.15 + 0.15 * min(age / 60, 1)), 0.0)
    # Myelination: white matter is darker in infants, contrast settles by ~3 years.
    white = 30.0 - 8.0 * math.exp(-age / 1.2) - 2.0 * min(atrophy, 1.0) + rng.normal(0, 1.0)
    grey = 40.0 + rng.normal(0, 1.2)
    # Young children: high haematocrit and unmyelinated brain make the falx
    # and the sinuses look dense and thick (the "pseudo-subarachnoid" pitfall).
    young = math.exp(-age / 5.0)
    dura = 47.0 + 22.0 * young + rng.normal(0, 2.0)
    falx = 1.0 + 2.2 * young * math.exp(rng.normal(0, 0.2))
    k_mean = 2.0 * math.pi / 26.0
    gyri = []
    for _ in range(12):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = k_mean * math.exp(rng.normal(0, 0.15))
        gyri.append((*(float(v) for v in direction * k), float(rng.uniform(0, 2 * math.pi))))
    head = Head(
        age_years=age,
        sex=sex,
        axes=(a, b, c_up, c_down),
        floor=tuple(float(v) for v in floor),  # type: ignore[arg-type]
        skull_mm=skull,
        diploe_fraction=float(np.clip(0.15 + 0.35 * maturity + rng.normal(0, 0.08), 0.05, 0.6)),
        scalp_mm=float(rng.uniform(4.0, 7.5)),
        bone_hu=(float(rng.uniform(1300, 1900)), float(rng.uniform(400, 900))),
        atrophy=float(atrophy),
        csf_rim_mm=float(0.3 + 3.2 * atrophy),
        sulcal_width_mm=float(0.5 + 2.3 * atrophy),
        fissure_mm=float(1.2 + 3.5 * atrophy),
        ventricle_scale=float((0.85 + 0.9 * atrophy) * math.exp(rng.normal(0, 0.1))),
        grey_hu=float(grey),
        white_hu=float(white),
        csf_hu=float(rng.uniform(2.0, 9.0)),
        dura_hu=float(dura),
        falx_mm=float(falx),
        gyri=tuple(gyri),
        calcifications=(),
        lesions=(),
        position=(float(rng.normal(0, 5)), float(rng.normal(0, 6)), 0.0),
        yaw_deg=float(rng.normal(0, 4)),
        pitch_deg=float(rng.normal(4, 7)),
        dose=float(math.exp(rng.uniform(math.log(0.5), math.log(2.0)))),
        cupping_hu=float(rng.uniform(1.0, 7.0)),
        seed=int(rng.integers(2**31)),
    )
    head = replace(head, calcifications=_sample_calcifications(rng, head))
    positive = bool(rng.random() < prevalence) if haemorrhage is None else bool(haemorrhage)
    if positive:
        kind = lesion_kind
        if kind is None:
            weights = lesion_kind_weights(head.age_years)
            kinds = list(weights)
            kind = str(rng.choice(kinds, p=np.asarray([weights[k] for k in kinds])))
        if kind == "iph" and volume_ml is None and rng.random() < contusion_share(age):
            lesions = _sample_contusions(rng, head)
        else:
            lesions = (_sample_lesion(rng, head, kind, volume_ml),)
        head = replace(head, lesions=lesions)
    return head


def contusion_share(age_years: float) -> float:
    """Share of intraparenchymal haemorrhage that is multifocal (contusions, shear injury).

    Trauma dominates in the young; hypertensive single haematomas in the old.
    """
    return float(np.interp(age_years, [15.0, 30.0, 45.0, 60.0], [0.7, 0.6, 0.15, 0.05]))


def _sample_contusions(rng: np.random.Generator, head: Head) -> tuple[Lesion, ...]:
    """2-6 small haemorrhagic foci (2.5-4.5 mm) at the grey-white junction and deep.

    Diffuse axonal injury and small contusions of young trauma patients look
    like the small calcifications of older people, and some sit where those
    do (basal ganglia, thalamus, splenium next to the pineal): without the
    age, a small dense focus is ambiguous.
    """
    s = head.axes[0] / 68.0
    foci: list[Lesion] = []
    for _ in range(int(rng.integers(2, 7))):
        side = 1.0 if rng.random() < 0.5 else -1.0
        if rng.random() < 0.5:
            site = int(rng.integers(3))
            if site == 0:  # lentiform nucleus
                c = (side * 20.0 * s, -2.0 * s, 2.0 * s)
            elif site == 1:  # thalamus
                c = (side * 11.0 * s, 12.0 * s, 6.0 * s)
            else:  # corpus callosum, splenium or genu
                c = (0.0, float(rng.choice([20.0, -22.0])) * s, 16.0 * s)
            c = tuple(float(x + rng.normal(0, 3.0)) for x in c)
        else:
            c = _junction_point(rng, head)
        r = float(rng.uniform(2.5, 4.5))
        radii = tuple(float(r * q) for q in np.exp(rng.normal(0, 0.15, size=3)))
        foci.append(Lesion("iph", float(rng.uniform(55, 80)), c, radii,  # type: ignore[arg-type]
                           (float(rng.uniform(0.0, 0.1)), 0.0, 0.0), variant="contusion"))
    total = sum(4.0 / 3.0 * math.pi * math.prod(f.size) for f in foci) / 1000.0
    if total < VOLUME_RANGE_ML[0]:
        # Keep the total at or above the smallest haemorrhage we call.
        k = (VOLUME_RANGE_ML[0] / total) ** (1.0 / 3.0)
        foci = [replace(f, size=tuple(x * k for x in f.size)) for f in foci]
    return tuple(foci)


def _sample_calcifications(rng: np.random.Generator, head: Head) -> tuple[Blob, ...]:
    if rng.random() >= calcification_prevalence(head.age_years, head.sex):
        return ()
    s, v = head.axes[0] / 68.0, head.ventricle_scale
    older = min(max((head.age_years - 30.0) / 40.0, 0.0), 1.0)
    out: list[Blob] = []

    def blob(kind: str, centre: Vec3, diameter: float, hu: float) -> Blob:
        r = diameter / 2.0
        jitter = np.exp(rng.normal(0, 0.2, size=3))
        return Blob(kind, centre, tuple(float(r * j) for j in jitter), hu)  # type: ignore[arg-type]

    sites = ["pineal", "choroid", "falx", "basal_ganglia", "granuloma"]
    p_site = [0.7, 0.5, 0.25 + 0.3 * older, 0.3 + 0.4 * older, 0.35]
    for site, p in zip(sites, p_site, strict=True):
        if rng.random() >= p:
            continue
        if site == "pineal":
            c = (rng.normal(0, 0.7), 20.0 * s + rng.normal(0, 2), 4.0 * s + rng.normal(0, 2))
            out.append(blob(site, c, rng.uniform(2.5, 8.0), rng.uniform(150, 600)))
        elif site == "choroid":
            for side in (-1.0, 1.0):
                if rng.random() < 0.85:
                    c = (side * (14.0 + 4.0 * v), 26.0 * s + rng.normal(0, 2), 10.0 * s)
                    out.append(blob(site, c, rng.uniform(2.5, 7.5), rng.uniform(120, 450)))
        elif site == "falx":
            for _ in range(int(rng.integers(1, 4))):
                c = (rng.normal(0, 0.4), rng.uniform(-50, 40) * s, rng.uniform(15, 55) * s)
                r = Blob(site, c, (0.8, float(rng.uniform(2, 6)), float(rng.uniform(1, 4))),
                         float(rng.uniform(150, 600)))
                out.append(r)
        elif site == "basal_ganglia":
            # Often faint and not always symmetric: where hypertensive bleeds
            # and deep contusions sit, at blood-like density.
            sides = (-1.0, 1.0) if rng.random() < 0.5 else (float(rng.choice([-1.0, 1.0])),)
            for side in sides:
                c = (side * 20.0 * s + rng.normal(0, 2), -2.0 * s + rng.normal(0, 3),
                     2.0 * s + rng.normal(0, 3))
                out.append(blob(site, c, rng.uniform(3.0, 8.0), rng.uniform(60, 130)))
        else:
            # Calcified granulomas: small, scattered at the grey-white junction,
            # where shear injuries of the young are too.
            for _ in range(int(rng.integers(1, 4))):
                out.append(blob(site, _junction_point(rng, head), rng.uniform(3.0, 7.0),
                                rng.uniform(70, 180)))
    return tuple(out)


def _junction_point(rng: np.random.Generator, head: Head) -> Vec3:
    """A random point 10-20 mm under the inner table, upper brain (grey-white junction)."""
    a, b, c_up, _ = head.axes
    u = rng.normal(size=3)
    u[2] = abs(u[2]) + 0.2
    u /= np.linalg.norm(u)
    r_mean = (a * b * c_up) ** (1.0 / 3.0)
    f = 1.0 - rng.uniform(10.0, 20.0) / r_mean
    return (float(u[0] * a * f), float(u[1] * b * f), float(u[2] * c_up * f))


def _sample_lesion(
    rng: np.random.Generator, head: Head, kind: str | None, volume_ml: float | None
) -> Lesion:
    if kind is None:
        weights = lesion_kind_weights(head.age_years)
        kinds = list(weights)
        kind = str(rng.choice(kinds, p=np.asarray([weights[k] for k in kinds])))
    lo, hi = VOLUME_RANGE_ML
    v_ml = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if volume_ml is None \
        else float(volume_ml)
    v = v_ml * 1000.0  # mm^3
    a, b, c_up, _ = head.axes
    s = a / 68.0
    if kind == "iph":
        # Deep (hypertensive: putamen, thalamus), lobar, or posterior fossa.
        site = rng.choice(3, p=[0.5, 0.38, 0.12])
        r = (3.0 * v / (4.0 * math.pi)) ** (1.0 / 3.0)
        aspect = np.exp(rng.normal(0, 0.2, size=3))
        aspect /= np.prod(aspect) ** (1.0 / 3.0)
        radii = tuple(float(r * q) for q in aspect)
        side = 1.0 if rng.random() < 0.5 else -1.0
        if site == 0:
            if rng.random() < 0.6:
                c = (side * 22.0 * s, -2.0 * s, 3.0 * s)
            else:
                c = (side * 11.0 * s, 12.0 * s, 6.0 * s)
        elif site == 1:
            # Somewhere in the hemisphere, deep enough to stay in the brain.
            u = rng.normal(size=3)
            u[2] = abs(u[2]) + 0.3
            u[0] = side * abs(u[0]) + side * 0.3
            u /= np.linalg.norm(u)
            depth = rng.uniform(0.35, 0.75) - r / 150.0
            c = (u[0] * a * depth, u[1] * b * depth, u[2] * c_up * depth)
        else:
            c = (side * 20.0 * s, 38.0 * s, head.floor[2] + 14.0 * s)
        c = tuple(float(x + rng.normal(0, 2.0)) for x in c)
        lob = (float(rng.uniform(0.05, 0.2)), float(rng.uniform(0, 6.3)),
               float(rng.uniform(0, 6.3)))
        return Lesion("iph", float(rng.uniform(55, 85)), c, radii, lob)  # type: ignore[arg-type]
    if kind == "sdh" and rng.random() < float(np.interp(head.age_years, [5, 20], [0.35, 0.15])):
        # Interhemispheric subdural: a band along the falx, one or both sides
        # (the classic infant pattern, which a dense young falx mimics).
        thick = float(np.clip(rng.uniform(1.5, 3.0) + 5.0 * (v_ml / hi) ** 0.7, 1.5, 9.0))
        half_z = float(rng.uniform(15.0, 30.0) * s)
        half_y = float(np.clip(v / (math.pi * half_z * (2.0 / 3.0) * thick), 10.0, 70.0 * s))
        side = float(rng.choice([-1.0, 0.0, 1.0], p=[0.35, 0.3, 0.35]))
        centre = (side, float(rng.uniform(-25, 25) * s), float(rng.uniform(30, 50) * s))
        return Lesion("sdh", float(rng.uniform(55, 80)), centre, (thick, half_y, half_z),
                      variant="interhemispheric")  # type: ignore[arg-type]
    if kind in ("sdh", "edh"):
        side = 1.0 if rng.random() < 0.5 else -1.0
        # Over the convexity: lateral, anywhere front to back, above the floor.
        u = np.array(
            [side * rng.uniform(0.55, 1.0), rng.uniform(-0.7, 0.7), rng.uniform(-0.1, 0.8)]
        )
        u /= np.linalg.norm(u)
        r_mean = (a * b * c_up) ** (1.0 / 3.0)
        if kind == "sdh":
            # Small subdurals are thin films spread over the convexity.
            thick = float(np.clip(rng.uniform(1.8, 3.5) + 10.0 * (v_ml / hi) ** 0.7, 2.0, 16.0))
            mean_factor, exponent = 0.72, 0.35
        else:
            thick = float(np.clip(rng.uniform(6.0, 10.0) + 16.0 * (v_ml / hi) ** 0.6, 5.0, 30.0))
            mean_factor, exponent = 0.55, 0.5
        cap = v / (mean_factor * thick)
        one_minus_cos = min(cap / (2.0 * math.pi * r_mean**2), 0.75)
        half_angle = math.acos(1.0 - one_minus_cos)
        isodense = False
        if kind == "sdh":
            # Subacute subdurals (isodense to grey matter) are an elderly
            # problem: bridging veins tear with minor trauma and go unnoticed.
            p_iso = float(np.interp(head.age_years, [40, 65, 85], [0.05, 0.5, 0.65]))
            isodense = bool(rng.random() < p_iso)
            hu = float(rng.uniform(35, 52)) if isodense else float(rng.uniform(55, 82))
        else:
            hu = float(rng.uniform(60, 90))
        return Lesion(kind, hu, tuple(float(x) for x in u), (thick, half_angle, exponent),
                      isodense=isodense)  # type: ignore[arg-type]
    if kind == "sah":
        where = rng.choice(3, p=[0.4, 0.3, 0.3])
        if where == 0:  # basal cisterns
            c = (rng.normal(0, 5), 6.0 * s + rng.normal(0, 5), -12.0 * s + rng.normal(0, 4))
        elif where == 1:  # Sylvian fissure
            side = 1.0 if rng.random() < 0.5 else -1.0
            c = (side * 0.75 * a, -5.0 * s + rng.normal(0, 6), 3.0 * s + rng.normal(0, 4))
        else:  # convexity sulci
            u = rng.normal(size=3)
            u[2] = abs(u[2]) + 0.4
            u /= np.linalg.norm(u)
            c = (u[0] * a * 0.85, u[1] * b * 0.85, u[2] * c_up * 0.85)
        # Blood fills ~10-20 % of a sphere's volume (the CSF share).
        radius = float(np.clip((3.0 * v / (4.0 * math.pi * 0.15)) ** (1 / 3), 10.0, 45.0))
        return Lesion("sah", float(rng.uniform(50, 75)), tuple(float(x) for x in c),
                      (radius, 0.0, 0.0))  # type: ignore[arg-type]
    if kind == "ivh":
        side = float(rng.choice([-1.0, 0.0, 1.0], p=[0.35, 0.3, 0.35]))
        # Supine patient: blood settles in the posterior (dependent) horns.
        level = float(rng.uniform(8.0, 30.0) * s - 6.0 * (v_ml / hi))
        return Lesion("ivh", float(rng.uniform(55, 80)), (0.0, 0.0, 0.0), (level, side, 0.0))
    raise ValueError(f"unknown haemorrhage kind {kind!r}")


# --------------------------------------------------------------------------
# Point evaluation (head coordinates)
# --------------------------------------------------------------------------


def _floor_z(floor: Vec3, y: np.ndarray | float) -> np.ndarray:
    """Cavity floor height: anterior fossa high, posterior fossa low, smooth steps."""
    front, middle, back = floor
    y = np.asarray(y, np.float32)
    step_front = 1.0 / (1.0 + np.exp((y + 28.0) / 4.0))
    step_back = 1.0 / (1.0 + np.exp(-(y - 12.0) / 5.0))
    return (middle + (front - middle) * step_front + (back - middle) * step_back).astype(
        np.float32
    )


def _ellipsoid_depth(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, axes: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance (mm, positive inside) to the inner table, and rho.

    ``(1 - rho) * rho / |grad rho^2 / 2|`` is exact for a sphere and good to a
    few per cent for the mildly eccentric ellipsoids of a skull.
    """
    a, b, c_up, c_down = axes
    c = np.where(z >= 0, np.float32(c_up), np.float32(c_down))
    xa, yb, zc = x / a, y / b, z / c
    rho = np.sqrt(xa * xa + yb * yb + zc * zc)
    grad = np.sqrt((xa / a) ** 2 + (yb / b) ** 2 + (zc / c) ** 2) + np.float32(1e-6)
    return (1.0 - rho) * rho / grad, rho


def _in_ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Vec3, radii: Vec3,
    z_span: tuple[float, float] | None = None,
) -> np.ndarray:
    """Points inside an axis-aligned ellipsoid.

    ``z_span`` (min, max of ``z``) lets a plane that misses the ellipsoid
    skip the arithmetic: most inclusions are far from most slices.
    """
    if z_span is not None and (
        centre[2] + radii[2] < z_span[0] or centre[2] - radii[2] > z_span[1]
    ):
        return np.zeros(x.shape, bool)
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def _ventricles(
    head: Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_span: tuple[float, float]
) -> np.ndarray:
    """Lateral (frontal horns/bodies and atria/occipital horns), third and fourth ventricles."""
    s, v = head.axes[0] / 68.0, head.ventricle_scale
    out = np.zeros(x.shape, bool)
    for side in (-1.0, 1.0):
        out |= _in_ellipsoid(x, y, z, (side * (3.0 + 3.5 * v) * s, -8.0 * s, 14.0 * s),
                             (3.5 * v, 26.0 * s, 6.0 * v), z_span)
        out |= _in_ellipsoid(x, y, z, (side * (11.0 + 4.0 * v) * s, 24.0 * s, 9.0 * s),
                             (4.5 * v, 13.0 * s, 6.5 * v), z_span)
    out |= _in_ellipsoid(x, y, z, (0.0, 4.0 * s, 2.0 * s), (1.0 + 1.6 * v, 11.0 * s, 7.0 * s),
                         z_span)
    out |= _in_ellipsoid(x, y, z, (0.0, 36.0 * s, head.floor[2] + 16.0 * s),
                         (4.0 * v, 3.5 * v, 6.0 * s), z_span)
    return out


def _lesion_mask(
    head: Head,
    lesion: Lesion,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    depth: np.ndarray,
    csf: np.ndarray,
    ventricles: np.ndarray,
) -> np.ndarray:
    """Where ``lesion`` is, among points already known to be in the cranial cavity."""
    a, b, c_up, c_down = head.axes
    if lesion.kind == "iph":
        cx, cy, cz = lesion.centre
        rx, ry, rz = lesion.size
        dx, dy, dz = (x - cx) / rx, (y - cy) / ry, (z - cz) / rz
        r2 = dx * dx + dy * dy + dz * dz
        amp, p1, p2 = lesion.lobulation
        # Lobulated boundary: the radius varies with direction.
        norm = np.sqrt(r2) + np.float32(1e-6)
        wobble = 1.0 + amp * (np.sin(3.0 * np.arctan2(dy, dx) + p1) * (dz / norm)
                              + np.cos(2.0 * np.arctan2(dz, dx) + p2) * 0.7)
        return (r2 <= wobble * wobble) & (depth > 1.0)
    if lesion.variant == "interhemispheric":
        side, yc, zc = lesion.centre
        thick, half_y, half_z = lesion.size
        r2 = ((y - yc) / half_y) ** 2 + ((z - zc) / half_z) ** 2
        width = thick * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
        off = np.abs(x) - head.falx_mm / 2.0
        inside = (off > 0.0) & (off < width) & (depth > 0.0)
        if side != 0.0:
            inside &= (x * side) > 0.0
        return inside
    if lesion.kind in ("sdh", "edh"):
        thick, half_angle, exponent = lesion.size
        c = np.where(z >= 0, np.float32(c_up), np.float32(c_down))
        px, py, pz = x / a, y / b, z / c
        norm = np.sqrt(px * px + py * py + pz * pz) + np.float32(1e-6)
        ux, uy, uz = lesion.centre
        cos_t = (px * ux + py * uy + pz * uz) / norm
        theta = np.arccos(np.clip(cos_t, -1.0, 1.0))
        t = np.clip(1.0 - (theta / half_angle) ** 2, 0.0, 1.0)
        inside = (depth > 0.0) & (depth < thick * t**exponent)
        if lesion.kind == "sdh":
            # The falx stops a subdural at the midline.
            inside &= (x * np.sign(ux)) > 1.0
        return inside
    if lesion.kind == "sah":
        cx, cy, cz = lesion.centre
        r = lesion.size[0]
        near = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r
        return near & csf & ~ventricles
    if lesion.kind == "ivh":
        level, side, _ = lesion.size
        inside = ventricles & (y > level) & (z > head.floor[2] + 20.0)
        if side != 0.0:
            inside &= (x * side) > 0.0
        return inside
    raise ValueError(f"unknown haemorrhage kind {lesion.kind!r}")


def _evaluate(
    head: Head, x: np.ndarray, y: np.ndarray, z: np.ndarray, *, want_hu: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Noise-free HU and the lesion mask at points given in head coordinates.

    Returns
    -------
    hu
        float32 HU (None when ``want_hu`` is False).
    lesion
        bool, True inside any haemorrhage.
    """
    a, b, c_up, c_down = head.axes
    s = a / 68.0
    n = x.shape[0]
    lesion_out = np.zeros(n, bool)
    hu = np.full(n, AIR_HU, np.float32) if want_hu else None
    depth_ell, _ = _ellipsoid_depth(x, y, z, head.axes)
    # Skull thickness: thicker front and back, thinner over the temples.
    skull = head.skull_mm * (1.0 + 0.25 * (y / b) ** 2 - 0.3 * (x / a) ** 2)
    outer = skull + head.scalp_mm
    in_head = depth_ell > -outer
    fz = _floor_z(head.floor, y)
    above_floor = z - fz
    cavity = (depth_ell > 0.0) & (above_floor > 0.0)
    if hu is not None:
        cortical, diploe = head.bone_hu
        # Scalp: skin and galea around a subcutaneous fat layer.
        scalp = in_head & (depth_ell <= -skull)
        fat = scalp & (np.abs(depth_ell + skull + 0.5 * head.scalp_mm) < 0.22 * head.scalp_mm)
        hu[scalp] = 38.0
        hu[fat] = -85.0
        # Vault: inner table, diploe, outer table.
        bone = in_head & (depth_ell <= 0.0) & (depth_ell > -skull)
        table = (1.0 - head.diploe_fraction) / 2.0 * skull
        is_diploe = bone & (depth_ell < -table) & (depth_ell > -(skull - table))
        hu[bone] = cortical
        hu[is_diploe] = diploe
        # Below the cavity floor: skull base, then face and neck soft tissue
        # with sphenoid and mastoid air cells (sources of streaks).
        base = (depth_ell > 0.0) & (above_floor <= 0.0)
        hu[base] = np.where(above_floor[base] > -7.0, cortical * 0.8, 40.0)
        sphenoid = base & _in_ellipsoid(x, y, z, (0.0, -12.0 * s, head.floor[1] - 6.0),
                                        (12.0 * s, 10.0 * s, 7.0 * s))
        hu[sphenoid] = AIR_HU
        for side in (-1.0, 1.0):
            mastoid = base & _in_ellipsoid(x, y, z, (side * 0.8 * a, 20.0 * s, head.floor[1]),
                                           (8.0 * s, 10.0 * s, 9.0 * s))
            # Air cells in bone: a honeycomb, approximated by its mean.
            hu[mastoid] = -450.0
    idx = np.flatnonzero(cavity)
    if idx.size == 0:
        return hu, lesion_out
    cx, cy, cz = x[idx], y[idx], z[idx]
    depth = np.minimum(depth_ell[idx], above_floor[idx])
    # Gyri: the zero set of a band-limited random field; |F| / |grad F| is
    # about the distance to it.
    k = np.asarray(head.gyri, np.float32)
    shallow = depth < 26.0
    field = np.zeros(idx.size, np.float32)
    sx, sy, sz = cx[shallow], cy[shallow], cz[shallow]
    acc = np.zeros(sx.shape, np.float32)
    for kx, ky, kz, phase in k:
        acc += np.cos(kx * sx + ky * sy + kz * sz + phase)
    grad = float(np.sqrt(np.mean(np.sum(k[:, :3] ** 2, axis=1))))
    field[shallow] = np.abs(acc) / math.sqrt(k.shape[0] / 2.0) / grad
    field[~shallow] = 1e3
    sulcal_depth = 9.0 + 6.0 * s + 3.0 * head.atrophy
    sulcus = (field < head.sulcal_width_mm / 2.0) & (depth < sulcal_depth)
    rim = depth < head.csf_rim_mm
    fissure_region = (cz > (18.0 + 3.0 * head.ventricle_scale) * s) | (np.abs(cy) > 40.0 * s)
    fissure = (np.abs(cx) < (head.fissure_mm + head.falx_mm) / 2.0) & fissure_region
    falx = (np.abs(cx) < head.falx_mm / 2.0) & fissure_region
    # Sylvian fissure: a near-vertical sheet running from antero-lateral to
    # postero-medial, so an axial slice cuts it as an oblique line.
    sylvian = (
        (np.abs(np.abs(cx) * 0.45 + cy * 0.85 + 0.2 * cz + 4.0 * s
                + 2.5 * np.sin(cz / 6.0 + cx / 9.0)) < (1.0 + head.fissure_mm) / 2.0)
        & (np.abs(cx) > 0.38 * a)
        & (cz > -14.0 * s)
        & (cz < 16.0 * s)
        & (depth < 30.0)
    )
    mb = ((cx / (11.0 * s)) ** 2 + ((cy - 8.0 * s) / (10.0 * s)) ** 2)
    cistern_band = (1.0 + (1.0 + 0.8 * head.fissure_mm) / (10.0 * s)) ** 2
    cistern = (mb > 1.0) & (mb < cistern_band) & (cz < -3.0 * s) & (cz > head.floor[1] + 4.0)
    z_span = (float(cz.min()), float(cz.max()))
    vent = _ventricles(head, cx, cy, cz, z_span)
    csf = rim | sulcus | fissure | sylvian | cistern | vent
    csf &= ~falx
    lesion_in = np.zeros(idx.size, bool)
    lesion_hu = np.zeros(idx.size, np.float32)
    for lesion in head.lesions:
        m = _lesion_mask(head, lesion, cx, cy, cz, depth, csf, vent)
        lesion_in |= m
        lesion_hu[m] = lesion.hu
    lesion_out[idx] = lesion_in
    if hu is None:
        return None, lesion_out

    grey = (depth < head.csf_rim_mm + 2.8) | (
        (field < head.sulcal_width_mm / 2.0 + 2.8) & (depth < sulcal_depth + 2.8)
    )
    for side in (-1.0, 1.0):
        grey |= _in_ellipsoid(cx, cy, cz, (side * 10.0 * s, 10.0 * s, 6.0 * s),
                              (8.0 * s, 12.0 * s, 8.0 * s), z_span)  # thalamus
        grey |= _in_ellipsoid(cx, cy, cz, (side * 21.0 * s, -2.0 * s, 3.0 * s),
                              (5.5 * s, 13.0 * s, 8.0 * s), z_span)  # lentiform nucleus
        grey |= _in_ellipsoid(cx, cy, cz, (side * (9.0 + 3.5 * head.ventricle_scale) * s,
                                           -20.0 * s, 11.0 * s),
                              (4.0 * s, 7.0 * s, 7.0 * s), z_span)  # caudate head
    grey |= cz < head.floor[2] + 24.0 * s  # posterior fossa: cerebellum, mostly grey
    value = np.where(grey, np.float32(head.grey_hu), np.float32(head.white_hu))
    # Smooth variation (a few HU) and beam-hardening cupping near the inner table.
    value += 1.5 * np.sin(cx / 23.0 + head.seed % 7) * np.cos(cy / 31.0 + cz / 37.0)
    value += head.cupping_hu * np.exp(-depth / 3.5)
    value[csf] = head.csf_hu
    value[falx] = head.dura_hu
    # Superior sagittal sinus: a triangle under the vertex, midline.
    sss = (depth < 7.0) & (np.abs(cx) < 4.5 * (1.0 - depth / 7.0)) & (cz > 0.0)
    value[sss] = head.dura_hu + 3.0
    for blob in head.calcifications:
        value[_in_ellipsoid(cx, cy, cz, blob.centre, blob.radii, z_span)] = blob.hu
    for lesion in head.lesions:
        if lesion.kind == "iph" and lesion.size[0] * lesion.size[1] * lesion.size[2] > 700.0:
            # Perihaematomal oedema: a hypodense shell around larger haematomas.
            grown = replace(lesion, size=tuple(r * 1.35 + 2.0 for r in lesion.size))
            oedema = _lesion_mask(head, grown, cx, cy, cz, depth, csf, vent) & ~lesion_in
            value[oedema] = head.white_hu - 9.0
    # Blood is not uniform: clot retraction, mixing with CSF.
    texture = 3.0 * np.cos(cx / 3.1 + cy / 4.3) * np.sin(cz / 3.7 + cy / 5.3)
    value = np.where(lesion_in, lesion_hu + texture, value)
    hu[idx] = value
    return hu, lesion_out


# --------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------


def slice_origin(
    pixel_spacing_mm: float, rows: int, cols: int, centre_xy: tuple[float, float] = (0.0, 0.0)
) -> tuple[float, float]:
    """Scanner (x, y) of the centre of the top-left pixel for a field centred on ``centre_xy``.

    Rows run along +y (anterior at the top), columns along +x (the
    patient's right on the viewer's left): ImageOrientationPatient
    ``1\\0\\0\\0\\1\\0``.
    """
    x0 = centre_xy[0] - (cols - 1) / 2.0 * pixel_spacing_mm
    y0 = centre_xy[1] - (rows - 1) / 2.0 * pixel_spacing_mm
    return x0, y0


def sub_slice_offsets(thickness_mm: float) -> np.ndarray:
    """Offsets (mm) of the planes averaged for a slice of ``thickness_mm``."""
    n = max(1, math.ceil(thickness_mm / SUB_SLICE_MM - 1e-6))
    return ((np.arange(n) + 0.5) / n - 0.5) * thickness_mm


def _plane(
    head: Head,
    z_mm: float,
    pixel_spacing_mm: float,
    rows: int,
    cols: int,
    centre_xy: tuple[float, float],
    want_hu: bool,
) -> tuple[np.ndarray | None, np.ndarray]:
    """HU and lesion mask on one plane; only pixels near the head are evaluated."""
    x0, y0 = slice_origin(pixel_spacing_mm, rows, cols, centre_xy)
    a, b, c_up, _ = head.axes
    reach = max(a, b, c_up) + head.skull_mm * 1.3 + head.scalp_mm + 2.0
    px, py, _ = head.position
    c0 = max(int((px - reach - x0) / pixel_spacing_mm), 0)
    c1 = min(int((px + reach - x0) / pixel_spacing_mm) + 2, cols)
    r0 = max(int((py - reach - y0) / pixel_spacing_mm), 0)
    r1 = min(int((py + reach - y0) / pixel_spacing_mm) + 2, rows)
    hu = np.full((rows, cols), AIR_HU, np.float32) if want_hu else None
    mask = np.zeros((rows, cols), bool)
    if r1 <= r0 or c1 <= c0:
        return hu, mask
    xs = (x0 + np.arange(c0, c1) * pixel_spacing_mm).astype(np.float32)
    ys = (y0 + np.arange(r0, r1) * pixel_spacing_mm).astype(np.float32)
    # On a plane the map to head coordinates is affine in (row, column):
    # one outer sum per axis instead of a full 3x3 product per pixel.
    zero = np.zeros(1, np.float32)
    ox, oy, oz = head._to_head(zero, zero, np.full(1, np.float32(z_mm)))
    r = head._rotation().T.astype(np.float32)
    hx = (ox + r[0, 0] * xs[None, :] + r[0, 1] * ys[:, None]).ravel()
    hy = (oy + r[1, 0] * xs[None, :] + r[1, 1] * ys[:, None]).ravel()
    hz = (oz + r[2, 0] * xs[None, :] + r[2, 1] * ys[:, None]).ravel()
    shape = (r1 - r0, c1 - c0)
    sub_hu, sub_mask = _evaluate(head, hx, hy, hz, want_hu=want_hu)
    if hu is not None and sub_hu is not None:
        hu[r0:r1, c0:c1] = sub_hu.reshape(shape)
    mask[r0:r1, c0:c1] = sub_mask.reshape(shape)
    return hu, mask


def _slab(
    head: Head,
    z_mm: float,
    offsets: np.ndarray,
    pixel_spacing_mm: float,
    rows: int,
    cols: int,
    centre_xy: tuple[float, float],
    want_hu: bool,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Mean HU and lesion fraction over planes at ``z_mm + offsets`` on the output grid.

    Grids finer than :data:`PHANTOM_GRID_MM` are evaluated ``k`` times
    coarser (k an integer, coarse pixel centres at the centres of k x k
    blocks) and upsampled bilinearly, which is linear: averaging the planes
    first gives the same result.
    """
    k = max(1, int(PHANTOM_GRID_MM / pixel_spacing_mm + 1e-6))
    c_rows, c_cols = -(-rows // k), -(-cols // k)
    x0, y0 = slice_origin(pixel_spacing_mm, rows, cols, centre_xy)
    # Centre of the coarse grid such that its first pixel sits at the centre
    # of the first k x k block of the output grid.
    half = (k - 1) / 2.0 * pixel_spacing_mm
    cx = x0 + half + (c_cols - 1) / 2.0 * k * pixel_spacing_mm
    cy = y0 + half + (c_rows - 1) / 2.0 * k * pixel_spacing_mm
    hu_acc = np.zeros((c_rows, c_cols), np.float32) if want_hu else None
    mask_acc = np.zeros((c_rows, c_cols), np.float32)
    for dz in offsets:
        hu, m = _plane(head, z_mm + float(dz), k * pixel_spacing_mm, c_rows, c_cols,
                       (cx, cy), want_hu)
        if hu_acc is not None:
            hu_acc += hu  # type: ignore[operator]
        mask_acc += m
    n = np.float32(len(offsets))
    if hu_acc is not None:
        hu_acc /= n
    mask_acc /= n
    if k == 1:
        return hu_acc, mask_acc

    def up(arr: np.ndarray) -> np.ndarray:
        img = Image.fromarray(arr, mode="F").resize((c_cols * k, c_rows * k),
                                                    Image.Resampling.BILINEAR)
        return np.asarray(img, np.float32)[:rows, :cols]

    return (None if hu_acc is None else up(hu_acc)), up(mask_acc)


def _slice_rng(head: Head, z_mm: float, thickness_mm: float, rows: int, cols: int,
               pixel_spacing_mm: float) -> np.random.Generator:
    return np.random.default_rng(
        [head.seed, round(z_mm * 1000) % 2**31, round(thickness_mm * 1000),
         rows, cols, round(pixel_spacing_mm * 1e4)]
    )


def correlated_noise(
    rng: np.random.Generator, shape: tuple[int, int], pixel_spacing_mm: float
) -> np.ndarray:
    """Unit-SD Gaussian noise with a reconstruction-kernel correlation (~0.55 mm).

    The correlation is set in millimetres, so that after resampling to the
    model's 1 mm grid the noise looks alike at 0.45 and 0.9 mm pixels.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma_px = _NOISE_CORR_MM / pixel_spacing_mm
    if sigma_px < 0.3:
        return white
    kernel, gain = _noise_kernel(shape, round(sigma_px, 4))
    out = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape).astype(np.float32)
    return out * gain


@functools.lru_cache(maxsize=16)
def _noise_kernel(shape: tuple[int, int], sigma_px: float) -> tuple[np.ndarray, np.float32]:
    """Gaussian transfer function and the gain that restores unit SD (white input)."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)
    kernel = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    # Parseval: output variance = mean of |H|^2 over the full spectrum.
    weights = np.full(fx.shape, 2.0, np.float32)
    weights[0] = 1.0
    if shape[1] % 2 == 0:
        weights[-1] = 1.0
    power = float((kernel**2 * weights[None, :]).sum()) / (shape[0] * shape[1])
    return kernel.astype(np.complex64), np.float32(1.0 / math.sqrt(power))


def noise_sd_hu(head: Head, thickness_mm: float) -> float:
    """Noise SD in brain: 3.6 HU at 5 mm and reference dose, up to ~15 HU thin and low dose."""
    return _REF_NOISE_HU * math.sqrt(5.0 / max(thickness_mm, 0.5)) / math.sqrt(head.dose)


def _streaks(
    head: Head, rng: np.random.Generator, z_mm: float, pixel_spacing_mm: float,
    rows: int, cols: int, centre_xy: tuple[float, float],
) -> np.ndarray:
    """Beam-hardening streaks: strong just above the skull base, faint elsewhere."""
    x0, y0 = slice_origin(pixel_spacing_mm, rows, cols, centre_xy)
    xs = (x0 + np.arange(cols) * pixel_spacing_mm).astype(np.float32)
    ys = (y0 + np.arange(rows) * pixel_spacing_mm).astype(np.float32)
    # Height above the posterior fossa floor, in scanner z (tilt ignored).
    height = z_mm - (head.position[2] + head.floor[2])
    strength = 22.0 * math.exp(-max(height, 0.0) / 12.0)
    out = np.zeros((rows, cols), np.float32)
    n_streaks = int(rng.integers(3, 8))
    if strength < 1.0:
        return out  # a few HU at most: lost in the noise, not worth the time
    for _ in range(n_streaks):
        angle = rng.uniform(0.0, math.pi)
        ox = head.position[0] + rng.normal(0, 25)
        oy = head.position[1] + rng.normal(15, 20)
        nx, ny = -math.sin(angle), math.cos(angle)
        dist = (xs[None, :] - ox) * nx + (ys[:, None] - oy) * ny
        width = rng.uniform(0.8, 2.5)
        # Mostly dark (photon starvation), sometimes a bright overshoot.
        amp = strength * rng.uniform(-1.0, 0.4)
        out += amp * np.exp(-0.5 * (dist / width) ** 2)
    return out


def render_slice(
    head: Head,
    z_mm: float,
    *,
    pixel_spacing_mm: float,
    rows: int,
    cols: int,
    thickness_mm: float = 0.0,
    centre_xy: tuple[float, float] = (0.0, 0.0),
    noise: bool = True,
) -> np.ndarray:
    """One reconstructed axial slice in Hounsfield units.

    Parameters
    ----------
    head
        The phantom.
    z_mm
        Scanner z of the slice centre (mm).
    pixel_spacing_mm, rows, cols
        In-plane grid; the field is centred on ``centre_xy``.
    thickness_mm
        Reconstructed slice thickness: planes every <= 1.25 mm across it are
        averaged (partial volume). 0 renders the single plane.
    centre_xy
        Scanner (x, y) of the field centre.
    noise
        Add streaks and quantum noise (seeded from the head and the slice, so
        the result is still a pure function of the arguments).

    Returns
    -------
    np.ndarray
        (rows, cols) float32 HU.
    """
    offsets = sub_slice_offsets(thickness_mm) if thickness_mm > 0 else np.zeros(1)
    acc, _ = _slab(head, z_mm, offsets, pixel_spacing_mm, rows, cols, centre_xy, True)
    assert acc is not None
    acc = np.array(acc, np.float32)  # writable
    if noise:
        rng = _slice_rng(head, z_mm, thickness_mm, rows, cols, pixel_spacing_mm)
        body = acc > -500.0
        acc += _streaks(head, rng, z_mm, pixel_spacing_mm, rows, cols, centre_xy) * body
        sd = noise_sd_hu(head, thickness_mm if thickness_mm > 0 else 1.0)
        n = correlated_noise(rng, (rows, cols), pixel_spacing_mm)
        # Outside the head the detector sees more photons: less noise in air.
        acc += np.where(body, np.float32(sd), np.float32(sd * 0.5)) * n
    return acc


def lesion_mask_slice(
    head: Head,
    z_mm: float,
    *,
    pixel_spacing_mm: float,
    rows: int,
    cols: int,
    thickness_mm: float = 0.0,
    centre_xy: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Ground truth for :func:`render_slice`: the haemorrhage fraction of each voxel.

    Returns
    -------
    np.ndarray
        (rows, cols) float32 in [0, 1]: the share of the sub-slice planes in
        which the pixel lies inside a haemorrhage (on grids finer than
        :data:`PHANTOM_GRID_MM`, also the in-plane share at the edges).
    """
    if not head.lesions:
        return np.zeros((rows, cols), np.float32)
    offsets = sub_slice_offsets(thickness_mm) if thickness_mm > 0 else np.zeros(1)
    _, mask = _slab(head, z_mm, offsets, pixel_spacing_mm, rows, cols, centre_xy, False)
    return np.clip(mask, 0.0, 1.0)


def lesion_z_range(head: Head, step_mm: float = 1.5) -> tuple[float, float] | None:
    """Scanner z range that the haemorrhage occupies (None without one).

    A coarse sweep (3 mm pixels, ``step_mm`` between planes) inside the
    lesions' bounding boxes: exact to about ``step_mm``, meant for choosing
    slices, not for measuring.
    """
    if not head.lesions:
        return None
    z_lo, z_hi = head.z_range_mm()
    corners_z = []
    for lesion in head.lesions:
        box = _lesion_box(head, lesion)
        for cx in box[0]:
            for cy in box[1]:
                for cz in box[2]:
                    one = np.asarray([cx], np.float32)
                    corners_z.append(float(head._to_scanner(
                        one, np.asarray([cy], np.float32), np.asarray([cz], np.float32))[2][0]))
    lo, hi = max(min(corners_z), z_lo), min(max(corners_z), z_hi)
    centre = (head.position[0], head.position[1])
    hits = [
        z
        for z in np.arange(lo, hi + step_mm, step_mm)
        if lesion_mask_slice(head, float(z), pixel_spacing_mm=3.0, rows=75, cols=75,
                             centre_xy=centre).any()
    ]
    if not hits:
        return None
    return float(min(hits)), float(max(hits))


def true_volume_ml(head: Head, step_mm: float | None = None) -> float:
    """Haemorrhage volume (mL) by voxel counting on an isotropic grid.

    Parameters
    ----------
    head
        The phantom.
    step_mm
        Grid step; default 0.5 mm, which counts a 0.5 mL haematoma to ~2 %.

    Returns
    -------
    float
        0.0 for a head without haemorrhage.
    """
    if not head.lesions:
        return 0.0
    step = 0.5 if step_mm is None else float(step_mm)
    a, b, c_up, c_down = head.axes
    # Grid in head coordinates (the volume does not depend on the pose).
    xs = np.arange(-a, a + step, step, dtype=np.float32)
    ys = np.arange(-b, b + step, step, dtype=np.float32)
    total = 0
    boxes = [_lesion_box(head, lesion) for lesion in head.lesions]
    z_lo = min(bx[2][0] for bx in boxes)
    z_hi = max(bx[2][1] for bx in boxes)
    x_lo, x_hi = min(bx[0][0] for bx in boxes), max(bx[0][1] for bx in boxes)
    y_lo, y_hi = min(bx[1][0] for bx in boxes), max(bx[1][1] for bx in boxes)
    xs = xs[(xs >= x_lo) & (xs <= x_hi)]
    ys = ys[(ys >= y_lo) & (ys <= y_hi)]
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    for z in np.arange(max(z_lo, -c_down), min(z_hi, c_up) + step, step, dtype=np.float32):
        _, m = _evaluate(head, gx, gy, np.full(gx.shape, z, np.float32), want_hu=False)
        total += int(m.sum())
    return total * step**3 / 1000.0


def _lesion_box(head: Head, lesion: Lesion) -> tuple[tuple[float, float], ...]:
    """Axis-aligned box (head coordinates) that contains ``lesion``."""
    a, b, c_up, c_down = head.axes
    whole = ((-a, a), (-b, b), (-c_down, c_up))
    if lesion.kind == "iph":
        grow = 1.0 + lesion.lobulation[0] * 2.0 + 0.05
        return tuple(
            (c - r * grow - 1.0, c + r * grow + 1.0)
            for c, r in zip(lesion.centre, lesion.size, strict=True)
        )
    if lesion.kind == "sah":
        r = lesion.size[0] + 1.0
        return tuple((c - r, c + r) for c in lesion.centre)
    if lesion.variant == "interhemispheric":
        _, yc, zc = lesion.centre
        thick, half_y, half_z = lesion.size
        return ((-thick - 3.0, thick + 3.0), (yc - half_y - 1.0, yc + half_y + 1.0),
                (zc - half_z - 1.0, zc + half_z + 1.0))
    if lesion.kind in ("sdh", "edh") and lesion.centre[0] != 0.0:
        # One side of the midline.
        x_range = (0.0, a) if lesion.centre[0] > 0 else (-a, 0.0)
        return (x_range, whole[1], whole[2])
    return whole
