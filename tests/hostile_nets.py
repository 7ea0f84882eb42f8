"""Models as users bring them, for the hostile-input tests: the demo CNN's layers (so the demo weights load)
behind forwards that return tuples, dicts, Hugging Face style objects, NaN, or nothing usable.

Not under a trusted prefix: the tests trust it the way an operator would (--trust-factory hostile_nets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xaudit.tasks.nets import DemoCNN


class TupleNet(DemoCNN):
    def forward(self, x):
        return super().forward(x), x.mean()


class DictNet(DemoCNN):
    def forward(self, x):
        return {"logits": super().forward(x), "features": x}


@dataclass
class Output:
    logits: torch.Tensor


class ObjectNet(DemoCNN):
    def forward(self, x):
        return Output(super().forward(x))


class NoLogitsNet(DemoCNN):
    def forward(self, x):
        return {"scores": super().forward(x)}


class CubeNet(DemoCNN):
    def forward(self, x):
        return super().forward(x)[:, None, :]


class NaNNet(DemoCNN):
    def forward(self, x):
        return super().forward(x) * float("nan")


class SomeNaNNet(DemoCNN):
    """NaN logits for images whose top-left 2x2 block is bright (the tests plant such rows; no demo image
    has one)."""

    def forward(self, x):
        out = super().forward(x)
        bright = (x[:, 0, :2, :2].amin((1, 2)) > 2.0)[:, None]
        return torch.where(bright, torch.full_like(out, float("nan")), out)


def tuple_net(**kw):
    return TupleNet(**kw)


def payload(**kw):
    """What a hostile factory would do if it were ever called: leave a mark."""
    import pathlib
    pathlib.Path(kw["path"]).write_text("ran")
    return DemoCNN()


class DropoutNet(DemoCNN):
    """Dropout left on in eval mode (F.dropout with training=True): a different output every call."""

    def forward(self, x):
        return super().forward(torch.nn.functional.dropout(x, 0.5, training=True))


class BatchMeanNet(DemoCNN):
    """Normalises the logits over the batch: an image's output depends on its neighbours."""

    def forward(self, x):
        out = super().forward(x)
        return out - out.mean(0, keepdim=True)


class SoftmaxNet(DemoCNN):
    """Returns probabilities, not logits."""

    def forward(self, x):
        return torch.softmax(super().forward(x), 1)


class LogSoftmaxNet(DemoCNN):
    """Returns log-probabilities: softmax gives back the same probabilities, so this is accepted."""

    def forward(self, x):
        return torch.log_softmax(super().forward(x), 1)


class SqueezeNet(DemoCNN):
    """Squeezes every size-1 dimension of its logits, so a batch of one image loses its batch dimension."""

    def forward(self, x):
        return super().forward(x).squeeze()


class BatchOfOneNet(DemoCNN):
    """Fails on a batch of a single image."""

    def forward(self, x):
        if len(x) == 1:
            raise ValueError("expected more than 1 value per channel")
        return super().forward(x)


class BinaryNet(DemoCNN):
    """A binary classifier with one logit per image, shape (N,) (as trained with BCEWithLogitsLoss): "a 3
    rather than a 5", from the demo CNN's two logits."""

    def forward(self, x):
        out = super().forward(x)
        return out[:, 3] - out[:, 5]


class SigmoidBinaryNet(BinaryNet):
    """The same binary model ending in a sigmoid: one probability per image, shape (N, 1)."""

    def forward(self, x):
        return torch.sigmoid(super().forward(x))[:, None]


class InPlaceInputNet(DemoCNN):
    """Rescales its input in place: the caller's images change under it."""

    def forward(self, x):
        x.mul_(1.0001)
        return super().forward(x)


class NoGradBackboneNet(DemoCNN):
    """Runs its backbone under torch.no_grad (a frozen feature extractor written that way): no gradient reaches
    the input."""

    def forward(self, x):
        with torch.no_grad():
            features = self.features(x)
        return self.classifier(features)


class DetachedNet(DemoCNN):
    """Returns detached logits."""

    def forward(self, x):
        return super().forward(x).detach()


class WarningNet(DemoCNN):
    """Warns in its constructor, as library model classes do about deprecated arguments."""

    def __init__(self, **kwargs):
        import warnings
        warnings.warn("the argument 'width' will be removed in a later version", UserWarning)
        super().__init__(**kwargs)
