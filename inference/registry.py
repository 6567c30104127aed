"""The models an installation offers: every folder under the models directory.

Cards are parsed at start-up (cheap); weights are loaded by the back end
when the workers start. A folder that fails validation is listed with its
error and never used, so that one bad drop-in does not stop the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import CardError, ModelCard

log = logging.getLogger(__name__)


@dataclass
class Registry:
    cards: dict[str, ModelCard] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # folder name -> reason

    @classmethod
    def scan(cls, directory: Path) -> Registry:
        reg = cls()
        if not directory.is_dir():
            reg.errors[str(directory)] = "models directory does not exist"
            return reg
        for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not (folder / "model.json").exists():
                continue
            try:
                card = ModelCard.from_folder(folder)
            except CardError as exc:
                reg.errors[folder.name] = str(exc)
                continue
            if card.id in reg.cards:
                reg.errors[folder.name] = f"duplicate model id {card.id!r}"
                continue
            reg.cards[card.id] = card
        return reg

    def disable(self, model_id: str, reason: str) -> None:
        card = self.cards.pop(model_id, None)
        if card is not None:
            self.errors[card.folder.name] = reason

    def describe(self) -> dict[str, Any]:
        return {
            # Copies: the loader thread may disable a model meanwhile.
            "models": [card.summary() for card in list(self.cards.values())],
            "errors": [{"folder": k, "error": v} for k, v in list(self.errors.items())],
        }
