"""Model outputs -> top-k ``{label: score}`` per image, highest score first."""

from __future__ import annotations

import torch

# One image's answer: the top-k classes and their probabilities, highest first.
Prediction = dict[str, float]


def top_k_labels(logits: torch.Tensor, labels: list[str], k: int) -> list[Prediction]:
    """Softmax over classes, then the k best as an ordered dict per row (the stock handler's shape)."""
    probs = torch.softmax(logits.float(), dim=1)
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        {labels[i]: round(s, 6) for s, i in zip(row_scores, row_indices)}
        for row_scores, row_indices in zip(scores.cpu().tolist(), indices.cpu().tolist())
    ]
