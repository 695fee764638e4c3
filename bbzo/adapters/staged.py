"""Feature reuse for staged models (DeepZero §5, "feature reuse"); stages are declared with :mod:`bbzo.stages`.

For a probe that moves a tensor of stage ``i`` the evaluator computes the activations before ``i`` once
per minibatch and runs only stages ``i..n-1`` on a ``K x B`` batch (K perturbed parameter sets at
once). When stage ``i`` is a ``Conv2d``/``Linear`` (optionally inside :class:`~bbzo.stages.OnFirst`),
the probes give the perturbed outputs from linearity (``probes.linear_delta``, see
:mod:`bbzo.adapters.linear_delta`): the perturbed stage itself costs a gather, not a convolution.

Stages that contain a train-mode BatchNorm couple the samples of a batch; they run with per-set batch
statistics (torch's BN kernel on the free view ``(B, K*C, ...)``, or ``vmap`` for other coupled
stages). All other stages run on the flattened ``(B*K, ...)`` batch.

Probes that move every stage at once (RGE's :class:`~bbzo.probes.DirectionProbes`) run whole perturbed
parameter sets, ``K`` at once, through :mod:`bbzo.adapters.stacked` (the input's patches shared, BN folded
into the first conv); a model with a stage it has no rule for, and tensors outside every stage, go to the
generic ``torch.func`` adapter.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ConfigError
from ..ledger import QueryLedger
from ..probes import BlockProbes, CoordinateProbes, DirectionProbes, Probes
from ..stages import Merge, OnFirst, model_stages
from .channel import ELEMENTWISE, Unperturbed, Channel, channel_advance, channel_core, channel_start, densify, is_dense
from .pooling import pool_span
from .runners import first_only, fused_runner, stage_runner
from .common import Adapter, Evaluator, chunk_size, dense_sets, frozen_bn_stats, tree_bytes
from .functional import FunctionalAdapter
from .linear_delta import block_outputs, coordinate_outputs, linear_core
from .stacked import stacked_plan

__all__ = ["StagedAdapter", "StagedEvaluator", "stage_runner", "STACKED", "FALLBACK"]

#: Cost classes of :meth:`StagedEvaluator.chunks` besides the start stages: the generic evaluator's calls, and
#: whole parameter sets through :mod:`bbzo.adapters.stacked`.
FALLBACK = -1
STACKED = -2
#: Per-set working set of the stacked path: this many copies of its largest per-set activation (the activations a
#: chunk holds between stages; a conv block's temporaries are one set's at a time).
STACKED_SETS = 2
#: At most about this many parameter sets per stacked call (a multiple of the head's block of sets), so that a step's
#: directions form several chunks that a distributed run can deal out.
STACKED_MAX_SETS = 64


def _has_dense(rep: Any) -> bool:
    """Whether any element of a (tuple) representation is a dense ``(B, K, ...)`` tensor."""
    return any(_has_dense(r) for r in rep) if isinstance(rep, tuple) else isinstance(rep, torch.Tensor)


def _channels(act: Any) -> int:
    """Channels of an activation (dim 1 of its first tensor; 1 for flat ones)."""
    t = act[0] if isinstance(act, tuple) else act
    return int(t.shape[1]) if isinstance(t, torch.Tensor) and t.dim() > 1 else 1


class StagedAdapter(Adapter):
    """Feature-reuse adapter for staged models (``nn.Sequential`` or ``bbzo_stages()``).

    Args:
        model: The staged model.
        linear_shortcut: Use the probes' linear delta for Conv2d/Linear stages (exact; on by default).
        channel_reuse: Carry a coordinate's one-channel change until the next layer that mixes channels
            (:mod:`bbzo.adapters.channel`; exact; on by default).
        stacked_directions: Evaluate direction probes (RGE) as whole parameter sets stacked through the stages
            (:mod:`bbzo.adapters.stacked`; exact; on by default); off: the generic ``torch.func`` adapter.
        max_chunk_bytes, max_chunk: Bound the K perturbed sets evaluated per batched call.
    """

    reuses_features = True

    def __init__(self, model: nn.Module, *, linear_shortcut: bool = True, channel_reuse: bool = True,
                 stacked_directions: bool = True, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.channel_reuse = channel_reuse
        #: per start stage: the first stage that runs dense on the channel path (learnt on first use)
        self.dense_from: dict[int, int] = {}
        stages = model_stages(model)
        if stages is None:
            raise ConfigError(
                f"{type(model).__name__} declares no stages, so features cannot be reused. Give it a "
                "bbzo_stages() method returning its stages in order (see bbzo.stages), wrap it "
                "in nn.Sequential, or use feature_reuse=False (the generic torch.func adapter)."
            )
        self.stages = stages
        self.linear_shortcut = linear_shortcut
        owner: dict[int, tuple[int, str]] = {}
        for i, st in enumerate(stages):
            for local, p in st.named_parameters():
                if id(p) in owner and owner[id(p)][0] != i:
                    raise ConfigError(
                        f"parameter {local!r} appears in stages {owner[id(p)][0]} and {i}; shared weights "
                        "cannot use feature reuse. Use feature_reuse=False."
                    )
                owner.setdefault(id(p), (i, local))
        #: global parameter name -> (stage index, name inside the stage)
        self.stage_of: dict[str, tuple[int, str]] = {}
        for name, p in model.named_parameters():
            if id(p) in owner:
                self.stage_of[name] = owner[id(p)]
        self.local_names = {g: local for g, (_, local) in self.stage_of.items()}
        self.fallback = FunctionalAdapter(model, max_chunk_bytes=self.max_chunk_bytes, max_chunk=self.max_chunk)
        #: how whole parameter sets run through the stages (None: no rule for some stage -> the fallback)
        self.stacked = stacked_plan(stages) if stacked_directions else None
        #: per stage: ``[(local name, global name or None, parameter), ...]``
        self.stage_params: list[list[tuple[str, Optional[str], torch.Tensor]]] = []
        global_of = {id(p): n for n, p in model.named_parameters()}
        for st in stages:
            self.stage_params.append([(local, global_of.get(id(p)), p) for local, p in st.named_parameters()])

    def bind(self, objective: Any, inputs: Any, targets: Any,
             ledger: Optional[QueryLedger] = None) -> "StagedEvaluator":
        return StagedEvaluator(self, self.model, self.prepare_objective(objective), inputs, targets,
                               self.trainable(), self.max_chunk_bytes, self.max_chunk, ledger=ledger)

    def record_dense_from(self, start: int, dense_from: int) -> None:
        """Remember where the channel path of probes starting at stage ``start`` densifies (sizes later chunks)."""
        self.dense_from[start] = dense_from


class StagedEvaluator(Evaluator):
    """Evaluates probes with stage-level feature reuse; stacked activations are ``(B, K, ...)``."""

    def __init__(self, adapter: StagedAdapter, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.adapter = adapter
        self.stages = adapter.stages
        self._runners = [stage_runner(st) for st in self.stages]
        #: stage j -> one runner for stages j and j+1 (BatchNorm then ReLU), used when both run densely
        self._fused = {j: f for j in range(len(self.stages) - 1)
                       if (f := fused_runner(self.stages[j], self.stages[j + 1])) is not None}
        self._first_only = [first_only(st) for st in self.stages]
        self._acts: Optional[list[Any]] = None
        self._fallback_ev: Optional[Evaluator] = None
        self._shortcuts: dict[int, torch.Tensor] = {}
        self._unfolds: dict[int, Optional[torch.Tensor]] = {}
        self._dense_sets = dense_sets(tree_flatten(self.inputs)[0][0].device)
        self._stacked_cache: dict = {}
        self._stacked_k: Optional[int] = None

    # -------------------------------------------------------------- cached activations
    @property
    def acts(self) -> list[Any]:
        """``acts[i]`` = input of stage ``i``; ``acts[n]`` = model output (computed once per batch)."""
        if self._acts is None:
            acts = [self.inputs]
            with torch.no_grad(), frozen_bn_stats(self.model):
                for st in self.stages:
                    acts.append(st(acts[-1]))
            self._acts = acts
        return self._acts

    def _base_losses(self) -> torch.Tensor:
        return self._loss(tree_map(lambda t: t.unsqueeze(0), self.acts[-1]), 1)[0]

    def _downstream_bytes(self, i: int) -> int:
        """Rough peak bytes per perturbed set when running stages ``i..n-1``."""
        return 2 * max(tree_bytes(a) for a in self.acts[i + 1:])

    def _run_downstream(self, i: int, act_k: Any, k: int) -> Any:
        """Stages ``i+1..n-1`` on ``(B, K, ...)`` activations."""
        j, n = i + 1, len(self.stages)
        while j < n:
            fused = self._fused.get(j)
            act_k = (fused or self._runners[j])(act_k, k)
            j += 2 if fused else 1
        return act_k

    def _perturbed_stage(self, i: int, probes: Probes) -> Any:
        """Output ``(B, K, ...)`` of stage ``i`` under the K probes (all of which move this stage)."""
        layer, pos = linear_core(self.stages[i]) if self.adapter.linear_shortcut else (None, None)
        if layer is not None:
            x = self.acts[i] if pos is None else self.acts[i][pos]
            base_out = self.acts[i + 1] if pos is None else self.acts[i + 1][pos]
            out = self._linear_outputs(layer, x, base_out, probes)
            if out is not None:
                if pos is None:
                    return out
                k = len(probes)
                rest = tuple(t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:]) for t in self.acts[i + 1][1:])
                return (out, *rest)
        return self._vmapped_stage(i, probes.stack(self.params))

    def _linear_outputs(self, layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, probes: Probes
                        ) -> Optional[torch.Tensor]:
        """A Conv2d/Linear stage's outputs ``(B, K, ...)`` under the probes, by linearity in its weights (or None)."""
        local = self.adapter.local_names
        if isinstance(probes, CoordinateProbes):
            names = [local[probes.names[p]] for p in probes.pidx.tolist()]
            return coordinate_outputs(layer, x, base_out, names, probes.index, probes.delta)
        if isinstance(probes, BlockProbes):
            return block_outputs(layer, x, base_out, local[probes.name], probes.dirs, probes.delta)
        return None

    def _vmapped_stage(self, i: int, stacked_global: dict[str, torch.Tensor]) -> Any:
        """Stage ``i`` under ``vmap`` over K stacked copies of the touched parameters -> ``(B, K, ...)``."""
        st, act = self.stages[i], self.acts[i]
        local_params = {n: p.detach() for n, p in st.named_parameters()}
        stacked = {self.adapter.local_names[g]: v for g, v in stacked_global.items()}
        fixed = {n: p for n, p in local_params.items() if n not in stacked}
        buffers = dict(st.named_buffers())

        def f(batched: dict[str, torch.Tensor]) -> Any:
            return functional_call(st, ({**fixed, **batched}, buffers), (act,))

        return vmap(f, out_dims=1, randomness="same")(stacked)

    # -------------------------------------------------------------- channel-level reuse
    def _channel_rep(self, i: int, probes: Probes) -> Any:
        """Stage ``i``'s output under the probes in the channel representation, or None (dense path)."""
        if not self.adapter.channel_reuse:
            return None
        layer, pos = channel_core(self.stages[i])
        if layer is None:
            return None
        x = self.acts[i] if pos is None else self.acts[i][pos]
        base_out = self.acts[i + 1] if pos is None else self.acts[i + 1][pos]
        span = pool_span(self.stages, i + 1) if pos is None and isinstance(layer, nn.Conv2d) else 0
        pool = (self.stages[i + 1:i + 1 + span], self.acts[i + 1 + span]) if span else None
        if not isinstance(probes, CoordinateProbes):
            return None  # a direction moves every channel of its layer
        names = [self.adapter.local_names[probes.names[p]] for p in probes.pidx.tolist()]
        rep = channel_start(layer, x, base_out, names, probes.index, probes.delta, lambda: self._unfolded(i, layer, x),
                            pool)
        if rep is None or pos is None:
            return rep
        return (rep, *(Unperturbed(t) for t in self.acts[i + 1][1:]))

    def _unfolded(self, i: int, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Stage ``i``'s conv input patches ``(B, C*kh*kw, Ho*Wo)``, once per minibatch, if they fit the chunk bound."""
        if i not in self._unfolds:
            unf = None
            if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
                kh, kw = layer.kernel_size
                out = self.acts[i + 1][0] if isinstance(self.acts[i + 1], tuple) else self.acts[i + 1]
                need = x.shape[0] * x.shape[1] * kh * kw * out.shape[2] * out.shape[3] * x.element_size()
                if need <= 2 * self.max_chunk_bytes:
                    with torch.no_grad():
                        unf = F.unfold(x, (kh, kw), dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            self._unfolds[i] = unf
        return self._unfolds[i]

    def _shortcut_base(self, j: int) -> torch.Tensor:
        """The unperturbed shortcut output of Merge stage ``j`` (computed once per minibatch)."""
        if j not in self._shortcuts:
            with torch.no_grad():
                self._shortcuts[j] = self.stages[j].shortcut(self.acts[j][1])
        return self._shortcuts[j]

    def _advance(self, i: int, rep: Any, k: int) -> tuple[Any, int, int]:
        """Carry stage ``i``'s channel representation as far as it stays per-channel.

        Returns ``(rep, next stage, dense_from)``: ``dense_from`` is the stage after the first one whose output
        has a dense element (for the chunk bound). A residual block whose branch became dense while the skip
        still carries one channel runs the branch densely and adds the skip's channel at the Merge
        (:meth:`_mixed_step`), so the skip is never densified.
        """
        j = i + 1 + (rep.consumed if isinstance(rep, Channel) else 0)
        n = len(self.stages)
        dense_from: Optional[int] = None
        while j < n and not is_dense(rep):
            step = channel_advance(self.stages, j, rep, self.acts, self._shortcut_base)
            if step is None:
                step = self._mixed_step(j, rep, k)
                if step is None:
                    break
            rep, j = step
            if dense_from is None and _has_dense(rep):
                dense_from = j
        return rep, j, j if dense_from is None else dense_from

    def _mixed_step(self, j: int, rep: Any, k: int) -> Optional[tuple[Any, int]]:
        """Stage ``j`` on a tuple whose first element is dense ``(B, K, ...)`` and whose others are Channel/Unperturbed."""
        if not (isinstance(rep, tuple) and isinstance(rep[0], torch.Tensor)):
            return None
        st = self.stages[j]
        if isinstance(st, OnFirst) and self._first_only[j]:
            return self._runners[j](rep, k), j + 1  # touches element 0 only
        if isinstance(st, Merge) and len(rep) == 2 and isinstance(rep[1], Channel) and rep[1].group is None \
                and type(st.shortcut) is nn.Identity and isinstance(st.post, ELEMENTWISE):
            h, skip = rep
            if h.shape[2:] != skip.base.shape[1:]:
                return None
            out = torch.empty_like(h)
            base = skip.base.unsqueeze(1)
            torch.sub(base, h, out=out) if st.subtract else torch.add(h, base, out=out)
            ar = torch.arange(k, device=h.device)
            d = skip.delta()
            out[:, ar, skip.ch] += d  # the skip enters with a plus sign either way
            return out.relu_() if type(st.post) is nn.ReLU else st.post(out), j + 1
        return None

    def _learn_dense_from(self, i: int, probes: Probes) -> None:
        """Find where stage ``i``'s channel path densifies (one probe, result discarded) before the first chunk,
        so the chunk sizes -- and with them the float rounding -- are the same in every call (exact resume)."""
        rep = self._channel_rep(i, probes.slice(0, 1))
        if rep is not None:
            self.adapter.record_dense_from(i, self._advance(i, rep, 1)[2])

    def _run_channel(self, i: int, rep: Any, k: int) -> Any:
        """From stage ``i``'s channel representation to the model output ``(B, K, ...)``."""
        rep, j, _ = self._advance(i, rep, k)  # where it densifies was learnt before the first chunk
        return self._run_downstream(j - 1, densify(rep, k), k)

    def _chunk_bytes(self, i: int) -> int:
        """Per-set working set of stages after ``i``: dense from where the channel path densifies (if known)."""
        j = self.adapter.dense_from.get(i) if self.adapter.channel_reuse else None
        if j is None:
            return self._downstream_bytes(i)
        dense = [tree_bytes(a) for a in self.acts[j + 1:]] or [tree_bytes(self.acts[-1])]
        sparse = [tree_bytes(a) // max(1, _channels(a)) for a in self.acts[i + 1:j + 1]] or [0]
        return max(self._dense_sets * max(dense), 8 * max(sparse))

    def chunks(self, probes: Probes) -> list[tuple[int, torch.Tensor]]:
        """The batched calls, per stage (cost class = the start stage; -1: the generic evaluator's calls).

        A stage's probes are chunked from its first one in probe order with the stage's fixed size, so a sub-batch
        made of whole chunks is chunked the same way (see :meth:`Evaluator.chunks`)."""
        if isinstance(probes, DirectionProbes) and self.adapter.stacked is not None:
            k = self._stacked_chunk(probes)
            return [(STACKED, rows) for rows in torch.arange(len(probes)).split(k)]
        groups = probes.tensor_groups() if hasattr(probes, "tensor_groups") else None
        if groups is None:  # every probe moves several stages (or the outputs): no reuse
            return [(FALLBACK, rows) for _, rows in self._fallback().chunks(probes)]
        by_stage: dict[int, list[torch.Tensor]] = {}
        outside: list[torch.Tensor] = []
        for name, rows in groups:
            owner = self.adapter.stage_of.get(name)
            (outside if owner is None else by_stage.setdefault(owner[0], [])).append(rows)
        out: list[tuple[int, torch.Tensor]] = []
        if outside:
            rows = torch.sort(torch.cat(outside)).values
            out += [(FALLBACK, rows[r]) for _, r in self._fallback().chunks(probes.select(rows))]
        for i in sorted(by_stage):
            rows = torch.sort(torch.cat(by_stage[i])).values
            if self.adapter.channel_reuse and i not in self.adapter.dense_from:
                self._learn_dense_from(i, probes.select(rows))
            k = chunk_size(self._chunk_bytes(i), self.max_chunk_bytes, self.max_chunk)
            out += [(i, part) for part in rows.split(k)]
        return out

    def _probe_losses(self, probes: Probes) -> torch.Tensor:
        losses = torch.empty(len(probes), self.batch, dtype=torch.float64)
        for i, rows in self.chunks(probes):
            chunk = probes.select(rows)
            if i == STACKED:
                losses[rows] = self._stacked_losses(chunk)
                continue
            if i < 0:
                fallback = self._fallback()
                calls = fallback.calls
                losses[rows] = fallback.probe_losses(chunk)
                self.calls += fallback.calls - calls  # this evaluator's calls include the ones it delegated
                continue
            rep = self._channel_rep(i, chunk)
            if rep is not None:
                out = self._run_channel(i, rep, len(chunk))
            else:
                out = self._run_downstream(i, self._perturbed_stage(i, chunk), len(chunk))
            out = tree_map(lambda t: t.movedim(1, 0), out)  # (K, B, ...) for the loss
            losses[rows] = self._loss(out, len(chunk))
        return losses

    # -------------------------------------------------------------- whole parameter sets (directions)
    def _stacked_chunk(self, probes: Probes) -> int:
        """Parameter sets per stacked call: :data:`STACKED_SETS` copies of the largest activation a set holds (the
        head's absorbed stages are never held) and its parameters fit the chunk bound. The same for any sub-batch."""
        if self._stacked_k is None:
            plan = self.adapter.stacked
            head = plan.prepare(self.inputs, self._stacked_cache)
            held = [tree_bytes(self.acts[i + 1]) for i in plan.materialized(head)] or [tree_bytes(self.acts[-1])]
            per_set = STACKED_SETS * max(held) + probes.touched_bytes(self.params)
            block = plan.sets_per_block() if head else 1
            most = max(block, STACKED_MAX_SETS // block * block)
            self._stacked_k = min(most, chunk_size(per_set, self.max_chunk_bytes, self.max_chunk))
        return self._stacked_k

    def _stacked_losses(self, probes: Probes) -> torch.Tensor:
        """``(K, B)`` losses of ``K`` whole perturbed parameter sets run side by side (:mod:`bbzo.adapters.stacked`)."""
        k = len(probes)
        moved = probes.stack(self.params)
        params = [{local: moved[g] if g in moved else p.detach().unsqueeze(0).expand(k, *p.shape)
                   for local, g, p in stage} for stage in self.adapter.stage_params]
        out = self.adapter.stacked.run(self.inputs, params, k, self._stacked_cache)
        return self._loss(out, k)

    def _fallback(self) -> Evaluator:
        """The generic ``torch.func`` evaluator for probes that move several stages or tensors outside every stage."""
        if self._fallback_ev is None:
            self._fallback_ev = self.adapter.fallback.bind(self.objective, self.inputs, self.targets,
                                                           ledger=self.ledger)
        return self._fallback_ev
