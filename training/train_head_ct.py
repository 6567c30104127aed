"""Train the head CT haemorrhage demonstration model and its image-only ablation.

Usage::

    python -m training.train_head_ct --out models/head-ct-haemorrhage [--seed N]

Everything is synthetic and made here: training and validation slices from
many phantom heads (:mod:`training.synthetic.headct`), each encoded as a CT
dataset and run through the plugin's preprocessing
(:func:`inference.preprocess.prepare_ct_slice`), so training matches
deployment. Two small 2D networks are trained as a paired comparison (see
:func:`train_models`): the image-only network trains first, then branches
into

* ``model.keras``: inputs ``image`` (256, 256, 2) and ``metadata``
  ([age_years, age_known, sex_male, sex_female, slice_thickness]); the
  metadata modulates the image features at three scales and the pooled
  classifier features (FiLM: per-channel scale and shift, initialised to the
  identity);
* ``ablation_image_only.keras``: the same network without the metadata,

both trained the same further epochs on the same batches.

Outputs (both): ``probability`` (haemorrhage on this slice) and ``heatmap``
(64 x 64, stride 4: the haemorrhage fraction of each 4 x 4 mm cell).
Thresholds are chosen on validation data (slices for ``threshold``, whole
validation series for ``series_threshold``), then both models are evaluated
on fresh held-out series at scanner geometry and the card ``model.json``,
``README.md`` and ``held_out_series.csv`` are written from that one run;
then, as the card and README are new, the prior comparison on follow-up
pairs (:func:`training.priors.refresh`: ``metrics.performance_with_priors``,
its README section and ``followup_predictions.csv``) unless ``--no-priors``.
The same seed gives the same weights and metrics (seeded data, batch order
and initialisation; TensorFlow's deterministic ops).

The whole run (data, both trainings, validation, evaluation) takes about
10 minutes and 700 CPU seconds on two cores; the card records both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from training import evaluate_head_ct as ev
from training.metrics import auroc, youden_threshold

MODEL_ID = "head-ct-haemorrhage"
DEFAULT_SEED = 20261202
HELD_OUT_SEED = 9103
STREAM_VALIDATION_SERIES = 4
N_TRAIN_HEADS = 600
N_VALIDATION_HEADS = 120
N_VALIDATION_SERIES = 32
N_HELD_OUT_SERIES = 96
SLICES_PER_HEAD = 6
SHARED_EPOCHS = 4
BRANCH_EPOCHS = 4
BATCH = 32
LEARNING_RATE = 2e-3
BRANCH_LEARNING_RATE = 1.5e-3
HEATMAP_LOSS_WEIGHT = 8.0


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def build_model(*, with_metadata: bool, n_features: int = 5) -> Any:
    """The per-slice network (Keras 3 functional).

    A 4 x 4 patch stem gives the 64 x 64 (stride 4) grid of the heatmap;
    two stride-2 stages reach 16 x 16 with a dilated convolution for context
    (~100 mm receptive field, enough to compare a convexity with the other
    side); a light decoder brings features back to 64 x 64 for the heatmap.
    The slice probability reads the global max and mean of the deepest
    features and the max of the heatmap logits.

    With metadata, each stage's features are scaled and shifted per channel
    by functions of the metadata (FiLM, initialised to the identity), so
    that age and slice thickness can change *what the image features mean*
    (e.g. a bright focus in a 70-year-old may be a calcification; a brain
    without a CSF rim is normal at 20 and suspicious at 80), and the
    metadata also joins the classifier.

    Parameters
    ----------
    with_metadata
        Build the metadata model (inputs ``image`` and ``metadata``) or the
        image-only ablation (input ``image``).
    n_features
        Length of the metadata vector.

    Returns
    -------
    keras.Model
        Outputs ``{"probability": (1,), "heatmap": (64, 64, 1)}``.
    """
    import keras
    from keras import layers

    # Image layers carry fixed names: the metadata model starts from the
    # image-only network's weights (see train_models), matched by name.
    def conv_bn(x: Any, name: str, ch: int, k: int, stride: int = 1, dilation: int = 1) -> Any:
        y = layers.Conv2D(
            ch, k, strides=stride, padding="same", dilation_rate=dilation, use_bias=False, name=name
        )(x)
        return layers.ReLU()(layers.BatchNormalization(name=f"{name}_bn")(y))

    image = keras.Input(ev.CANVAS + (len(ev.WINDOWS),), name="image")
    meta = keras.Input((n_features,), name="metadata") if with_metadata else None
    context = None
    if meta is not None:
        # Explicitly seeded: creating it draws nothing from Keras' global
        # seed stream, so the image layers initialise as in the ablation.
        context = layers.Dense(
            32,
            activation="relu",
            name="meta_context",
            kernel_initializer=keras.initializers.GlorotUniform(seed=7),
        )(meta)

    def film(x: Any, name: str) -> Any:
        """x * (1 + gamma(metadata)) + beta(metadata), per channel."""
        if context is None:
            return x
        ch = x.shape[-1]
        # Zero-initialised: the metadata model starts as the image-only one.
        gamma = layers.Dense(ch, kernel_initializer="zeros", name=f"{name}_gamma")(context)
        beta = layers.Dense(ch, kernel_initializer="zeros", name=f"{name}_beta")(context)
        if len(x.shape) == 4:
            gamma = layers.Reshape((1, 1, ch))(gamma)
            beta = layers.Reshape((1, 1, ch))(beta)
        return layers.Add()([x, layers.Multiply()([x, gamma]), beta])

    # Stride 4 (64 x 64): no batch norm at this size, it would double the cost.
    x = layers.Conv2D(16, 4, strides=4, activation="relu", name="stem")(image)
    x = layers.Conv2D(24, 3, padding="same", activation="relu", name="s4_conv")(x)
    s4 = film(x, "film_s4")
    x = conv_bn(s4, "s8_down", 32, 2, stride=2)
    x = conv_bn(x, "s8_conv", 32, 3)
    s8 = film(x, "film_s8")
    x = conv_bn(s8, "s16_down", 64, 2, stride=2)
    x = conv_bn(x, "s16_conv", 64, 3)
    x = conv_bn(x, "s16_dilated", 64, 3, dilation=2)
    s16 = film(x, "film_s16")
    u = layers.Conv2D(32, 1, name="up8_proj")(s16)
    u = layers.UpSampling2D(2, interpolation="bilinear")(u)
    u = layers.Conv2D(32, 3, padding="same", activation="relu", name="up8_conv")(
        layers.Add()([u, s8])
    )
    u = layers.UpSampling2D(2, interpolation="bilinear")(layers.Conv2D(24, 1, name="up4_proj")(u))
    u = layers.ReLU()(layers.Add()([u, s4]))
    logit = layers.Conv2D(1, 1, name="heatmap_logit")(u)
    heatmap = layers.Activation("sigmoid", name="heatmap")(logit)
    pooled = layers.Concatenate()(
        [
            layers.GlobalMaxPooling2D()(s16),
            layers.GlobalAveragePooling2D()(s16),
            layers.GlobalMaxPooling2D()(logit),
        ]
    )
    # The classifier is modulated too: age can re-weight whole findings (a
    # small dense focus, a missing CSF rim) after they have been pooled, and
    # its shift is how the metadata enters the decision directly.
    f = layers.ReLU()(film(layers.Dense(32, name="classifier")(pooled), "film_classifier"))
    probability = layers.Dense(1, activation="sigmoid", name="probability")(f)
    inputs = {"image": image, "metadata": meta} if meta is not None else {"image": image}
    name = "head_ct_haemorrhage" if meta is not None else "head_ct_haemorrhage_image_only"
    return keras.Model(inputs, {"probability": probability, "heatmap": heatmap}, name=name)


def _batches(data: ev.SliceSet, *, with_metadata: bool, seed: int) -> Any:
    """Shuffled mini-batches from the float16 arrays, a seeded permutation per epoch."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self._draw()

        def __len__(self) -> int:
            return math.ceil(len(data) / BATCH)

        def __getitem__(self, i: int) -> tuple[dict, dict]:
            idx = np.sort(self.order[i * BATCH : (i + 1) * BATCH])
            image = data.image[idx].astype(np.float32)
            heatmap = data.heatmap[idx].astype(np.float32)
            # Left-right mirroring: the phantom population is symmetric, so a
            # mirrored slice is another valid slice, for free.
            flip = self.flips[idx]
            image[flip] = image[flip, :, ::-1]
            heatmap[flip] = heatmap[flip, :, ::-1]
            x = {"image": image}
            if with_metadata:
                x["metadata"] = data.metadata[idx]
            return x, {"probability": data.label[idx, None], "heatmap": heatmap}

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._draw()

        def _draw(self) -> None:
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(len(data))
            self.flips = rng.random(len(data)) < 0.5

    return Batches()


