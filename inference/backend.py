"""Inference back ends: in-process TensorFlow, or HTTP to a model server.

Both take a batch of prepared inputs for one model card and return raw
outputs by name. TensorFlow is imported on first use so that loading the
plugin (and the unit tests of everything else) does not pay for it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .card import CardError, ModelCard

if TYPE_CHECKING:
    from .preprocess import ModelInput

log = logging.getLogger("orthanc_ai")


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (n, rows, cols, channels) float32
    features: np.ndarray | None  # (n, k) float32, or None for image-only models


def batch_of(card: ModelCard, inputs: Sequence[ModelInput]) -> Batch:
    """Stack prepared inputs into one batch of the card's input shape.

    Radiographs (``(rows, cols)`` pixels) get a channel axis, repeated to the
    card's channel count; CT slices (``(rows, cols, windows)``) are stacked as
    they are. Features are stacked where the card takes metadata.
    """
    images = np.stack([i.image.pixels for i in inputs])
    if images.ndim == 3:
        images = images[..., None]
        if card.image.shape[2] != 1:
            images = np.repeat(images, card.image.shape[2], axis=-1)
    features = np.stack([i.features for i in inputs]) if card.metadata else None
    return Batch(images, features)


@dataclass(frozen=True)
class RawOutput:
    probability: float
    heatmap: np.ndarray | None  # (h, w) float32


class Backend(Protocol):
    def load(self, card: ModelCard) -> None: ...

    def predict(self, card: ModelCard, batch: Batch) -> list[RawOutput]: ...


_tf_configured = False
_tf_lock = threading.Lock()


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0) -> Any:
    """Import TensorFlow once, with its thread pools sized before first use."""
    global _tf_configured
    with _tf_lock:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if not _tf_configured:
            if intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
            if inter_op_threads:
                tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
            _tf_configured = True
        return tf


def _inputs_for(card: ModelCard, batch: Batch) -> dict[str, np.ndarray]:
    inputs = {card.image.name: batch.images.astype(np.float32, copy=False)}
    if card.metadata is not None:
        if batch.features is None:
            raise ValueError(f"model {card.id} needs metadata features")
        inputs[card.metadata.name] = batch.features.astype(np.float32, copy=False)
    return inputs


def _split(card: ModelCard, outputs: dict[str, Any], n: int) -> list[RawOutput]:
    prob = np.asarray(outputs[card.probability_output], np.float32).reshape(n, -1)[:, 0]
    heat = None
    if card.heatmap_output is not None:
        h = np.asarray(outputs[card.heatmap_output], np.float32)
        heat = h.reshape(h.shape[0], h.shape[1], h.shape[2]) if h.ndim == 4 else h
    return [
        RawOutput(float(prob[i]), None if heat is None else heat[i]) for i in range(n)
    ]


class InProcessBackend:
    """Keras (.keras) or SavedModel, run by TensorFlow in this process."""

    def __init__(self, intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
        self._threads = (intra_op_threads, inter_op_threads)
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def load(self, card: ModelCard) -> None:
        tf = configure_tensorflow(*self._threads)
        try:
            if card.format == "keras":
                import keras

                model = keras.saving.load_model(card.weights, compile=False)
                call = lambda inputs: model(inputs, training=False)  # noqa: E731
            else:
                loaded = tf.saved_model.load(str(card.weights))
                if "serving_default" not in loaded.signatures:
                    raise CardError(f"{card.weights}: SavedModel has no 'serving_default'")
                fn = loaded.signatures["serving_default"]
                call = lambda inputs: fn(  # noqa: E731
                    **{k: tf.constant(v) for k, v in inputs.items()}
                )
        except CardError:
            raise
        except Exception as exc:
            raise CardError(f"{card.weights}: cannot be loaded: {exc}") from exc
        self._check_signature(card, call)
        with self._lock:
            self._models[card.id] = call

    @staticmethod
    def _check_signature(card: ModelCard, call: Any) -> None:
        """Run zeros of the declared shapes; the outputs must match the card."""
        n_feat = len(card.metadata.features) if card.metadata else 0
        batch = Batch(
            np.zeros((1, *card.image.shape), np.float32),
            np.zeros((1, n_feat), np.float32) if card.metadata else None,
        )
        try:
            outputs = call(_inputs_for(card, batch))
        except Exception as exc:
            raise CardError(
                f"{card.folder}: model does not accept the inputs the card declares "
                f"({card.image.name} {list(card.image.shape)}"
                + (f", {card.metadata.name} [{n_feat}]" if card.metadata else "")
                + f"): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        if not isinstance(outputs, dict):
            raise CardError(f"{card.folder}: model must return named outputs (a dict)")
        for name in filter(None, (card.probability_output, card.heatmap_output)):
            if name not in outputs:
                raise CardError(
                    f"{card.folder}: card output {name!r} not among the model's "
                    f"outputs {sorted(outputs)}"
                )

    def predict(self, card: ModelCard, batch: Batch) -> list[RawOutput]:
        call = self._models.get(card.id)
        if call is None:
            raise RuntimeError(f"model {card.id} not loaded")
        outputs = call(_inputs_for(card, batch))
        return _split(card, {k: np.asarray(v) for k, v in outputs.items()}, len(batch.images))


class HttpBackend:
    """A model server speaking the TF Serving / KServe V1 REST protocol.

    Our own server (``python -m inference.server``) also takes NumPy .npz
    bodies, which avoid JSON's cost for images; ``binary=False`` sends the
    standard JSON body for other servers. Connection failures and 5xx
    answers are transient (the job is retried); 4xx answers are not.
    """

    def __init__(self, url: str, timeout: float = 120.0, binary: bool = True,
                 startup_wait: float = 0.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.startup_wait = startup_wait  # for a server we started ourselves
        self.timeout = timeout
        self.binary = binary
        self.session = requests.Session()
        self.session.trust_env = False

    def load(self, card: ModelCard) -> None:
        """Check the server serves this model and version (waiting ``startup_wait``)."""
        import time

        import requests

        deadline = time.time() + self.startup_wait
        while True:
            try:
                r = self.session.get(f"{self.url}/v1/models/{card.id}", timeout=self.timeout)
                break
            except requests.RequestException as exc:
                if time.time() > deadline:
                    # Predictions will fail transiently and be retried.
                    log.warning("orthanc-ai: model server %s unreachable: %s", self.url, exc)
                    return
                time.sleep(0.5)
        if r.status_code == 404:
            raise CardError(f"model server {self.url} does not serve {card.id}")
        versions = [v.get("version") for v in r.json().get("version_status", [])]
        if versions and card.version not in versions:
            raise CardError(
                f"model server serves {card.id} version(s) {versions}, card says {card.version}"
            )

    def predict(self, card: ModelCard, batch: Batch) -> list[RawOutput]:
        import io

        import requests

        from .errors import BadInput, TransientError

        inputs = _inputs_for(card, batch)
        url = f"{self.url}/v1/models/{card.id}:predict"
        try:
            if self.binary:
                buf = io.BytesIO()
                np.savez(buf, **inputs)
                r = self.session.post(url, data=buf.getvalue(), timeout=self.timeout,
                                      headers={"Content-Type": "application/x-npz"})
            else:
                body = {"inputs": {k: v.tolist() for k, v in inputs.items()}}
                r = self.session.post(url, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"model server {self.url}: {exc}") from exc
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise TransientError(f"model server answered HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400:
            raise BadInput(f"model server refused the input: HTTP {r.status_code} {r.text[:200]}")
        if r.headers.get("Content-Type", "").startswith("application/x-npz"):
            with np.load(io.BytesIO(r.content), allow_pickle=False) as npz:
                outputs = {k: npz[k] for k in npz.files}
        else:
            outputs = {k: np.asarray(v) for k, v in r.json()["outputs"].items()}
        return _split(card, outputs, len(batch.images))
