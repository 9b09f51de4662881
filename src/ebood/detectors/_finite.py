"""The non-finite rule shared by every detector (see CONVENTIONS.md, "Non-finite values").

* NaN anywhere in an input row (features, logits, input images) is an error naming the rows.
* An infinite feature or input pixel is an error too: distances, norms and products with a head
  have no limit that the value alone defines.
* An infinite logit gives the limit of the score as that logit goes to +/-inf (the float64 limit,
  as ``ebood.scores`` defines it: a ``+inf`` logit takes all the softmax mass, a ``-inf`` one none).
  Where the limit does not exist (softmax of a row whose logits are all ``-inf``), the row is an
  error.
* Training inputs must be finite: fitted statistics are sums that one infinity would spoil.

So a detector never returns NaN; it returns +/-inf only where an infinite logit makes the limit
infinite (energy of a row with a ``+inf`` logit is ``-inf``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NonFiniteError", "check_finite_rows", "check_scores", "rows_text"]


class NonFiniteError(ValueError):
    """Input holding NaN (or inf where no limit is defined), or a score that would be NaN."""


def rows_text(rows: torch.Tensor) -> str:
    """``"3 row(s): 0, 4, 17"`` for a bool mask or an index tensor (the first ten indices)."""
    idx = torch.nonzero(rows)[:, 0] if rows.dtype == torch.bool else rows
    shown = ", ".join(str(int(i)) for i in idx[:10].tolist())
    return f"{idx.numel()} row(s): {shown}{', ...' if idx.numel() > 10 else ''}"


def non_finite_rows(x: torch.Tensor, nan_only: bool = False) -> torch.Tensor | None:
    """Bool mask of the rows of ``x`` holding NaN (``nan_only``) or any non-finite value; None when
    there is none. One read (``aminmax``) when every value is finite."""
    if x.numel() == 0 or not x.is_floating_point():
        return None
    low, high = torch.aminmax(x)  # NaN propagates; +/-inf shows in the extremes
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    bad = torch.isnan(x) if nan_only else ~torch.isfinite(x)
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if x.ndim > 1 else bad
    return rows if bool(rows.any()) else None


def check_finite_rows(x: torch.Tensor, what: str, detector: str) -> None:
    """A :class:`NonFiniteError` naming the rows of ``x`` that hold NaN or inf."""
    rows = non_finite_rows(x)
    if rows is not None:
        raise NonFiniteError(f"detector {detector!r}: {what} hold non-finite values (NaN or inf) in {rows_text(rows)}")


def check_nan_rows(x: torch.Tensor, what: str, detector: str) -> None:
    """A :class:`NonFiniteError` naming the rows of ``x`` that hold NaN (inf is allowed)."""
    rows = non_finite_rows(x, nan_only=True)
    if rows is not None:
        raise NonFiniteError(f"detector {detector!r}: {what} hold NaN in {rows_text(rows)}")


def check_scores(scores: torch.Tensor, outputs: Any, detector: str) -> torch.Tensor:
    """``scores``, or a :class:`NonFiniteError` where one is NaN: naming the input rows that hold
    NaN, or the rows whose score has no limit."""
    nan = torch.isnan(scores)
    if not bool(nan.any()):
        return scores
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.shape[:1] == scores.shape[:1]:
        idx = torch.nonzero(nan)[:, 0]  # only the rows with a NaN score are read again
        sub = logits[idx.to(logits.device)]
        has_nan = torch.isnan(sub).reshape(idx.numel(), -1).any(dim=1).to(idx.device)
        if bool(has_nan.any()):
            raise NonFiniteError(f"detector {detector!r}: logits hold NaN in {rows_text(idx[has_nan])}")
    raise NonFiniteError(
        f"detector {detector!r}: the score is undefined (NaN) in {rows_text(nan)}; "
        "e.g. the softmax of a row whose logits are all -inf has no limit"
    )