def _fit(
    model: Any,
    data: ev.SliceSet,
    *,
    with_metadata: bool,
    seed: int,
    epochs: int,
    learning_rate: float,
) -> None:
    """Adam with a cosine decay over ``epochs``, seeded batch order."""
    import keras

    steps = epochs * math.ceil(len(data) / BATCH)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss={"probability": "binary_crossentropy", "heatmap": "binary_crossentropy"},
        loss_weights={"probability": 1.0, "heatmap": HEATMAP_LOSS_WEIGHT},
    )
    batches = _batches(data, with_metadata=with_metadata, seed=seed)
    model.fit(batches, epochs=epochs, verbose=2, shuffle=False)


def train_models(
    data: ev.SliceSet, *, seed: int, shared_epochs: int, branch_epochs: int
) -> tuple[Any, Any]:
    """Train the metadata model and its image-only ablation as a paired comparison.

    1. The image-only network trains for ``shared_epochs``.
    2. It branches: the ablation trains on for ``branch_epochs`` as it is;
       the metadata model (the same image layers, copied, plus the FiLM
       layers, initialised to the identity) trains for the same epochs, on
       the same batches, with the same fresh optimiser and schedule.

    Both have seen exactly the same images for the same number of steps;
    they differ only by the metadata pathway, so the difference between
    them is the metadata's, not that of two random initialisations (which
    on this budget differ by as much as the metadata gives). Sharing the
    first phase also saves its cost once.

    Returns
    -------
    (model, ablation)
    """
    import keras

    keras.utils.set_random_seed(seed)
    ablation = build_model(with_metadata=False)
    _fit(
        ablation,
        data,
        with_metadata=False,
        seed=seed,
        epochs=shared_epochs,
        learning_rate=LEARNING_RATE,
    )
    shared = {layer.name: layer.get_weights() for layer in ablation.layers}
    model = build_model(with_metadata=True)
    copied = 0
    for layer in model.layers:
        if layer.name in shared and layer.weights:
            layer.set_weights(shared[layer.name])
            copied += 1
    assert copied == sum(1 for layer in ablation.layers if layer.weights)
    for net, with_metadata in ((ablation, False), (model, True)):
        _fit(
            net,
            data,
            with_metadata=with_metadata,
            seed=seed + 1,
            epochs=branch_epochs,
            learning_rate=BRANCH_LEARNING_RATE,
        )
    return model, ablation


