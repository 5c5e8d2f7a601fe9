"""How good generated images are: FID and Inception Score (torchmetrics) on a feature network, and class accuracy.

The feature network is `eval.feature_model`: an image-classification model directory (an sft image-classification
run's model/, trained on the same domain, is the honest choice offline), whose penultimate activations give FID
and whose class probabilities give IS and class accuracy; or `inception-v3` (torchmetrics' FID Inception, which
needs torch-fidelity and its weights installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sft_cli.errors import SftError

INCEPTION = "inception-v3"


class ClassifierFeatures(nn.Module):
    """Images in [0, 1] -> the classifier's penultimate features (or its logits), with its own preprocessing."""

    def __init__(self, classifier: nn.Module, size: int, channels: int, mean: list[float], std: list[float]):
        super().__init__()
        self.classifier, self.size, self.channels = classifier.eval(), size, channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.logits_only = False
        self._captured: Optional[torch.Tensor] = None
        head = getattr(classifier, "classifier", None)
        if head is None:
            raise SftError("eval.feature_model: the model has no `classifier` head to take features before")
        head.register_forward_pre_hook(lambda _module, inputs: setattr(self, "_captured", inputs[0]))
        with torch.no_grad():
            self.num_features = int(self._features(torch.zeros(1, channels, size, size)).shape[1])

    def labels(self) -> list[str]:
        """The classifier's class names, by index."""
        config = self.classifier.config
        return [str(config.id2label[i]) for i in range(config.num_labels)]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[1] != self.channels:  # grey <-> colour, as PIL's convert would
            images = images.mean(1, keepdim=True) if self.channels == 1 else images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (images.clamp(0, 1) - self.mean.to(images.device)) / self.std.to(images.device)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(pixel_values=self._prepare(images)).logits
        return logits if self.logits_only else self._captured.flatten(1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(images).double()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores for images in [0, 1]."""
        return self.classifier(pixel_values=self._prepare(images)).logits


class LogitsView(nn.Module):
    """The same classifier, giving logits (what Inception Score takes)."""

    def __init__(self, features: ClassifierFeatures):
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features.logits(images)


def load_feature_model(location: str) -> tuple[Any, str]:
    """(feature network, a description for eval.json's fid_features); one-line errors for what is no classifier."""
    if location == INCEPTION:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            FrechetInceptionDistance(feature=2048)
        except Exception as err:  # torch-fidelity missing, or its weights not downloadable offline
            detail = " ".join(str(err).split())[:160]
            raise SftError(
                f"eval.feature_model: inception-v3 is not usable here ({detail}) — install torch-fidelity with its "
                "weights, or name an image-classification model directory (an sft image-classification run's model/)"
            ) from None
        return None, "inception-v3 (torchmetrics FID Inception, pool3, 2048 features)"
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    path = Path(location).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception:
        raise SftError(
            f"eval.feature_model: {location} is not a model directory — name an image-classification model "
            "(e.g. an sft image-classification run's model/) or inception-v3"
        ) from None
    architectures = config.architectures or []
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES or not any(
        a.endswith("ForImageClassification") for a in architectures
    ):
        raise SftError(
            f"eval.feature_model: {location} is a {config.model_type} ({', '.join(architectures) or 'no head'}), "
            "not an image classifier — train one with `sft finetune` (task: image-classification) on the same images"
        )
    classifier = AutoModelForImageClassification.from_pretrained(str(path))
    settings = _preprocessing(path, classifier)
    network = ClassifierFeatures(
        classifier, settings["image_size"], settings["channels"], settings["mean"], settings["std"]
    )
    return network, f"{path} ({config.model_type} penultimate layer, {network.num_features} features)"


def _preprocessing(path: Path, classifier: nn.Module) -> dict[str, Any]:
    """How the classifier saw its images: sft's sft_preprocess.json, else its image processor."""
    side = path / "sft_preprocess.json"
    if side.exists():
        return json.loads(side.read_text())
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(path))
    size = processor.size
    edge = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
    channels = getattr(classifier.config, "num_channels", 3)
    return {"image_size": int(edge), "channels": channels, "mean": processor.image_mean, "std": processor.image_std}


def image_quality(
    network: Any, description: str, fake: torch.Tensor, real: torch.Tensor, wanted: Optional[list[Optional[str]]]
) -> dict[str, Any]:
    """fid, fid_features, inception_score (and class_accuracy when `wanted` names each fake image's class).

    `fake` and `real` are images in [0, 1], N x C x H x W, on the CPU.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
    warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")
    with torch.random.fork_rng():  # IS shuffles with the global RNG: training's random stream stays as it was
        return _quality(network, description, fake, real, wanted)


def _quality(
    network: Any, description: str, fake: torch.Tensor, real: torch.Tensor, wanted: Optional[list[Optional[str]]]
) -> dict[str, Any]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    if network is None:  # inception-v3: 3 channels, uint8
        fid = FrechetInceptionDistance(feature=2048, normalize=True)
        as_rgb = [x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in (real, fake)]
        fid.update(as_rgb[0], real=True)
        fid.update(as_rgb[1], real=False)
        score = InceptionScore(normalize=True, splits=1)
        score.update(as_rgb[1])
        return {"fid": float(fid.compute()), "fid_features": description, "inception_score": float(score.compute()[0])}
    fid = FrechetInceptionDistance(feature=network, normalize=True)
    fid.set_dtype(torch.float64)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    score = InceptionScore(feature=LogitsView(network), splits=1, normalize=False)  # True would make them uint8
    score.update(fake)
    metrics = {"fid": float(fid.compute()), "fid_features": description, "inception_score": float(score.compute()[0])}
    if wanted is not None:
        names = network.labels()
        predicted = network.logits(fake).argmax(-1).tolist()
        scored = [(w, names[p]) for w, p in zip(wanted, predicted) if w is not None and w in names]
        if scored:
            metrics["class_accuracy"] = sum(w == p for w, p in scored) / len(scored)
    return metrics
