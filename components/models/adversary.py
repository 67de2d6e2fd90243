"""ACE-BERT's adversary (paper 3.3): a domain classifier against the two towers.

The classifier D tells query embeddings (1) from product embeddings (0) with the cross-entropy of
Eq. 6 (`modeling.domain_loss`) and learns only from detached embeddings, with its own optimiser.
The towers are pushed to make the two kinds of embedding indistinguishable, in one of three ways
(`finetune.adversarial.method`):

- `confusion` (default; Tzeng et al. 2015): the towers minimise the cross-entropy of D's output
  against 1/2 (`modeling.confusion_loss`). Its gradient at D's logit is sigmoid(z) - 1/2, which
  stays large when D is confident: it does not saturate.
- `grl` (DANN, Ganin & Lempitsky 2015): a gradient reversal layer between the embeddings and D;
  the towers receive -lambda times D's gradient of Eq. 6, i.e. they maximise D's loss. Its
  gradient at D's logit is lambda (sigmoid(z) - y), which vanishes as D becomes confident.
- `alternating` (the paper's schedule, Eq. 7-8): like `grl` for the towers, but D is updated
  only after every `tower_steps` tower steps, on the embeddings of those steps.

With `confusion` and `grl`, D takes `classifier_steps` steps after every tower step on that
step's embeddings. lambda follows `schedule`: `constant`, or DANN's ramp
lambda_p = weight * (2 / (1 + exp(-10 p)) - 1), p the share of training done, so the towers
first learn the task and the pressure grows as D becomes informative. In every method D's
weights are fixed while the towers' loss is differentiated, so a tower step never changes D
and a D step never changes a tower.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.config import AdversarialConfig
from components.models.modeling import confusion_loss, domain_loss


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, lam: float
    ) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return _GradientReversal.apply(x, lam)


def ramp(weight: float, schedule: str, progress: float) -> float:
    """lambda at `progress` (0..1) of training."""
    if schedule == "constant":
        return weight
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class Adversary:
    """The domain classifier, its optimiser and the towers' adversarial term."""

    def __init__(self, classifier: nn.Module, cfg: AdversarialConfig, total_steps: int) -> None:
        self.classifier, self.cfg, self.total_steps = classifier, cfg, max(1, total_steps)
        self.optimizer = torch.optim.Adam(classifier.parameters(), lr=cfg.classifier_learning_rate)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def weight(self, step: int) -> float:
        return ramp(self.cfg.weight, self.cfg.schedule, step / self.total_steps)

    def tower_loss(self, queries: torch.Tensor, products: torch.Tensor, step: int) -> torch.Tensor:
        """The towers' adversarial term at this step; D's weights take no gradient from it."""
        lam = self.weight(step)
        self.classifier.requires_grad_(False)
        try:
            if self.cfg.method == "confusion":
                logits = self.classifier(torch.cat([queries, products])).squeeze(-1)
                return lam * confusion_loss(logits)
            if self.cfg.method == "grl":
                return domain_loss(
                    self.classifier, reverse_gradient(queries, lam), reverse_gradient(products, lam)
                )
            return -lam * domain_loss(self.classifier, queries, products)  # alternating
        finally:
            self.classifier.requires_grad_(True)

    def observe(self, queries: torch.Tensor, products: torch.Tensor) -> None:
        """Keep a tower step's embeddings (detached) for D's next update."""
        # fp32: the classifier's own update runs outside the towers' bf16 autocast.
        self.pending.append((queries.detach().float(), products.detach().float()))

    def due(self) -> bool:
        needed = self.cfg.tower_steps if self.cfg.method == "alternating" else 1
        return len(self.pending) >= needed

    def classifier_steps(self) -> dict[str, float]:
        """D learns from the pending embeddings; the towers stay fixed. Its accuracy is measured
        on them before it trains on them (embeddings it has not seen)."""
        queries = torch.cat([q for q, _ in self.pending])
        products = torch.cat([p for _, p in self.pending])
        self.pending.clear()
        with torch.no_grad():
            logits = self.classifier(torch.cat([queries, products])).squeeze(-1)
            accuracy = balanced_accuracy(logits, len(queries))
        for _ in range(self.cfg.classifier_steps):
            loss = domain_loss(self.classifier, queries, products)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"classifier_loss": loss.item(), "classifier_accuracy": accuracy}


def balanced_accuracy(logits: torch.Tensor, n_queries: int) -> float:
    """Mean of the accuracy on queries (logit > 0) and on products (logit <= 0)."""
    on_queries = (logits[:n_queries] > 0).float().mean()
    on_products = (logits[n_queries:] <= 0).float().mean()
    return float((on_queries + on_products) / 2)
