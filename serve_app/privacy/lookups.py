"""Attacks that read tokens off the rows sent with the weights alone, or with a few rows
the adversary knows in the clear: the nearest row (by L2, by cosine, among the 5 nearest),
the nearest row norm (what a rotation keeps), and the nearest row after undoing a linear
map fitted to known (clean, sent) pairs (least squares, and orthogonal Procrustes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOP_K = 5
# Rows compared with the whole matrix at once: bounds the distance matrix (rows x vocab).
_RECOVERY_CHUNK_ROWS = 256


@dataclass(frozen=True)
class TokenRecovery:
    """Fractions of the rows sent whose true token an upstream with the weights finds: the
    nearest row of the matrix by L2, by cosine, and among the 5 nearest by L2; and the most
    any attack of the suite reads (`worst`, by `worst_attack`)."""

    l2: float
    cosine: float
    top5: float
    worst: float | None = None
    worst_attack: str | None = None


def token_recovery(rows: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]],
                   weight: torch.Tensor) -> TokenRecovery:
    """What a nearest-row lookup in `weight` reads back from `rows`, against the true ids."""
    matrix = weight.float()
    unit_matrix = F.normalize(matrix, dim=1)
    sent = torch.cat(list(rows)).to(matrix.device, torch.float32)
    truth = torch.tensor([i for prompt in prompts for i in prompt], device=matrix.device)
    l2 = cosine = top5 = 0
    with torch.inference_mode():
        for start in range(0, sent.shape[0], _RECOVERY_CHUNK_ROWS):
            chunk = sent[start:start + _RECOVERY_CHUNK_ROWS]
            expected = truth[start:start + _RECOVERY_CHUNK_ROWS]
            nearest = torch.cdist(chunk, matrix).topk(TOP_K, largest=False).indices
            l2 += int((nearest[:, 0] == expected).sum())
            top5 += int((nearest == expected[:, None]).any(dim=1).sum())
            by_angle = (F.normalize(chunk, dim=1) @ unit_matrix.T).argmax(dim=1)
            cosine += int((by_angle == expected).sum())
    total = int(truth.numel())
    return TokenRecovery(l2=l2 / total, cosine=cosine / total, top5=top5 / total)


def nearest_rows(sent: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's nearest matrix row by L2 (float64), in chunks of rows."""
    matrix = weight.double()
    return torch.cat([torch.cdist(chunk.double(), matrix).argmin(dim=1)
                      for chunk in sent.split(_RECOVERY_CHUNK_ROWS)])


def recovered(read: torch.Tensor, truth: torch.Tensor) -> float:
    return float((read == truth).double().mean())


def row_norms(sent: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor) -> float:
    """Each row read as the token whose matrix row's norm is nearest its own: what a norm-
    keeping map (a rotation, a permutation, sign flips) leaves, with no plaintext."""
    norms, order = weight.double().norm(dim=1).sort()
    sent_norms = sent.double().norm(dim=1)
    above = torch.searchsorted(norms, sent_norms).clamp(max=len(norms) - 1)
    below = (above - 1).clamp(min=0)
    nearer_below = (sent_norms - norms[below]).abs() < (norms[above] - sent_norms).abs()
    return recovered(order[torch.where(nearer_below, below, above)], truth)


@dataclass(frozen=True)
class LinearMapOutcome:
    """Tokens read after undoing a linear map fitted to `known_rows` known pairs."""

    least_squares: float
    procrustes: float
    known_rows: int


def linear_map(sent: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor,
               known_clean: torch.Tensor, known_sent: torch.Tensor) -> LinearMapOutcome:
    """Fit clean ~ sent from the known pairs, by least squares (an affine map) and by
    orthogonal Procrustes (a rotation), undo each on the rows sent, then the nearest row."""
    clean, seen = known_clean.double(), known_sent.double()
    ones = torch.ones(seen.shape[0], 1, dtype=torch.float64)
    affine = torch.linalg.lstsq(torch.cat([seen, ones], dim=1), clean).solution
    victim = sent.double()
    undone = torch.cat([victim, torch.ones(victim.shape[0], 1, dtype=torch.float64)],
                       dim=1) @ affine
    u, _, vt = torch.linalg.svd(seen.T @ clean)
    rotated = victim @ (u @ vt)
    return LinearMapOutcome(least_squares=recovered(nearest_rows(undone, weight), truth),
                            procrustes=recovered(nearest_rows(rotated, weight), truth),
                            known_rows=int(seen.shape[0]))