def export(trained: Any, path: Path, *, with_metadata: bool) -> None:
    """Save the weights in a fresh, uncompiled copy: no optimiser state, no
    training configuration, so the file stays small and loads anywhere."""
    fresh = build_model(with_metadata=with_metadata)
    fresh.set_weights(trained.get_weights())
    fresh.save(path)


# --------------------------------------------------------------------------
# Validation: thresholds
# --------------------------------------------------------------------------


def predict_set(model: Any, data: ev.SliceSet, *, with_metadata: bool) -> np.ndarray:
    probs, _ = ev.predict_slices(model, data.image, data.metadata if with_metadata else None)
    return probs


def validation_series(models: dict[str, Any], seed: int, n: int) -> dict[str, np.ndarray]:
    per = ev.run_series(models, seed, STREAM_VALIDATION_SERIES, n)
    return {k: np.asarray(v) for k, v in per.items()}


# --------------------------------------------------------------------------
# Card
# --------------------------------------------------------------------------


_CARD_METRICS = (
    "auroc",
    "sensitivity",
    "specificity",
    "volume_mae_ml",
    "volume_correlation",
    "key_slice_hit_rate",
)


def _metrics_block(result: dict[str, Any], key: str) -> dict[str, Any]:
    """The card's metric keys, exactly: held-out set and the model's results."""
    return {
        "seed": result["seed"],
        "n_series": result["n_series"],
        "prevalence": round(result["prevalence"], 4),
        **{k: result[key][k] for k in _CARD_METRICS},
    }


