"""ModelsService: `/v1/models`, the served model and the sentence models as OpenAI lists
them."""

from __future__ import annotations

from serve_app.api.served_model import ServedModel
from serve_app.errors import model_not_found
from serve_app.protocol import ModelCard, ModelList
from serve_app.sentence.service import SentenceService


class ModelsService:
    def __init__(self, served: ServedModel, sentence: SentenceService) -> None:
        self.served = served
        self.sentence = sentence

    def _cards(self) -> list[ModelCard]:
        return [*self.served.model_cards(), *self.sentence.model_cards()]

    def list_models(self) -> ModelList:
        return ModelList(data=self._cards())

    def model(self, model_id: str) -> ModelCard:
        """One model by id; a 404 in the OpenAI shape for any other."""
        for card in self._cards():
            if card.id == model_id:
                return card
        raise model_not_found(model_id)
