"""Chain-rule estimators: zeroth-order only where the black box is, autograd through the white-box model.

For ``L(theta) = mean_i loss(O(z_i), f_theta(x_i), x_i, y_i)`` with oracle rows ``z_i = assemble(f_theta(x_i), x_i, y_i)``
(an :class:`~bbzo.objective.OracleObjective`), only ``O`` needs finite differences. The estimators take
``v_i = d loss_i / d z_i`` by finite differences in the oracle's **input space** -- every query moves one
input coordinate (``oracle_cge``) or one random direction (``oracle_rge``) of *all* ``B`` rows at once, since
rows are independent -- and then backpropagate the surrogate

    ``S(theta) = mean_i [ v_i . z_i(theta) + loss(a_i, f_theta(x_i), x_i, y_i) ]``,  ``a_i = O(z_i)`` held fixed,

whose gradient is the chain rule: the first term carries the oracle's part, the second the loss's direct
dependence on the model outputs (an energy term, say). The cost does not depend on the model's size:
``d_in + 1`` queries per step (forward) for ``oracle_cge``, ``q + 1`` for ``oracle_rge``. They need the
model -> oracle -> loss split; a rollout (solver in the loop) or a black-box model has none, and they say so.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError
from ..probes import Probes
from .base import Estimator, EstimatorInfo, Grads, Params
from .registry import register_estimator

__all__ = ["OracleCGE", "OracleRGE"]


class ChainState(NamedTuple):
    step: int
    d_in: int  # the oracle's row width (0 until the first step has seen it)


class _ChainRule(Estimator):
    """Common part: query perturbed rows, form ``v``, backpropagate the surrogate."""

    State = ChainState

    def __init__(self, mu: float = 1e-3, difference: str = "forward", d_in: Optional[int] = None) -> None:
        super().__init__(mu=mu, difference=difference)
        if d_in is not None and d_in < 1:
            raise ConfigError(f"{self.info.name}: d_in must be >= 1, got {d_in}.")
        self.d_in = d_in

    def init(self, params: Params) -> ChainState:
        return ChainState(step=0, d_in=int(self.d_in or 0))

    def _directions(self, d: int) -> int:
        raise NotImplementedError

    #: whether the number of directions depends on the oracle's row width (CGE: one per input coordinate)
    cost_needs_width = True

    def num_probes(self, params: Params, state: NamedTuple) -> int:
        d = state.d_in or self.d_in
        if not d and not self.cost_needs_width:
            d = 1  # any width: the count does not depend on it
        if not d:
            raise ConfigError(f"{self.info.name}: the query cost depends on the oracle's row width; give d_in= or "
                              "let one step run first.")
        m = self._directions(int(d))
        return m if self.difference == "forward" else 2 * m

    def ask(self, params: Params, state: NamedTuple) -> tuple[Probes, NamedTuple]:
        raise ConfigError(f"{self.info.name} perturbs the oracle's inputs, not the parameters; call estimate().")

    def tell(self, params: Params, probes: Probes, losses: torch.Tensor, base_loss: Optional[torch.Tensor]) -> Grads:
        raise ConfigError(f"{self.info.name} is not built from parameter probes; call estimate().")

    def _steps(self, rows: torch.Tensor, state: ChainState) -> tuple[torch.Tensor, int]:
        """``(M, B, d)`` row perturbations (step included) and the number of directions ``m``."""
        raise NotImplementedError

    def _combine(self, diffs: torch.Tensor, pert: torch.Tensor, m: int) -> torch.Tensor:
        """``v`` ``(B, d)`` from directional derivatives ``(m, B)`` along the perturbations."""
        raise NotImplementedError

    def estimate(self, evaluator: Any, params: Params, state: NamedTuple,
                 executor: Any = None) -> tuple[Grads, float, NamedTuple]:
        from ..adapters.common import frozen_bn_stats, repeat_targets

        obj = evaluator.objective
        if not (hasattr(obj, "rows") and hasattr(obj, "loss") and hasattr(obj, "oracle")):
            raise ConfigError(
                f"{self.info.name} needs the model -> oracle -> loss split (a bbzo.OracleObjective): here the "
                "objective is a plain function or a rollout (solver in the loop), which has no oracle input space "
                "to perturb. Use cge / sparse_cge / rge instead.")
        model, x, y, b = evaluator.model, evaluator.inputs, evaluator.targets, evaluator.batch
        inp = x if obj.needs_inputs else None
        live = {n: p for n, p in model.named_parameters() if n in params}
        with torch.enable_grad(), frozen_bn_stats(model):  # one forward: its values feed the queries, its graph the backward
            out = model(x)
            rows_g = obj.rows(out, inp, y)
        out0, rows0 = out.detach(), rows_g.detach()
        if rows0.dim() < 1 or rows0.shape[0] != b:
            raise ConfigError(f"{self.info.name}: the oracle rows must have one row per sample ({b}), got "
                              f"{tuple(rows0.shape)}.")
        flat = rows0.reshape(b, -1)
        d = flat.shape[1]
        if state.d_in and state.d_in != d:
            raise ConfigError(f"{self.info.name}: the oracle rows changed width from {state.d_in} to {d}.")
        state = state._replace(d_in=d)
        self.d_in = d
        pert, m = self._steps(flat, state)  # (m or 2m, B, d)
        sets = torch.cat([flat.unsqueeze(0), flat.unsqueeze(0) + pert])  # the base rows first, then every probe
        n_sets = sets.shape[0]
        evaluator._charge(n_sets)
        evaluator.calls += 1
        with torch.no_grad():
            answers = obj.oracle.query(sets.reshape(n_sets * b, *rows0.shape[1:]))
            per = obj.loss(answers, repeat_targets(out0, n_sets), repeat_targets(inp, n_sets) if inp is not None else None,
                           repeat_targets(y, n_sets))
        per = per.detach().to(torch.float64).view(n_sets, b)
        if not bool(torch.isfinite(per).all()):
            raise NonFiniteError(f"{self.info.name}: the loss is NaN/inf for some perturbed oracle rows; lower mu or "
                                 "check the oracle's valid input range.")
        if self.difference == "forward":
            diffs = (per[1:] - per[0]) / self.mu  # (m, B)
        else:
            diffs = (per[1:1 + m] - per[1 + m:]) / (2 * self.mu)
        v = self._combine(diffs, pert[:m].to(torch.float64), m)  # (B, d) = d loss_i / d z_i
        ans0 = answers[:b]
        with torch.enable_grad():
            rows = rows_g.reshape(b, -1)
            direct = obj.loss(ans0.detach(), out, inp, y)
            surrogate = (v.to(rows.dtype) * rows).sum(1).mean() + direct.mean()
        grads = torch.autograd.grad(surrogate, list(live.values()), allow_unused=True)
        gd = {n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(live.items(), grads)}
        return gd, float(per[0].mean()), state._replace(step=state.step + 1)

    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        state = state if state is not None else (self.state or self.init(params))
        return self.num_probes(params, state) + 1  # and the base rows (central: for the loss's direct term)


@register_estimator
class OracleCGE(_ChainRule):
    """Coordinate-wise differences in the oracle's input space, then autograd through the model (chain rule).

    Args:
        mu: Step in the oracle's input units.
        difference: ``forward`` (``d_in + 1`` queries) or ``central`` (``2 d_in + 1``: the base rows give the
            loss's direct term).
        d_in: The oracle's row width (learnt on the first step if not given).
    """

    info = EstimatorInfo(
        name="oracle_cge",
        description="chain rule: CGE over the oracle's d_in inputs (all rows at once), autograd through the model",
        cost="d_in + 1 (forward) | 2 d_in + 1 (central)",
        coordinatewise=False,
        supports_sparse=False,
    )

    def _directions(self, d: int) -> int:
        return d

    def _steps(self, rows: torch.Tensor, state: ChainState) -> tuple[torch.Tensor, int]:
        b, d = rows.shape
        eye = torch.eye(d, dtype=rows.dtype, device=rows.device) * self.mu
        pert = eye[:, None, :].expand(d, b, d)
        if self.difference == "central":
            pert = torch.cat([pert, -pert])
        return pert, d

    def _combine(self, diffs: torch.Tensor, pert: torch.Tensor, m: int) -> torch.Tensor:
        return diffs.T  # (B, d): row j of the identity moved coordinate j of every row


@register_estimator
class OracleRGE(_ChainRule):
    """Random directions in the oracle's input space (independent per row), then autograd through the model.

    Args:
        q: Directions per step (each moves every row along its own Gaussian direction).
        mu, difference, d_in: As :class:`OracleCGE`.
        seed: Seed of the direction stream (step ``t`` uses ``(seed, t)``).
    """

    info = EstimatorInfo(
        name="oracle_rge",
        description="chain rule: RGE with q directions in the oracle's input space, autograd through the model",
        cost="q + 1 (forward) | 2q + 1 (central)",
        coordinatewise=False,
        supports_sparse=False,
    )

    def __init__(self, q: int = 8, mu: float = 1e-3, difference: str = "forward", d_in: Optional[int] = None,
                 seed: int = 0) -> None:
        super().__init__(mu=mu, difference=difference, d_in=d_in)
        if q < 1:
            raise ConfigError(f"oracle_rge: q must be >= 1, got {q}.")
        self.q, self.seed = int(q), int(seed)

    cost_needs_width = False  # q directions whatever the row width

    def _directions(self, d: int) -> int:
        return self.q

    def _steps(self, rows: torch.Tensor, state: ChainState) -> tuple[torch.Tensor, int]:
        b, d = rows.shape
        s = int(np.random.SeedSequence([self.seed, state.step, 0xC4A1]).generate_state(1)[0])
        g = torch.Generator().manual_seed(s)
        u = torch.randn(self.q, b, d, generator=g, dtype=torch.float64).to(device=rows.device, dtype=rows.dtype)
        pert = u * self.mu
        if self.difference == "central":
            pert = torch.cat([pert, -pert])
        return pert, self.q

    def _combine(self, diffs: torch.Tensor, pert: torch.Tensor, m: int) -> torch.Tensor:
        u = pert / self.mu  # (q, B, d)
        return (diffs[:, :, None] * u).mean(0)

