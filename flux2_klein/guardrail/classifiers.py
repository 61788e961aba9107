"""Optional Hugging Face classifiers of prompts and images, loaded from local folders only.

Any sequence-classification checkpoint (AutoModelForSequenceClassification + its tokenizer) or
image-classification checkpoint (AutoModelForImageClassification + its image processor) will do; the
operator names the labels that count as unsafe and the probability at which they do. Probabilities are a
softmax over the labels, or a sigmoid per label for checkpoints trained multi-label
(`problem_type: multi_label_classification`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


class ClassifierError(ValueError):
    """A classifier setting that cannot be used; the message names the field and what is allowed."""


@dataclass(frozen=True)
class ClassifierSettings:
    """path: a local checkpoint folder; unsafe_labels: labels of its config's id2label; threshold: the
    probability (0 < t <= 1) at or above which one of those labels makes the input unsafe; device: where
    it runs ("cpu", "cuda", "cuda:N")."""

    path: str
    unsafe_labels: tuple[str, ...]
    threshold: float = 0.5
    device: str = "cpu"

    def check(self, field: str) -> None:
        if not self.path:
            raise ClassifierError(f"{field}.path: a local checkpoint folder is required")
        if not self.unsafe_labels or not all(isinstance(x, str) and x for x in self.unsafe_labels):
            raise ClassifierError(f"{field}.unsafe_labels: one or more label names are required; "
                                  f"got {list(self.unsafe_labels)!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and 0 < self.threshold <= 1):
            raise ClassifierError(f"{field}.threshold: a probability in (0, 1]; got {self.threshold!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ClassifierError(f"{field}.device: cpu, cuda or cuda:N; got {self.device!r}")


@dataclass(frozen=True)
class Classification:
    """The most probable unsafe label and its probability; `unsafe` when that reaches the threshold."""

    label: str
    score: float
    unsafe: bool


class _Classifier:
    field = ""

    def __init__(self, settings: ClassifierSettings):
        settings.check(self.field)
        path = Path(settings.path)
        if not (path / "config.json").is_file():
            raise ClassifierError(f"{self.field}.path: {settings.path!r} is not a Hugging Face checkpoint folder "
                                  f"(no config.json)")
        self.settings = settings
        self.model = self._load_model(str(path)).to(settings.device).eval()
        config = self.model.config
        names = {str(v): int(k) for k, v in config.id2label.items()}
        missing = [x for x in settings.unsafe_labels if x not in names]
        if missing:
            raise ClassifierError(f"{self.field}.unsafe_labels: {missing!r} not among the checkpoint's labels "
                                  f"{sorted(names)!r}")
        self._indices = [names[x] for x in settings.unsafe_labels]
        self._multi_label = config.problem_type == "multi_label_classification"

    def _classifications(self, logits) -> list[Classification]:
        probs = logits.float().sigmoid() if self._multi_label else logits.float().softmax(-1)
        unsafe = probs[:, self._indices].cpu()
        best, where = unsafe.max(-1)
        return [Classification(self.settings.unsafe_labels[int(i)], float(s), float(s) >= self.settings.threshold)
                for s, i in zip(best, where)]


class TextClassifier(_Classifier):
    field = "text_classifier"

    def _load_model(self, path: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)

    def classify(self, texts: list[str]) -> list[Classification]:
        import torch

        # Long prompts are cut at the model's limit: the start of a prompt is what it is judged on.
        limit = min(self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 512))
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", max_length=limit)
        with torch.inference_mode():
            logits = self.model(**batch.to(self.settings.device)).logits
        return self._classifications(logits)


class ImageClassifier(_Classifier):
    field = "image_classifier"

    def _load_model(self, path: str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return AutoModelForImageClassification.from_pretrained(path, local_files_only=True)

    def classify(self, images) -> list[Classification]:
        """images: uint8 RGB arrays [H, W, 3] (numpy, or torch on any device)."""
        import numpy as np
        import torch

        arrays = [np.asarray(i.cpu() if hasattr(i, "cpu") else i) for i in images]
        inputs = self.processor(images=arrays, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(pixel_values=inputs["pixel_values"].to(self.settings.device)).logits
        return self._classifications(logits)
