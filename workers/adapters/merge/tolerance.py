"""How close a merged model must come to the adapter applied to its base, per merge dtype."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """How close the merged model's logits must be to the adapter applied to its unquantized base (the reference).

    S, the logit scale, is the largest |logit| the reference in the merge dtype produces on the probes.

    float32: fixed bounds, max |Δlogit| <= max_rel · S and mean |Δlogit| <= mean_rel · S against the reference,
    1e-3 and 1e-4. The merged layer computes (W + s·B·A)·x where the reference computes W·x + s·B·(A·x), the same
    function in another order, so they differ by float32 rounding (u = 6e-8, about u·sqrt(fan_in) per layer):
    measured max 7e-7 to 2e-6 of S on random Llamas of 2 to 16 layers; deeper and wider models add an order of
    magnitude or two, which the bound still covers, while dropping the delta of one layer of a trained adapter moves
    the logits by far more (the tests drop one down_proj: see test_merge.py).

    bfloat16 and float16: relative to the dtype's own rounding noise, measured on the model at hand. A fixed
    fraction of S cannot fit every model: rounding noise grows with depth and width (a correct bfloat16 merge of a
    32-layer Llama-3.1-8B-shaped random model was off its bfloat16 reference by max 8.2 % of S, over the 8 % once
    fixed from 2- and 16-layer models), and a bound wide enough for the deepest model misses real errors in small
    ones. So the reference is also run in float32, the exact result to float32 rounding, and the merged model and
    the reference in the merge dtype are both scored against it on the same sequences. The merge is verified when
    it is no further from the exact result than computing in the dtype costs anyway:

        merged max |Δ| <= max_margin · reference max |Δ| + floor_max_rel · S
        merged mean |Δ| <= mean_margin · reference mean |Δ| + floor_mean_rel · S

    The two err in comparable amounts, not equal ones: the merged model rounds W + ΔW to the dtype once where the
    reference keeps W as loaded and rounds the sum of its base and LoRA outputs. For correct merges of random Llamas
    (2 layers of 64 to 32 of 128, 16 of 256 and 4 of 512; trained and random adapters on every projection; float32
    and bfloat16 checkpoints; on the CPU) the merged/reference ratio measured 0.92-1.14 for the mean and 0.36-1.22
    for the max, a noisier extreme: hence margins 1.5 (mean) and 2 (max). The floors, about a tenth of the smallest
    noise measured (1e-3 and 1e-4 of S for bfloat16, 8x less for float16's three more mantissa bits), only matter
    where the reference's own error is near zero. Dropping one layer's delta gave mean ratios of 3.8 to 600, and
    scaling one layer's delta by 1.1 gave 1.1 to 5.8 in bfloat16: such a change is caught where it moves the logits
    more than rounding does (the tests scale a deep o_proj's delta: ratio 4, which the fixed bound let through).
    Token and greedy agreement are not criteria: rounding flips near-tied tokens, and random weights give
    near-uniform logits, all near-ties.

    When the float32 reference cannot be run (it would not fit in memory, or failed), the fixed bounds apply to
    bfloat16 and float16 too, against the reference in the merge dtype: bfloat16 8e-2 (max) and 1e-2 (mean),
    float16 1e-2 and 1.25e-3. Measured max 1.7-1.9 % and mean 0.22-0.28 % of S for bfloat16, 0.2 % and 0.03 % for
    float16, on 2 and 16 layers; deep, wide models can exceed them (the 8B shape above), and the figures say which
    rule was applied and why.
    """

    max_rel: float
    mean_rel: float
    max_margin: float = 0.0  # 0: fixed bounds only
    mean_margin: float = 0.0
    floor_max_rel: float = 0.0
    floor_mean_rel: float = 0.0

    @property
    def noise_floor(self) -> bool:
        """Whether the merge dtype is held to its own rounding noise (measured against a float32 reference)."""
        return self.mean_margin > 0


TOLERANCES = {
    "float32": Tolerance(max_rel=1e-3, mean_rel=1e-4),
    "bfloat16": Tolerance(
        max_rel=8e-2, mean_rel=1e-2, max_margin=2.0, mean_margin=1.5, floor_max_rel=1e-3, floor_mean_rel=1e-4
    ),
    "float16": Tolerance(
        max_rel=1e-2, mean_rel=1.25e-3, max_margin=2.0, mean_margin=1.5, floor_max_rel=1.25e-4, floor_mean_rel=1.25e-5
    ),
}
