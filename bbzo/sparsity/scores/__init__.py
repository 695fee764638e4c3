"""Pruning-at-initialization scores for layer-wise ratios (DeepZero §4, Eq. (3)), one file per family.

``compute_score("zo_grasp", model, objective, inputs, targets)`` returns a :class:`ScoreResult` with one
score tensor per scored parameter (by default the weights of every Conv/Linear layer, as DeepZero),
the queries it made (counted by the ledger) and how the score is meant to be ranked
(:data:`~bbzo.sparsity.lpr.KEEP_RULES`). Scores never change the model and never touch BN statistics.

* :mod:`.baseline` -- ``magnitude``, ``random``, ``layer_noise`` (data-free controls);
* :mod:`.white_box` -- ``fo_grasp``, ``snip`` (autograd references, labelled as such);
* :mod:`.zo_grasp` -- ``zo_grasp``, DeepZero's reference, on the registered RGE;
* :mod:`.oracle_hybrid` -- ``zo_grasp_oracle``: white-box model, queried oracle;
* :mod:`.sketch` -- ``zo_grasp_sketch``: query-only ``Hv`` read by mixed differences.
"""

from . import baseline, oracle_hybrid, sketch, white_box, zo_grasp  # noqa: F401  (registration)
from .registry import (ScoreContext, ScoreInfo, ScoreResult, compute_score, list_scores, prunable_params,
                       register_score, score_accepts, score_options)

__all__ = ["ScoreResult", "ScoreInfo", "ScoreContext", "compute_score", "list_scores", "prunable_params",
           "register_score", "score_accepts", "score_options"]
