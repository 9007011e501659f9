"""Programs for the reserved-input tests, imported by class path from a worker's config."""

from __future__ import annotations

from typing import Any

import dspy


class ConfigSignature(dspy.Signature):
    """Answer the question."""

    config: str = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class LmInForward(dspy.Module):
    """A module whose forward takes ``lm`` by name: a tenant's value would become the LM."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str, lm: Any = None) -> dspy.Prediction:
        return self.predict(question=question, lm=lm)


class DemosDownstream(dspy.Module):
    """A second predictor takes ``demos``: the first one's answer would steer the prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("question -> draft")
        self.second = dspy.Predict("draft, demos -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.first(question=question).draft
        return self.second(draft=draft, demos=draft)


class KwargsModule(dspy.Module):
    """A valid module whose forward passes ``**kwargs`` on to its predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        return self.predict(**kwargs)
