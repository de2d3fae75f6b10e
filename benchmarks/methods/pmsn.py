"""``pmsn``: MSN with a power-law prior on the prototypes (PMSN [1]).

"PMSN [...] replaces the uniform prior of MSN with a power-law distribution" [1]:
the regulariser is ``KL(mean anchor prediction || power-law prior)`` instead of
ME-MAX. Everything else is ``msn``; the prior comes from this package's ``MSNLoss``
(``target_distribution="power_law"``, exponent 0.25 as lightly's ``PMSNLoss``).

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: Prior Matching for Masked Siamese Networks, 2022,
  https://arxiv.org/abs/2210.07277
"""

from __future__ import annotations

from typing import Any, ClassVar

from benchmarks.methods.base import BenchmarkConfig
from benchmarks.methods.msn import MSNMethod
from lightly_msn.loss import MSNLoss


class PMSNMethod(MSNMethod):
    name: ClassVar[str] = "pmsn"
    defaults: ClassVar[dict[str, Any]] = dict(
        MSNMethod.defaults, power_law_exponent=0.25
    )

    @classmethod
    def from_config(cls, config: BenchmarkConfig) -> MSNMethod:
        method = super().from_config(config)
        method.criterion = MSNLoss(
            temperature=method.criterion.temperature,
            sinkhorn_iterations=method.criterion.sinkhorn_iterations,
            regularization_weight=method.criterion.regularization_weight,
            gather_distributed=method.criterion.gather_distributed,
            target_distribution="power_law",
            power_law_exponent=method.recipe["power_law_exponent"],
        )
        return method