def write_card(
    out: Path,
    *,
    threshold: float,
    series_threshold: float,
    ablation_threshold: float,
    ablation_series_threshold: float,
    result: dict[str, Any],
    validation: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Write ``model.json`` (the card schema of :mod:`inference.card`).

    ``metrics.held_out`` and ``metrics.image_only_ablation`` hold the card's
    metric keys (both models at the card's ``series_threshold``);
    ``metrics.details`` holds what explains them (standard errors, AUROC by
    age band, the ablation at its own threshold, validation results).
    """
    held = _metrics_block(result, "model")
    abl = {"weights": "ablation_image_only.keras", **_metrics_block(result, "ablation")}
    benefit = held["auroc"] - abl["auroc"]
    # Re-evaluation on the same held-out series (same seed, first cases) must
    # reproduce the per-series probabilities to float noise; the tolerance
    # covers that and TensorFlow build / thread differences (CPU kernels can
    # reorder sums: probabilities move by ~1e-6, so only ties could change).
    tolerance = 0.01
    details = {
        "per_series": "held_out_series.csv",
        "auroc_se": {
            "model": result["model"]["auroc_se"],
            "image_only_ablation": result["ablation"]["auroc_se"],
        },
        "auroc_by_age": {
            "model": result["model"]["auroc_by_age"],
            "image_only_ablation": result["ablation"]["auroc_by_age"],
        },
        "metadata_benefit_paired_bootstrap": result["metadata_benefit"],
        "ablation_threshold": round(ablation_threshold, 4),
        "ablation_series_threshold": round(ablation_series_threshold, 4),
        "ablation_at_own_series_threshold": result["ablation_own_threshold"],
        "validation": validation,
        "evaluation_duration_s": result["duration_s"],
    }
    card = {
        "schema": 1,
        "id": MODEL_ID,
        "name": "Intracranial haemorrhage detector (head CT)",
        "version": "1.0.0",
        "description": (
            "Per-slice 2D network that flags intracranial haemorrhage (intraparenchymal, "
            "subdural, epidural, subarachnoid, intraventricular) on axial head CT slices "
            "and outlines it on a 4 mm heatmap. Run over a series, the series probability "
            "is the maximum slice probability, the key slice its argmax and the "
            "haemorrhage volume the sum of heatmap cells >= 0.5 times the slice spacing. "
            "Patient age, sex and slice thickness modulate the image features (FiLM)."
        ),
        "intended_use": (
            "Demonstration, not for clinical use. Shows how the plugin runs a series-level "
            "CT model slice by slice and reports a finding, a key slice and a volume; "
            "trained only on synthetic phantoms and never validated on patient images."
        ),
        "format": "keras",
        "weights": "model.keras",
        "accepts": {
            "level": "series",
            "modalities": ["CT"],
            "photometric": ["MONOCHROME2"],
            "body_parts": ["HEAD", "BRAIN", "SKULL"],
        },
        "inputs": {
            "image": {
                "name": "image",
                "shape": [256, 256, 2],
                "pixel_spacing_mm": ev.TARGET_MM,
                "windows": [list(w) for w in ev.WINDOWS],
                "preprocessing": (
                    "Modality LUT to Hounsfield units (padding to -1024), one [0, 1] channel "
                    "per window (40/80 brain, 80/200 subdural), resampled to 1 mm pixels and "
                    "centred on a 256 x 256 canvas (zero padded or centre cropped)."
                ),
            },
            "metadata": {"name": "metadata", "features": list(ev.FEATURE_NAMES)},
        },
        "outputs": {
            "probability": {"name": "probability"},
            "heatmap": {"name": "heatmap", "stride": ev.STRIDE},
        },
        "finding": {"value": "50960005", "scheme": "SCT", "meaning": "Hemorrhage"},
        "finding_site": {"value": "12738006", "scheme": "SCT", "meaning": "Brain structure"},
        "threshold": round(threshold, 4),
        "series_threshold": round(series_threshold, 4),
        "volume": {"heatmap_threshold": ev.HEATMAP_THRESHOLD, "unit": "mL"},
        "training": training,
        "metrics": {
            "held_out": held,
            "image_only_ablation": abl,
            "metadata_benefit_auroc": round(benefit, 4),
            "auroc_tolerance": tolerance,
            "details": details,
        },
    }
    (out / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_readme(out: Path, card: dict[str, Any]) -> None:
    """A short human-readable model card next to ``model.json``."""
    held = card["metrics"]["held_out"]
    abl = card["metrics"]["image_only_ablation"]
    details = card["metrics"]["details"]
    own = details["ablation_at_own_series_threshold"]
    benefit = details["metadata_benefit_paired_bootstrap"]
    val = details["validation"]
    tr = card["training"]
    rows = [
        ("Series AUROC", "auroc"),
        ("Sensitivity (at the series threshold)", "sensitivity"),
        ("Specificity (at the series threshold)", "specificity"),
        ("Volume MAE, mL (positives)", "volume_mae_ml"),
        ("Volume correlation (positives)", "volume_correlation"),
        ("Key-slice hit rate (positives)", "key_slice_hit_rate"),
    ]
    table = "\n".join(f"| {label} | {_fmt(held[k])} | {_fmt(abl[k])} |" for label, k in rows)
    se = details["auroc_se"]
    table += f"\n| AUROC standard error | {_fmt(se['model'])} | {_fmt(se['image_only_ablation'])} |"
    by_age = details["auroc_by_age"]
    ages = "\n".join(
        f"| AUROC, age {band} | {_fmt(by_age['model'][band])} | "
        f"{_fmt(by_age['image_only_ablation'][band])} |"
        for band in by_age["model"]
    )
    text = f"""# {card["name"]}

**Demonstration only, not for clinical use.** Trained and tested only on
synthetic head CT phantoms (`training/synthetic/headct.py`); it has never
seen a patient image.

- Model id `{card["id"]}`, version {card["version"]}, Keras 3 (`model.keras`);
  image-only ablation `ablation_image_only.keras`.
- Input: one axial CT slice in Hounsfield units, windows 40/80 and 80/200,
  1 mm pixels, 256 x 256; metadata age, age known, sex (M/F one-hot), slice
  thickness (FiLM modulation of the image features).
- Output per slice: `probability` (threshold {card["threshold"]}) and
  `heatmap` (64 x 64, 4 mm cells). Per series (plugin): maximum slice
  probability (threshold {card["series_threshold"]}), key slice = argmax,
  volume = cells >= 0.5 x 16 mm^2 x slice spacing.
- Finding: SCT 50960005 "Hemorrhage", site SCT 12738006 "Brain structure".

## Held-out results

{held["n_series"]} fresh synthetic series (seed {held["seed"]}, prevalence
{held["prevalence"]:.2f}; 5 mm routine and 1.25 mm thin, 0.45-0.49 mm pixels,
512 x 512), every slice through the plugin's preprocessing. Per-series
results are in `held_out_series.csv`.

| Metric | With metadata | Image only |
|---|---|---|
{table}
{ages}

Both models are read at the card's series threshold. At its own
validation-chosen threshold ({own["threshold"]:.3f}) the image-only model
has sensitivity {_fmt(own["sensitivity"])} and specificity
{_fmt(own["specificity"])}.

Metadata benefit (series AUROC difference, same series):
{benefit["difference"]:+.3f}, paired bootstrap 95 % interval
[{benefit["ci95"][0]:+.3f}, {benefit["ci95"][1]:+.3f}] (no gain or a loss in
{100 * benefit["p_not_better"]:.0f} % of resamples). On validation data the
slice AUROC was {_fmt(val["slice_auroc"]["model"])} with metadata and
{_fmt(val["slice_auroc"]["image_only_ablation"])} without ({val["n_slices"]} slices),
the series AUROC {_fmt(val["series_auroc"]["model"])} and
{_fmt(val["series_auroc"]["image_only_ablation"])} ({val["n_series"]} series). The
benefit is small and not certain: most of what age tells about this
phantom (atrophy, skull, myelination) is also visible in the image, and a
small network trained for minutes learns the remaining interactions only
in part.

## Training

`{tr["command"]}` (seed {tr["seed"]}): {tr["n_train_slices"]} training slices
from {tr["n_train_heads"]} phantom heads, {tr["epochs"]} epochs per model, TensorFlow
{tr["tensorflow"]}. Protocol: {tr["protocol"]}. The whole script (data, both
trainings, validation, this evaluation) took {tr["duration_s"]:.0f} s wall time
and {tr["cpu_s"]:.0f} CPU seconds on {tr["cpu_count"]} cores (load average
{tr["load_average_at_start_end"][0]} at the start: the machine was shared).
Weights: model {tr["weights_bytes"]["model.keras"] / 1024:.0f} KiB, ablation
{tr["weights_bytes"]["ablation_image_only.keras"] / 1024:.0f} KiB.

## Limits

- Synthetic phantoms only: analytic anatomy, no real scanner physics, no
  motion, no metal, no post-operative changes, no tumours or infarcts.
- Per-slice model: no 3-D context; slivers at a lesion's edge and
  haemorrhages under ~1 mL are often missed. The volume is coarse (4 mm
  cells): thin collections such as subdurals can be over- or
  under-estimated by several mL, and thin subarachnoid blood and isodense
  subdurals are mostly left out of the heatmap.
- The metadata gain comes from the phantom's design (age-dependent
  calcifications, atrophy and isodense subdurals); it says nothing about
  real populations.
- Not a medical device. Do not use for diagnosis or triage.
"""
    (out / "README.md").write_text(text)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models") / MODEL_ID)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train-heads", type=int, default=N_TRAIN_HEADS)
    parser.add_argument("--shared-epochs", type=int, default=SHARED_EPOCHS)
    parser.add_argument("--branch-epochs", type=int, default=BRANCH_EPOCHS)
    parser.add_argument("--held-out-series", type=int, default=N_HELD_OUT_SERIES)
    parser.add_argument("--validation-series", type=int, default=N_VALIDATION_SERIES)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-priors", action="store_true",
                        help="skip the prior comparison (training.priors) at the end")
    args = parser.parse_args(argv)
    if args.seed == HELD_OUT_SEED:
        parser.error("the training seed must differ from the held-out seed")
    start = time.monotonic()
    load_start = os.getloadavg()[0]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Data first, before TensorFlow is imported: the worker processes render.
    train = ev.synthesize_slices(
        ev.SliceSpec(args.seed, ev.STREAM_TRAIN, SLICES_PER_HEAD),
        args.train_heads,
        workers=args.workers,
    )
    val = ev.synthesize_slices(
        ev.SliceSpec(
            args.seed, ev.STREAM_VALIDATION, SLICES_PER_HEAD, p_mask_age=0.0, p_mask_sex=0.0
        ),
        N_VALIDATION_HEADS,
        workers=args.workers,
    )
    t_data = time.monotonic() - start
    print(
        f"data: {len(train)} training slices ({train.label.mean():.2f} positive), "
        f"{len(val)} validation slices, {t_data:.0f} s",
        flush=True,
    )

    import keras
    import tensorflow as tf

    # As deterministic as TensorFlow on CPU allows: seeded initialisation and
    # data order, deterministic kernels, fixed thread counts.
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    model, ablation = train_models(
        train, seed=args.seed, shared_epochs=args.shared_epochs, branch_epochs=args.branch_epochs
    )
    t_train = time.monotonic() - start
    del train

    p_val = predict_set(model, val, with_metadata=True)
    p_val_abl = predict_set(ablation, val, with_metadata=False)
    threshold = youden_threshold(val.label, p_val)
    abl_threshold = youden_threshold(val.label, p_val_abl)
    vs = validation_series({"": model, "_ablation": ablation}, args.seed, args.validation_series)
    series_threshold = youden_threshold(vs["label"], vs["probability"])
    abl_series_threshold = youden_threshold(vs["label"], vs["probability_ablation"])
    print(
        f"validation: slice AUROC {auroc(val.label, p_val):.3f} "
        f"(image only {auroc(val.label, p_val_abl):.3f}); series AUROC "
        f"{auroc(vs['label'], vs['probability']):.3f} "
        f"(image only {auroc(vs['label'], vs['probability_ablation']):.3f})",
        flush=True,
    )

    export(model, out / "model.keras", with_metadata=True)
    export(ablation, out / "ablation_image_only.keras", with_metadata=False)
    result = ev.evaluate(
        out,
        n_series=args.held_out_series,
        seed=HELD_OUT_SEED,
        workers=args.workers,
        threshold=series_threshold,
        ablation_threshold=abl_series_threshold,
        predictions_csv=out / "held_out_series.csv",
    )
    duration = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = time.process_time() + usage.ru_utime + usage.ru_stime
    training = {
        "script": "training/train_head_ct.py",
        "command": f"python -m training.train_head_ct --out {out} --seed {args.seed}",
        "seed": args.seed,
        "data": (
            "synthetic only: analytic head phantoms (training/synthetic/headct.py) rendered "
            "slice by slice with partial volume over 0.625-5 mm, encoded as CT Image Storage "
            "(training/synthetic/ct.py) and preprocessed by inference.preprocess."
            "prepare_ct_slice; PatientAge and PatientSex each left out of ~10 % of headers"
        ),
        "n_train_heads": args.train_heads,
        "n_train_slices": args.train_heads * SLICES_PER_HEAD,
        "n_validation_slices": len(val),
        "n_validation_series": args.validation_series,
        "epochs": args.shared_epochs + args.branch_epochs,
        "protocol": (
            f"paired: the image-only network trains {args.shared_epochs} epochs, then "
            f"branches into the ablation (image only) and the model (same weights plus "
            f"identity-initialised FiLM metadata layers), each trained {args.branch_epochs} "
            "more epochs on the same batches with the same fresh optimiser"
        ),
        "batch_size": BATCH,
        "optimizer": f"Adam, cosine decay from {LEARNING_RATE}",
        "loss": f"binary cross-entropy (probability) + {HEATMAP_LOSS_WEIGHT} x binary "
        "cross-entropy (heatmap, soft targets = haemorrhage fraction per cell)",
        "slice_label": f"haemorrhage area >= {ev.MIN_LESION_AREA_MM2:g} mm^2 in the slice",
        "threshold_selection": "Youden index on validation slices (threshold) and on "
        "validation series, max slice probability (series_threshold)",
        "duration_s": round(duration, 1),
        # CPU seconds of this process and its workers: the wall time depends
        # on what else runs on the machine, this does not.
        "cpu_s": round(cpu_s, 1),
        "load_average_at_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "durations_s": {
            "data": round(t_data, 1),
            "train_both": round(t_train - t_data, 1),
            "validation_and_evaluation": round(duration - t_train, 1),
        },
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "weights_bytes": {
            name: (out / name).stat().st_size
            for name in ("model.keras", "ablation_image_only.keras")
        },
    }
    validation = {
        "n_slices": len(val),
        "slice_auroc": {
            "model": round(auroc(val.label, p_val), 4),
            "image_only_ablation": round(auroc(val.label, p_val_abl), 4),
        },
        "n_series": int(len(vs["label"])),
        "series_auroc": {
            "model": round(auroc(vs["label"], vs["probability"]), 4),
            "image_only_ablation": round(auroc(vs["label"], vs["probability_ablation"]), 4),
        },
    }
    card = write_card(
        out,
        threshold=threshold,
        series_threshold=series_threshold,
        ablation_threshold=abl_threshold,
        ablation_series_threshold=abl_series_threshold,
        result=result,
        validation=validation,
        training=training,
    )
    write_readme(out, card)
    summary = {k: result[k] for k in ("model", "ablation", "ablation_own_threshold")}
    print(json.dumps({"duration_s": round(duration, 1), **summary}, indent=2))
    if not args.no_priors:
        # The card and README were just rewritten: measure the prior comparison again.
        from training import priors

        card = {**card, "metrics": {**card["metrics"],
                                    priors.CARD_KEY: priors.refresh(out, workers=args.workers)}}
    return card


if __name__ == "__main__":
    main()
