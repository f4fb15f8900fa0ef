"""SqueezeLLM (Kim et al. 2023, reference SqueezeAILab/SqueezeLLM): dense-and-sparse, non-uniform
quantization. Each output row gets its own 2^bits values, the centroids of k-means over the row's
weights weighted by their Fisher information (the squared gradients of the LM loss, compress/fisher.py),
so the table spends its resolution where the loss is sensitive (reference: quantization/nuq.py,
scikit-learn KMeans per row, max_iter=50, the row's Fisher diagonal as sample weights). An encoder
has no LM loss: there the weights are ||X_j||^2 (our choice, not the paper's: the diagonal of the
layer-wise output error's Hessian).

Dense-and-sparse: before clustering, the most sensitive weights (largest Fisher values, the reference's
`--sensitivity`) and then the largest-magnitude weights (the reference's range outliers, a threshold
per layer) are taken out and kept in float16, CSR. Here both are fractions of the target's kept
weights, 0.05% and 0.45% by default: the paper's 0.5% configuration. Pruned weights stay 0, are never
outliers and take no part in the clustering. The table is stored in float16 and every code is the
nearest stored value, so the packed form reproduces the evaluated weights bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from compress.errors import CompressError
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedWeight
from compress.methods.base import StageParams, TargetMethod, TargetResult
from compress.methods.kmeans import nearest, weighted_kmeans_rows
from compress.methods.registry import register
from compress.model.targets import Target


class SqueezeLLMParams(StageParams):
    """`bits`: 2^bits values per output row (2-8); `outlier_fraction`: the largest-magnitude weights
    kept in float16; `sensitive_fraction`: the weights of largest Fisher information kept in float16
    (both fractions of the target's kept weights, 0 allowed); `kmeans_iterations`: Lloyd steps at most."""

    bits: int = Field(default=4, ge=2, le=8)
    outlier_fraction: float = Field(default=0.0045, ge=0, lt=1)
    sensitive_fraction: float = Field(default=0.0005, ge=0, lt=1)
    kmeans_iterations: int = Field(default=50, gt=0)
    # "uniform": plain k-means, every weight counting the same (the paper's ablation of its
    # sensitivity weighting); the sensitive values are still ranked by the Fisher diagonal
    weighting: Literal["sensitivity", "uniform"] = "sensitivity"

    @model_validator(mode="before")
    @classmethod
    def _no_groups(cls, data: Any) -> Any:
        if isinstance(data, dict) and "group_size" in data:
            raise ValueError("squeezellm has one lookup table per output row: group_size does not apply (remove it)")
        return data

    def check_target(self, target: Target) -> None:
        if target.in_features > 65536 and (self.outlier_fraction or self.sensitive_fraction):
            raise CompressError(f"target {target.name}: input size {target.in_features} exceeds the 16-bit column indices "
                                f"of outliers; exclude the target (targets.exclude) or set outlier_fraction and "
                                f"sensitive_fraction to 0")


def _largest(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` largest `scores` among the `allowed` positions."""
    chosen = torch.zeros_like(allowed)
    if count > 0:
        flat = torch.where(allowed, scores.float(), -torch.inf).flatten()
        chosen.view(-1)[flat.topk(count).indices] = True
    return chosen


def squeezellm_quantize(
    weight: torch.Tensor, fisher: torch.Tensor | None, params: SqueezeLLMParams, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantizedWeight]:
    """(quantized [out, in] weight fp32, its packed form) for one weight and its Fisher diagonal
    ([out, in]; None or empty: no calibration reached the target, every weight counts the same)."""
    weight = weight.float()
    rows, columns = weight.shape
    kept = torch.ones_like(weight, dtype=torch.bool) if keep is None else keep
    informative = fisher is not None and fisher.numel() > 0 and bool((fisher > 0).any())
    sensitivity = fisher.to(weight.device, torch.float32).clamp_min(0) if informative else torch.ones_like(weight)
    total = int(kept.sum())
    # the reference's order: sensitive values first, then range outliers among the rest; without a
    # Fisher diagonal there is nothing to rank sensitivity by
    outlier = _largest(sensitivity, kept, round(params.sensitive_fraction * total) if informative else 0)
    outlier |= _largest(weight.abs(), kept & ~outlier, round(params.outlier_fraction * total))
    cluster_weights = sensitivity if params.weighting == "sensitivity" else torch.ones_like(weight)
    centroids, _ = weighted_kmeans_rows(weight, cluster_weights, 2**params.bits, params.kmeans_iterations, kept & ~outlier)
    lut = centroids.half()  # what is stored: the codes are chosen against it
    codes = nearest(weight, lut.float()).to(torch.uint8)
    outliers = Outliers.from_mask(weight, outlier) if bool(outlier.any()) else None
    packed = QuantizedWeight((rows, columns), params.bits, columns, codes, None, None, outliers, keep=keep, lut=lut)
    return packed.dequantize(), packed


@register
class SqueezeLLM(TargetMethod):
    name = "squeezellm"
    Params = SqueezeLLMParams
    # input_sq_norm: the sensitivity of an encoder, which has no LM loss to take a Fisher diagonal of
    statistics = ("fisher", "input_sq_norm")

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        sensitivity = statistics.get("fisher")
        if sensitivity is None and "input_sq_norm" in statistics:
            # no Fisher diagonal (an encoder): weigh each weight's error by ||X_j||^2, the diagonal of
            # X^T X, as the layer's output error ||(W - W')X||^2 does
            sensitivity = statistics["input_sq_norm"].to(weight.device).expand_as(weight)
        quantized, packed = squeezellm_quantize(weight, sensitivity, self.params, mask)
        return TargetResult(weight=quantized, mask=mask, quantized=packed)
