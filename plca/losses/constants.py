"""The association formulas' constants and defaults (project spec plca.md), each defined once.

Shared by the block-wise path (`association.py`, `chunked.py`) and the dense one (`dense.py`). This module imports
neither, so `association.py` can import `dense.py` at module level without an import circle.
"""

from __future__ import annotations

from typing import Literal

Similarity = Literal["cosine", "kl"]
SIMILARITIES: tuple[str, ...] = ("cosine", "kl")

#: Weight of the aggregated features in SAGG (Eq 7-8): x~ = (1 - alpha) x + alpha sum_k w_k x_k (the paper's 0.5).
DEFAULT_ALPHA = 0.5
#: Added to the row std before dividing (spec, Eq 5-6).
CN_EPS = 1e-10
#: Norm floor of a unit vector, as torch.nn.functional.normalize (the released code's cosine).
NORM_EPS = 1e-12
#: Inside the logs of KL(a || b) (spec).
KL_EPS = 1e-10
#: The released code takes -log(P_st * P_ts) through BCE, which clamps the log at -100.
LOG_CLAMP = -100.0
