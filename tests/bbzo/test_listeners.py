"""The loss plot: one row of panels per training objective, never two objectives on one axis."""

from PIL import Image

from bbzo.listeners import plot_losses


def _rows(losses, objective=None, queries=0):
    extra = {"objective": objective} if objective else {}
    return [{"step": i + 1, "loss": v, "queries_used": queries * (i + 1), **extra} for i, v in enumerate(losses)]


def test_trainings_of_different_objectives_get_their_own_row(tmp_path):
    one = plot_losses(tmp_path / "one.png", {"zo": _rows([3.0, 2.0], "4-step unrolled loss", queries=10),
                                             "fo": _rows([3.0, 1.0], "4-step unrolled loss")})
    two = plot_losses(tmp_path / "two.png", {"non": _rows([1e-3, 5e-4], "one-step loss on pairs"),
                                             "zo": _rows([3.0, 2.0], "4-step unrolled loss", queries=10)})
    plain = plot_losses(tmp_path / "plain.png", {"a": _rows([1.0, 0.5]), "b": _rows([2.0, 1.0])})
    h1, h2, h0 = (Image.open(p).size[1] for p in (one, two, plain))
    assert h2 == 2 * h1 and h0 == h1  # 3.8 in per row at 120 dpi: 456 px, 912 px
    assert h1 == 456
    assert plot_losses(tmp_path / "none.png", {"a": [{"step": 1, "loss": None}]}) is None
