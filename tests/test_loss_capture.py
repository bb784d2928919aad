"""LossCapture: per-sample losses recovered from the user's reduced loss calls.

Every reference below is written by hand: the ``reduction="none"`` output (computed outside the
mode) summed per sample with explicit loops and rescaled by a hand-coded denominator; each
reference is also checked to reproduce the user's reduced value, which pins down torch's
reduction semantics independently of the code under test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from genbounds.estimators.loss_capture import (
    SUPPORTED_LOSSES,
    CapturedLoss,
    LossCapture,
    combined_per_sample,
    loss_coefficients,
)

B = 4
C = 5
T = 3
DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return (scale * torch.randn(*shape, generator=_gen(seed), dtype=DT)).requires_grad_()


def _sums(none: Tensor, b: int, layout: str = "sample") -> Tensor:
    """Σ of each sample's elements, by an explicit loop over the rows of ``none``."""
    out = torch.zeros(b, dtype=none.dtype)
    if none.dim() == 0:
        out[0] = none
        return out
    n = none.shape[0]
    for r in range(n):
        i = r // (n // b) if layout == "sample" else r % b
        out[i] += none[r].sum()
    return out


@dataclass
class Case:
    name: str  # the torch.nn.functional function expected in the record
    call: Callable[[], Tensor]  # the user's call
    none: Callable[[], Tensor]  # the same call with reduction="none"
    den: Callable[[], float | Tensor] | None = None  # hand-coded 'mean' denominator
    combine: str = "mean"
    layout: str = "sample"
    leaves: list[Tensor] = field(default_factory=list)
    b: int = B

    def reference(self) -> Tensor:
        with torch.no_grad():
            s = _sums(self.none(), self.b, self.layout)
            if self.combine in ("sum", "none"):
                return s
            return self.b * s / self.den()


def _cases() -> list[tuple[str, Case]]:
    cases: list[tuple[str, Case]] = []

    def add(id_: str, case: Case) -> None:
        cases.append((id_, case))

    # -- cross_entropy with class-index targets ----------------------------------------------
    x = _leaf(B, C)
    y = torch.tensor([0, 3, 1, 4])
    w = torch.rand(C, generator=_gen(1), dtype=DT) + 0.1
    y_ign = torch.tensor([0, -100, 1, 4])
    y_ign2 = torch.tensor([2, 3, 2, 4])  # ignore_index=2
    add("ce", Case("cross_entropy", lambda: F.cross_entropy(x, y),
                   lambda: F.cross_entropy(x, y, reduction="none"), lambda: float(B), leaves=[x]))
    add("ce_weight", Case("cross_entropy", lambda: F.cross_entropy(x, y, weight=w),
                          lambda: F.cross_entropy(x, y, weight=w, reduction="none"),
                          lambda: sum(w[int(t)] for t in y), leaves=[x]))
    add("ce_ignore", Case("cross_entropy", lambda: F.cross_entropy(x, y_ign),
                          lambda: F.cross_entropy(x, y_ign, reduction="none"), lambda: 3.0, leaves=[x]))
    add("ce_ignore_custom", Case("cross_entropy", lambda: F.cross_entropy(x, y_ign2, ignore_index=2),
                                 lambda: F.cross_entropy(x, y_ign2, ignore_index=2, reduction="none"),
                                 lambda: 2.0, leaves=[x]))
    add("ce_weight_ignore", Case("cross_entropy", lambda: F.cross_entropy(x, y_ign, weight=w),
                                 lambda: F.cross_entropy(x, y_ign, weight=w, reduction="none"),
                                 lambda: w[0] + w[1] + w[4], leaves=[x]))
    add("ce_smoothing", Case("cross_entropy", lambda: F.cross_entropy(x, y_ign, label_smoothing=0.2),
                             lambda: F.cross_entropy(x, y_ign, label_smoothing=0.2, reduction="none"),
                             lambda: 3.0, leaves=[x]))
    add("ce_smoothing_weight", Case(
        "cross_entropy", lambda: F.cross_entropy(x, y_ign, weight=w, label_smoothing=0.3),
        lambda: F.cross_entropy(x, y_ign, weight=w, label_smoothing=0.3, reduction="none"),
        lambda: w[0] + w[1] + w[4], leaves=[x]))
    add("ce_smoothing_weight_noignore", Case(
        "cross_entropy", lambda: F.cross_entropy(x, y, weight=w, label_smoothing=0.3),
        lambda: F.cross_entropy(x, y, weight=w, label_smoothing=0.3, reduction="none"),
        lambda: sum(w[int(t)] for t in y), leaves=[x]))
    # probability ("soft") targets: the denominator is the number of positions, whatever weight
    p = torch.softmax(torch.randn(B, C, generator=_gen(2), dtype=DT), dim=1)
    add("ce_soft", Case("cross_entropy", lambda: F.cross_entropy(x, p),
                        lambda: F.cross_entropy(x, p, reduction="none"), lambda: float(B), leaves=[x]))
    add("ce_soft_weight_smoothing", Case(
        "cross_entropy", lambda: F.cross_entropy(x, p, weight=w, label_smoothing=0.1),
        lambda: F.cross_entropy(x, p, weight=w, label_smoothing=0.1, reduction="none"),
        lambda: float(B), leaves=[x]))
    # [b, C, T] inputs with [b, T] targets
    x3 = _leaf(B, C, T, seed=3)
    y3 = torch.randint(0, C, (B, T), generator=_gen(3))
    y3[0, 1] = -100
    y3[2, 0] = -100
    y3[2, 2] = -100
    add("ce_bCT", Case("cross_entropy", lambda: F.cross_entropy(x3, y3),
                       lambda: F.cross_entropy(x3, y3, reduction="none"),
                       lambda: float((y3 != -100).sum()), leaves=[x3]))
    add("ce_bCT_weight_smoothing", Case(
        "cross_entropy", lambda: F.cross_entropy(x3, y3, weight=w, label_smoothing=0.1),
        lambda: F.cross_entropy(x3, y3, weight=w, label_smoothing=0.1, reduction="none"),
        lambda: sum(w[int(t)] for t in y3.flatten() if t != -100), leaves=[x3]))
    p3 = torch.softmax(torch.randn(B, C, T, generator=_gen(4), dtype=DT), dim=1)
    add("ce_bCT_soft", Case("cross_entropy", lambda: F.cross_entropy(x3, p3),
                            lambda: F.cross_entropy(x3, p3, reduction="none"),
                            lambda: float(B * T), leaves=[x3]))
    # token-level CE flattened with .view(-1, V): batch-first and time-major activations
    h = _leaf(B, T, 6, seed=5)
    proj = _leaf(6, C, seed=6)
    yt = torch.randint(0, C, (B, T), generator=_gen(7))
    yt[1, :] = -100
    yt[3, 2] = -100
    n_valid = float((yt != -100).sum())

    def logits_bf() -> Tensor:
        return (h @ proj).view(-1, C)  # [b, T, V] → rows (i, t), sample-major

    add("ce_tokens_batch_first", Case(
        "cross_entropy", lambda: F.cross_entropy(logits_bf(), yt.view(-1)),
        lambda: F.cross_entropy(logits_bf(), yt.view(-1), reduction="none"), lambda: n_valid,
        leaves=[h, proj]))
    ht = _leaf(T, B, 6, seed=8)
    ytt = yt.t().contiguous()  # [T, b]

    def logits_tm() -> Tensor:
        return (ht @ proj).view(-1, C)  # [T, b, V] → rows (t, i), time-major

    add("ce_tokens_time_major", Case(
        "cross_entropy", lambda: F.cross_entropy(logits_tm(), ytt.view(-1)),
        lambda: F.cross_entropy(logits_tm(), ytt.view(-1), reduction="none"), lambda: n_valid,
        layout="time", leaves=[ht, proj]))
    # -- nll_loss ------------------------------------------------------------------------------
    add("nll", Case("nll_loss", lambda: F.nll_loss(F.log_softmax(x, 1), y),
                    lambda: F.nll_loss(F.log_softmax(x, 1), y, reduction="none"), lambda: float(B),
                    leaves=[x]))
    add("nll_weight_ignore", Case(
        "nll_loss", lambda: F.nll_loss(F.log_softmax(x, 1), y_ign, weight=w),
        lambda: F.nll_loss(F.log_softmax(x, 1), y_ign, weight=w, reduction="none"),
        lambda: w[0] + w[1] + w[4], leaves=[x]))
    add("nll_bCT", Case("nll_loss", lambda: F.nll_loss(F.log_softmax(x3, 1), y3, weight=w),
                        lambda: F.nll_loss(F.log_softmax(x3, 1), y3, weight=w, reduction="none"),
                        lambda: sum(w[int(t)] for t in y3.flatten() if t != -100), leaves=[x3]))
    # -- regression losses ---------------------------------------------------------------------
    pr = _leaf(B, 3, seed=9)
    tg = torch.randn(B, 3, generator=_gen(10), dtype=DT)
    ew = torch.rand(B, 3, generator=_gen(11), dtype=DT) + 0.1
    numel = float(B * 3)
    add("mse", Case("mse_loss", lambda: F.mse_loss(pr, tg), lambda: F.mse_loss(pr, tg, reduction="none"),
                    lambda: numel, leaves=[pr]))
    add("mse_weight", Case("mse_loss", lambda: F.mse_loss(pr, tg, weight=ew),
                           lambda: F.mse_loss(pr, tg, weight=ew, reduction="none"), lambda: ew.sum(),
                           leaves=[pr]))
    add("l1", Case("l1_loss", lambda: F.l1_loss(pr, tg), lambda: F.l1_loss(pr, tg, reduction="none"),
                   lambda: numel, leaves=[pr]))
    add("l1_weight", Case("l1_loss", lambda: F.l1_loss(pr, tg, weight=ew),
                          lambda: F.l1_loss(pr, tg, weight=ew, reduction="none"), lambda: ew.sum(),
                          leaves=[pr]))
    add("smooth_l1", Case("smooth_l1_loss", lambda: F.smooth_l1_loss(pr, tg, beta=0.5),
                          lambda: F.smooth_l1_loss(pr, tg, beta=0.5, reduction="none"), lambda: numel,
                          leaves=[pr]))
    add("huber", Case("huber_loss", lambda: F.huber_loss(pr, tg, delta=0.7),
                      lambda: F.huber_loss(pr, tg, delta=0.7, reduction="none"), lambda: numel,
                      leaves=[pr]))
    add("huber_weight", Case("huber_loss", lambda: F.huber_loss(pr, tg, delta=0.7, weight=ew),
                             lambda: F.huber_loss(pr, tg, delta=0.7, weight=ew, reduction="none"),
                             lambda: numel, leaves=[pr]))  # huber divides by numel, not Σw
    # -- binary losses -------------------------------------------------------------------------
    z = _leaf(B, 3, seed=12)
    yb = (torch.rand(B, 3, generator=_gen(13), dtype=DT) > 0.5).to(DT)
    wb = torch.rand(3, generator=_gen(14), dtype=DT) + 0.2
    pw = torch.rand(3, generator=_gen(15), dtype=DT) * 3
    add("bce", Case("binary_cross_entropy", lambda: F.binary_cross_entropy(torch.sigmoid(z), yb, weight=wb),
                    lambda: F.binary_cross_entropy(torch.sigmoid(z), yb, weight=wb, reduction="none"),
                    lambda: numel, leaves=[z]))
    add("bce_logits_pos_weight", Case(
        "binary_cross_entropy_with_logits",
        lambda: F.binary_cross_entropy_with_logits(z, yb, weight=wb, pos_weight=pw),
        lambda: F.binary_cross_entropy_with_logits(z, yb, weight=wb, pos_weight=pw, reduction="none"),
        lambda: numel, leaves=[z]))
    add("soft_margin", Case("soft_margin_loss", lambda: F.soft_margin_loss(z, 2 * yb - 1),
                            lambda: F.soft_margin_loss(z, 2 * yb - 1, reduction="none"), lambda: numel,
                            leaves=[z]))
    add("multilabel_soft_margin", Case(
        "multilabel_soft_margin_loss", lambda: F.multilabel_soft_margin_loss(z, yb, weight=wb),
        lambda: F.multilabel_soft_margin_loss(z, yb, weight=wb, reduction="none"), lambda: float(B),
        leaves=[z]))
    add("hinge_embedding", Case(
        "hinge_embedding_loss", lambda: F.hinge_embedding_loss(z, 2 * yb - 1, margin=0.5),
        lambda: F.hinge_embedding_loss(z, 2 * yb - 1, margin=0.5, reduction="none"), lambda: numel,
        leaves=[z]))
    # -- divergences / likelihoods -------------------------------------------------------------
    lq = F.log_softmax(x.detach().clone(), 1).requires_grad_()
    tp = torch.softmax(torch.randn(B, C, generator=_gen(16), dtype=DT), 1)
    add("kl_batchmean", Case("kl_div", lambda: F.kl_div(lq, tp, reduction="batchmean"),
                             lambda: F.kl_div(lq, tp, reduction="none"), lambda: float(B),
                             combine="batchmean", leaves=[lq]))
    add("kl_batchmean_log_target", Case(
        "kl_div", lambda: F.kl_div(lq, tp.log(), reduction="batchmean", log_target=True),
        lambda: F.kl_div(lq, tp.log(), reduction="none", log_target=True), lambda: float(B),
        combine="batchmean", leaves=[lq]))
    add("kl_mean", Case("kl_div", lambda: F.kl_div(lq, tp, reduction="mean"),
                        lambda: F.kl_div(lq, tp, reduction="none"), lambda: float(B * C), leaves=[lq]))
    rate = _leaf(B, 3, seed=17)
    counts = torch.poisson(torch.full((B, 3), 3.0, dtype=DT), generator=_gen(18))
    add("poisson_nll", Case("poisson_nll_loss", lambda: F.poisson_nll_loss(rate, counts),
                            lambda: F.poisson_nll_loss(rate, counts, reduction="none"), lambda: numel,
                            leaves=[rate]))
    add("poisson_nll_full", Case(
        "poisson_nll_loss", lambda: F.poisson_nll_loss(rate.exp(), counts, log_input=False, full=True),
        lambda: F.poisson_nll_loss(rate.exp(), counts, log_input=False, full=True, reduction="none"),
        lambda: numel, leaves=[rate]))
    mu = _leaf(B, 2, seed=19)
    tgt2 = torch.randn(B, 2, generator=_gen(20), dtype=DT)
    var_param = _leaf(B, seed=21, scale=0.3)
    add("gaussian_nll_homoscedastic", Case(
        "gaussian_nll_loss", lambda: F.gaussian_nll_loss(mu, tgt2, var_param.exp(), full=True),
        lambda: F.gaussian_nll_loss(mu, tgt2, var_param.exp(), full=True, reduction="none"),
        lambda: float(B * 2), leaves=[mu, var_param]))
    var_full = torch.rand(B, 2, generator=_gen(22), dtype=DT) + 0.5
    add("gaussian_nll", Case("gaussian_nll_loss", lambda: F.gaussian_nll_loss(mu, tgt2, var_full),
                             lambda: F.gaussian_nll_loss(mu, tgt2, var_full, reduction="none"),
                             lambda: float(B * 2), leaves=[mu]))
    # -- margin / embedding losses -------------------------------------------------------------
    ym = torch.tensor([1, 0, 4, 2])
    add("multi_margin", Case(
        "multi_margin_loss", lambda: F.multi_margin_loss(x, ym, p=2, margin=0.5, weight=w),
        lambda: F.multi_margin_loss(x, ym, p=2, margin=0.5, weight=w, reduction="none"),
        lambda: float(B), leaves=[x]))
    yml = torch.tensor([[0, 3, -1, 0, 0], [1, -1, 0, 0, 0], [4, 2, 0, -1, 0], [2, -1, 0, 0, 0]])
    add("multilabel_margin", Case(
        "multilabel_margin_loss", lambda: F.multilabel_margin_loss(x, yml),
        lambda: F.multilabel_margin_loss(x, yml, reduction="none"), lambda: float(B), leaves=[x]))
    s1, s2 = _leaf(B, seed=23), _leaf(B, seed=24)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DT)
    add("margin_ranking", Case(
        "margin_ranking_loss", lambda: F.margin_ranking_loss(s1, s2, sign, margin=0.3),
        lambda: F.margin_ranking_loss(s1, s2, sign, margin=0.3, reduction="none"), lambda: float(B),
        leaves=[s1, s2]))
    e1, e2, e3 = _leaf(B, 6, seed=25), _leaf(B, 6, seed=26), _leaf(B, 6, seed=27)
    add("cosine_embedding", Case(
        "cosine_embedding_loss", lambda: F.cosine_embedding_loss(e1, e2, sign, margin=0.2),
        lambda: F.cosine_embedding_loss(e1, e2, sign, margin=0.2, reduction="none"), lambda: float(B),
        leaves=[e1, e2]))
    add("triplet_margin", Case(
        "triplet_margin_loss", lambda: F.triplet_margin_loss(e1, e2, e3, margin=2.0, p=1.5, swap=True),
        lambda: F.triplet_margin_loss(e1, e2, e3, margin=2.0, p=1.5, swap=True, reduction="none"),
        lambda: float(B), leaves=[e1, e2, e3]))

    def cos_dist(a: Tensor, b: Tensor) -> Tensor:
        return 1 - F.cosine_similarity(a, b)

    add("triplet_margin_with_distance", Case(
        "triplet_margin_with_distance_loss",
        lambda: F.triplet_margin_with_distance_loss(e1, e2, e3, distance_function=cos_dist, margin=0.9),
        lambda: F.triplet_margin_with_distance_loss(e1, e2, e3, distance_function=cos_dist, margin=0.9,
                                                    reduction="none"),
        lambda: float(B), leaves=[e1, e2, e3]))
    # ctc: 'mean' divides each sample's loss by its target length (≥ 1), then averages
    lp_raw = _leaf(8, B, C, seed=28)
    ctc_targets = torch.randint(1, C, (B, 3), generator=_gen(29))
    in_len = torch.full((B,), 8)
    tgt_len = torch.tensor([3, 2, 0, 1])

    class _CtcRef(Case):
        def reference(self) -> Tensor:
            with torch.no_grad():
                none = self.none()
                return torch.stack([none[i] / max(int(tgt_len[i]), 1) for i in range(B)])

    add("ctc", _CtcRef("ctc_loss", lambda: F.ctc_loss(F.log_softmax(lp_raw, 2), ctc_targets, in_len, tgt_len),
                       lambda: F.ctc_loss(F.log_softmax(lp_raw, 2), ctc_targets, in_len, tgt_len,
                                          reduction="none"), leaves=[lp_raw]))
    # -- 'sum' reductions, legacy arguments, positional reduction, 'none' ----------------------
    add("ce_sum_ignore", Case("cross_entropy", lambda: F.cross_entropy(x, y_ign, weight=w, reduction="sum"),
                              lambda: F.cross_entropy(x, y_ign, weight=w, reduction="none"),
                              combine="sum", leaves=[x]))
    add("ce_tokens_sum", Case("cross_entropy", lambda: F.cross_entropy(logits_bf(), yt.view(-1), reduction="sum"),
                              lambda: F.cross_entropy(logits_bf(), yt.view(-1), reduction="none"),
                              combine="sum", leaves=[h, proj]))
    add("mse_sum", Case("mse_loss", lambda: F.mse_loss(pr, tg, reduction="sum"),
                        lambda: F.mse_loss(pr, tg, reduction="none"), combine="sum", leaves=[pr]))
    add("kl_sum", Case("kl_div", lambda: F.kl_div(lq, tp, reduction="sum"),
                       lambda: F.kl_div(lq, tp, reduction="none"), combine="sum", leaves=[lq]))
    add("bce_logits_sum", Case(
        "binary_cross_entropy_with_logits",
        lambda: F.binary_cross_entropy_with_logits(z, yb, pos_weight=pw, reduction="sum"),
        lambda: F.binary_cross_entropy_with_logits(z, yb, pos_weight=pw, reduction="none"),
        combine="sum", leaves=[z]))
    add("legacy_size_average_false", Case(
        "mse_loss", lambda: F.mse_loss(pr, tg, size_average=False),
        lambda: F.mse_loss(pr, tg, reduction="none"), combine="sum", leaves=[pr]))
    add("legacy_ce_size_average_false", Case(
        "cross_entropy", lambda: F.cross_entropy(x, y_ign, size_average=False),
        lambda: F.cross_entropy(x, y_ign, reduction="none"), combine="sum", leaves=[x]))
    add("legacy_reduce_false", Case(
        "nll_loss", lambda: F.nll_loss(F.log_softmax(x, 1), y, reduce=False),
        lambda: F.nll_loss(F.log_softmax(x, 1), y, reduction="none"), combine="none", leaves=[x]))
    add("legacy_kl_size_average_true", Case(
        "kl_div", lambda: F.kl_div(lq, tp, size_average=True),
        lambda: F.kl_div(lq, tp, reduction="none"), lambda: float(B * C), leaves=[lq]))
    add("positional_reduction_sum", Case(
        "mse_loss", lambda: F.mse_loss(pr, tg, None, None, "sum"),
        lambda: F.mse_loss(pr, tg, reduction="none"), combine="sum", leaves=[pr]))
    add("positional_reduction_ce", Case(
        "cross_entropy", lambda: F.cross_entropy(x, y_ign, w, None, -100, None, "mean", 0.1),
        lambda: F.cross_entropy(x, y_ign, w, reduction="none", label_smoothing=0.1),
        lambda: w[0] + w[1] + w[4], leaves=[x]))
    add("user_reduction_none", Case(
        "cross_entropy", lambda: F.cross_entropy(x3, y3, reduction="none"),
        lambda: F.cross_entropy(x3, y3, reduction="none"), combine="none", leaves=[x3]))
    # -- the nn.*Loss modules route to the functional losses ------------------------------------
    add("nn.CrossEntropyLoss", Case(
        "cross_entropy", lambda: nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)(x, y),
        lambda: F.cross_entropy(x, y, weight=w, ignore_index=1, label_smoothing=0.1, reduction="none"),
        lambda: w[0] + w[3] + w[4], leaves=[x]))
    add("nn.NLLLoss", Case("nll_loss", lambda: nn.NLLLoss()(F.log_softmax(x, 1), y),
                           lambda: F.nll_loss(F.log_softmax(x, 1), y, reduction="none"), lambda: float(B),
                           leaves=[x]))
    add("nn.MSELoss", Case("mse_loss", lambda: nn.MSELoss()(pr, tg),
                           lambda: F.mse_loss(pr, tg, reduction="none"), lambda: numel, leaves=[pr]))
    add("nn.MSELoss_sum", Case("mse_loss", lambda: nn.MSELoss(reduction="sum")(pr, tg),
                               lambda: F.mse_loss(pr, tg, reduction="none"), combine="sum", leaves=[pr]))
    add("nn.L1Loss", Case("l1_loss", lambda: nn.L1Loss()(pr, tg),
                          lambda: F.l1_loss(pr, tg, reduction="none"), lambda: numel, leaves=[pr]))
    add("nn.SmoothL1Loss", Case("smooth_l1_loss", lambda: nn.SmoothL1Loss(beta=0.3)(pr, tg),
                                lambda: F.smooth_l1_loss(pr, tg, beta=0.3, reduction="none"),
                                lambda: numel, leaves=[pr]))
    add("nn.HuberLoss", Case("huber_loss", lambda: nn.HuberLoss(delta=0.4)(pr, tg),
                             lambda: F.huber_loss(pr, tg, delta=0.4, reduction="none"), lambda: numel,
                             leaves=[pr]))
    add("nn.BCELoss", Case("binary_cross_entropy", lambda: nn.BCELoss()(torch.sigmoid(z), yb),
                           lambda: F.binary_cross_entropy(torch.sigmoid(z), yb, reduction="none"),
                           lambda: numel, leaves=[z]))
    add("nn.BCEWithLogitsLoss", Case(
        "binary_cross_entropy_with_logits", lambda: nn.BCEWithLogitsLoss(pos_weight=pw)(z, yb),
        lambda: F.binary_cross_entropy_with_logits(z, yb, pos_weight=pw, reduction="none"),
        lambda: numel, leaves=[z]))
    add("nn.KLDivLoss", Case("kl_div", lambda: nn.KLDivLoss(reduction="batchmean")(lq, tp),
                             lambda: F.kl_div(lq, tp, reduction="none"), lambda: float(B),
                             combine="batchmean", leaves=[lq]))
    add("nn.PoissonNLLLoss", Case("poisson_nll_loss", lambda: nn.PoissonNLLLoss()(rate, counts),
                                  lambda: F.poisson_nll_loss(rate, counts, reduction="none"),
                                  lambda: numel, leaves=[rate]))
    add("nn.GaussianNLLLoss", Case("gaussian_nll_loss", lambda: nn.GaussianNLLLoss()(mu, tgt2, var_full),
                                   lambda: F.gaussian_nll_loss(mu, tgt2, var_full, reduction="none"),
                                   lambda: float(B * 2), leaves=[mu]))
    add("nn.SoftMarginLoss", Case("soft_margin_loss", lambda: nn.SoftMarginLoss()(z, 2 * yb - 1),
                                  lambda: F.soft_margin_loss(z, 2 * yb - 1, reduction="none"),
                                  lambda: numel, leaves=[z]))
    add("nn.MultiLabelSoftMarginLoss", Case(
        "multilabel_soft_margin_loss", lambda: nn.MultiLabelSoftMarginLoss()(z, yb),
        lambda: F.multilabel_soft_margin_loss(z, yb, reduction="none"), lambda: float(B), leaves=[z]))
    add("nn.MultiMarginLoss", Case("multi_margin_loss", lambda: nn.MultiMarginLoss()(x, ym),
                                   lambda: F.multi_margin_loss(x, ym, reduction="none"), lambda: float(B),
                                   leaves=[x]))
    add("nn.MultiLabelMarginLoss", Case(
        "multilabel_margin_loss", lambda: nn.MultiLabelMarginLoss()(x, yml),
        lambda: F.multilabel_margin_loss(x, yml, reduction="none"), lambda: float(B), leaves=[x]))
    add("nn.HingeEmbeddingLoss", Case(
        "hinge_embedding_loss", lambda: nn.HingeEmbeddingLoss()(z, 2 * yb - 1),
        lambda: F.hinge_embedding_loss(z, 2 * yb - 1, reduction="none"), lambda: numel, leaves=[z]))
    add("nn.MarginRankingLoss", Case(
        "margin_ranking_loss", lambda: nn.MarginRankingLoss(margin=0.1)(s1, s2, sign),
        lambda: F.margin_ranking_loss(s1, s2, sign, margin=0.1, reduction="none"), lambda: float(B),
        leaves=[s1, s2]))
    add("nn.CosineEmbeddingLoss", Case(
        "cosine_embedding_loss", lambda: nn.CosineEmbeddingLoss()(e1, e2, sign),
        lambda: F.cosine_embedding_loss(e1, e2, sign, reduction="none"), lambda: float(B),
        leaves=[e1, e2]))
    add("nn.TripletMarginLoss", Case(
        "triplet_margin_loss", lambda: nn.TripletMarginLoss()(e1, e2, e3),
        lambda: F.triplet_margin_loss(e1, e2, e3, reduction="none"), lambda: float(B),
        leaves=[e1, e2, e3]))
    add("nn.TripletMarginWithDistanceLoss", Case(
        "triplet_margin_with_distance_loss", lambda: nn.TripletMarginWithDistanceLoss()(e1, e2, e3),
        lambda: F.triplet_margin_with_distance_loss(e1, e2, e3, reduction="none"), lambda: float(B),
        leaves=[e1, e2, e3]))
    add("nn.CTCLoss", _CtcRef(
        "ctc_loss", lambda: nn.CTCLoss()(F.log_softmax(lp_raw, 2), ctc_targets, in_len, tgt_len),
        lambda: F.ctc_loss(F.log_softmax(lp_raw, 2), ctc_targets, in_len, tgt_len, reduction="none"),
        leaves=[lp_raw]))
    return cases


CASES = _cases()


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[i for i, _ in CASES])
def test_per_sample_matches_hand_reference(case: Case) -> None:
    expected = case.call()
    with LossCapture(batch_size=case.b, strict=True) as cap:
        value = case.call()
    # the user's value is bit-identical, and so are its gradients
    assert torch.equal(value, expected)
    if value.dim() == 0:
        g_expected = torch.autograd.grad(expected, case.leaves, allow_unused=True)
        g_value = torch.autograd.grad(value, case.leaves, retain_graph=True, allow_unused=True)
        for a, b in zip(g_expected, g_value):
            assert (a is None and b is None) or torch.equal(a, b)

    assert len(cap.records) == 1, cap.records
    assert not cap.errors
    rec = cap.records[0]
    assert rec.name == case.name
    assert rec.value is value
    assert rec.combine == case.combine
    assert rec.reduction == case.combine
    assert rec.mappable and not rec.detached
    assert rec.layout == case.layout and not rec.layout_assumed
    assert isinstance(rec.consistent, Tensor) and rec.consistent.dtype == torch.bool
    assert rec.verified

    ref = case.reference()
    ps = rec.per_sample(case.b)
    assert ps.shape == (case.b,)
    torch.testing.assert_close(ps.detach(), ref, atol=1e-6, rtol=1e-6)
    # the hand reference reproduces the user's reduction: this pins torch's semantics
    if case.combine in ("mean", "batchmean"):
        torch.testing.assert_close(ref.mean(), value.detach(), atol=1e-10, rtol=1e-10)
    elif case.combine == "sum":
        torch.testing.assert_close(ref.sum(), value.detach(), atol=1e-10, rtol=1e-10)
    else:
        assert rec.elements is value  # no recomputation for a user 'none'


def test_every_supported_function_is_covered() -> None:
    required = {
        "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
        "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss",
        "gaussian_nll_loss", "soft_margin_loss", "multilabel_soft_margin_loss", "multi_margin_loss",
        "multilabel_margin_loss", "hinge_embedding_loss", "margin_ranking_loss",
        "cosine_embedding_loss", "triplet_margin_loss",
    }
    assert required <= SUPPORTED_LOSSES
    assert {c.name for _, c in CASES} == set(SUPPORTED_LOSSES)
    modules = {i.removeprefix("nn.").removesuffix("_sum") for i, _ in CASES if i.startswith("nn.")}
    assert len(modules) == 21


def test_l1_weight_survives_the_mode() -> None:
    """``F.l1_loss`` forgets ``weight`` when dispatching to a torch-function mode; we restore it."""
    a, t = _leaf(3, 4), torch.randn(3, 4, dtype=DT)
    w = torch.rand(3, 4, dtype=DT)
    expected = F.l1_loss(a, t, weight=w)
    with LossCapture(3, strict=True):
        got = F.l1_loss(a, t, weight=w)
    assert torch.equal(got, expected)
    assert not torch.equal(got, F.l1_loss(a, t))


# ---------------------------------------------------------------------------------------------
# Layout of flattened sequence losses, mapping failures
# ---------------------------------------------------------------------------------------------


def test_flattened_without_view_base_assumes_sample_major() -> None:
    logits = _leaf(B, T, C)
    y = torch.randint(0, C, (B, T), generator=_gen(1))
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(logits.reshape(-1, C).clone(), y.reshape(-1).clone())
    rec = cap.records[0]
    assert rec.mappable and rec.layout == "sample" and rec.layout_assumed
    none = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").detach()
    torch.testing.assert_close(rec.per_sample().detach(), B * _sums(none, B) / (B * T))


def test_time_major_read_from_target_base_when_input_has_none() -> None:
    logits = _leaf(T, B, C)
    y = torch.randint(0, C, (T, B), generator=_gen(1))
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(logits.reshape(-1, C).clone(), y.view(-1))
    rec = cap.records[0]
    assert rec.layout == "time" and not rec.layout_assumed
    none = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").detach()
    torch.testing.assert_close(rec.per_sample().detach(), B * _sums(none, B, "time") / (B * T))


def test_time_major_slice_and_inner_axes() -> None:
    """``out[1:-1].view(-1, V)`` of a ``[T+2, b, V]`` tensor (view base: the whole tensor) and a
    ``[T, b, 2, V]`` tensor flattened to rows ``(t, i, j)``."""
    out = _leaf(T + 2, B, C)
    y = torch.randint(0, C, (T, B), generator=_gen(1))
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(out[1:-1].view(-1, C), y.view(-1))
    rec = cap.records[0]
    assert rec.layout == "time" and not rec.layout_assumed
    none = F.cross_entropy(out[1:-1].reshape(-1, C), y.reshape(-1), reduction="none").detach()
    torch.testing.assert_close(rec.per_sample().detach(), B * _sums(none, B, "time") / (T * B))

    out4 = _leaf(T, B, 2, C)
    y4 = torch.randint(0, C, (T, B, 2), generator=_gen(2))
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(out4.view(-1, C), y4.view(-1), reduction="sum")
    rec = cap.records[0]
    assert rec.layout == "time"
    none = F.cross_entropy(out4.reshape(-1, C), y4.reshape(-1), reduction="none").detach()
    ref = torch.zeros(B, dtype=DT)
    for r in range(none.shape[0]):
        ref[(r // 2) % B] += none[r]
    torch.testing.assert_close(rec.per_sample().detach(), ref)


def test_square_base_is_flagged_ambiguous() -> None:
    logits = _leaf(B, B, C)  # T == b: sample- and time-major look alike
    y = torch.randint(0, C, (B, B), generator=_gen(1))
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(logits.view(-1, C), y.view(-1))
    assert cap.records[0].layout == "sample" and cap.records[0].layout_assumed


def test_unmappable_leading_axis() -> None:
    a = _leaf(6, 2)
    with LossCapture(B, strict=True) as cap:
        F.mse_loss(a, torch.zeros(6, 2, dtype=DT))
    rec = cap.records[0]
    assert not rec.mappable and rec.layout is None
    with pytest.raises(ValueError, match="cannot map"):
        rec.per_sample()
    # the same record maps to a batch of 3 or 6 samples
    assert rec.per_sample(3).shape == (3,)
    torch.testing.assert_close(rec.per_sample(6).mean(), rec.value)
    # combined_per_sample refuses it only when the training loss depends on it
    coeffs, _ = loss_coefficients(rec.value, cap.records)
    with pytest.raises(ValueError, match="cannot map"):
        combined_per_sample(cap.records, coeffs, B)
    assert torch.equal(combined_per_sample(cap.records, torch.zeros(1, dtype=DT), B), torch.zeros(B, dtype=DT))


def test_unbatched_scalar_elements_map_to_a_batch_of_one() -> None:
    a = _leaf(C)
    with LossCapture(1, strict=True) as cap:
        value = F.cross_entropy(a, torch.tensor(2))
    rec = cap.records[0]
    assert rec.elements.dim() == 0 and rec.mappable
    torch.testing.assert_close(rec.per_sample(), value.reshape(1))
    assert rec._layout_for(2) is None


def test_in_place_modified_none_output_is_refused() -> None:
    a = _leaf(B, 2)
    with LossCapture(B, strict=True) as cap:
        out = F.mse_loss(a, torch.zeros(B, 2, dtype=DT), reduction="none")
        out.mul_(2)
    with pytest.raises(ValueError, match="modified in place"):
        cap.records[0].per_sample()


# ---------------------------------------------------------------------------------------------
# What is (not) recorded
# ---------------------------------------------------------------------------------------------


def test_detached_losses_are_recorded_and_flagged() -> None:
    a = _leaf(B, 3)
    t = torch.zeros(B, 3, dtype=DT)
    with LossCapture(B, strict=True) as cap:
        train = F.mse_loss(a, t)
        with torch.no_grad():
            F.l1_loss(a, t)
        F.smooth_l1_loss(a.detach(), t)
    assert [r.name for r in cap.records] == ["mse_loss", "l1_loss", "smooth_l1_loss"]
    assert [r.detached for r in cap.records] == [False, True, True]
    assert all(r.verified for r in cap.records)
    coeffs, rem = loss_coefficients(train, cap.records)
    assert coeffs.tolist() == [1.0, 0.0, 0.0]
    assert float(rem.detach()) == 0.0
    torch.testing.assert_close(combined_per_sample(cap.records, coeffs, B), cap.records[0].per_sample())


def test_nn_module_and_nested_captures_record_once_each() -> None:
    a = _leaf(B, C)
    y = torch.tensor([0, 1, 2, 3])
    with LossCapture(B, strict=True) as outer:
        with LossCapture(B, strict=True) as inner:
            nn.CrossEntropyLoss(label_smoothing=0.1)(a, y)
            F.multilabel_soft_margin_loss(a, F.one_hot(y, C).to(DT))
        nn.MSELoss()(a, torch.zeros(B, C, dtype=DT))
    assert [r.name for r in inner.records] == ["cross_entropy", "multilabel_soft_margin_loss"]
    assert [r.name for r in outer.records] == ["cross_entropy", "multilabel_soft_margin_loss", "mse_loss"]
    for r_in, r_out in zip(inner.records, outer.records):
        torch.testing.assert_close(r_in.per_sample(), r_out.per_sample())


def test_non_loss_functions_pass_through() -> None:
    a = _leaf(B, 3)
    expected = (a.sin() @ a.t()).softmax(-1).sum(0)
    with LossCapture(B, strict=True) as cap:
        got = (a.sin() @ a.t()).softmax(-1).sum(0)
    assert torch.equal(got, expected) and cap.records == []


def test_no_host_sync_inside_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The record-time check stays a device tensor: nothing reads a tensor back to the host."""
    x = _leaf(B, T, C)
    y = torch.randint(0, C, (B, T), generator=_gen(3))
    y[0, 0] = -100
    w = torch.rand(C, dtype=DT)
    z = _leaf(B, 3)
    lengths = torch.tensor([3, 2, 1, 2])
    targets = torch.randint(1, C, (B, 3), generator=_gen(4))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization inside LossCapture")

    with LossCapture(B, strict=True) as cap:
        for name in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__"):
            monkeypatch.setattr(Tensor, name, forbidden)
        F.cross_entropy(x.view(-1, C), y.view(-1), weight=w, label_smoothing=0.1)
        F.cross_entropy(x.transpose(1, 2), y, weight=w)
        F.mse_loss(z, torch.zeros_like(z), weight=torch.ones_like(z))
        F.binary_cross_entropy_with_logits(z, torch.ones_like(z), pos_weight=torch.ones(3, dtype=DT))
        F.kl_div(F.log_softmax(z, 1), torch.full_like(z, 1 / 3), reduction="batchmean")
        F.ctc_loss(F.log_softmax(x.transpose(0, 1), 2), targets, torch.full((B,), T), lengths)
        monkeypatch.undo()
    assert len(cap.records) == 6 and all(r.verified for r in cap.records)


@pytest.mark.cuda
def test_no_device_sync_on_cuda() -> None:
    """On CUDA, ``set_sync_debug_mode('error')`` turns any device→host synchronization into an
    error; calls that torch itself cannot run without a sync are skipped."""
    dev = torch.device("cuda")
    x = torch.randn(B * T, C, device=dev, requires_grad=True)
    y = torch.randint(0, C, (B * T,), device=dev)
    y[0] = -100
    w = torch.rand(C, device=dev)
    z = torch.randn(B, 3, device=dev, requires_grad=True)
    calls = {
        "ce": lambda: F.cross_entropy(x, y, weight=w),
        "ce_smoothing": lambda: F.cross_entropy(x, y, label_smoothing=0.1),
        "mse": lambda: F.mse_loss(z, torch.zeros_like(z)),
        "bce_logits": lambda: F.binary_cross_entropy_with_logits(
            z, torch.ones_like(z), pos_weight=torch.ones(3, device=dev)
        ),
        "kl": lambda: F.kl_div(F.log_softmax(z, 1), torch.full_like(z, 1 / 3), reduction="batchmean"),
    }
    checked = 0
    for name, call in calls.items():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            try:
                call()
            except RuntimeError:
                continue  # torch's own call synchronizes: nothing to check
            with LossCapture(B, strict=True) as cap:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert cap.records[0].verified, name
        checked += 1
    assert checked >= 3


def test_consistency_check_detects_a_mismatch() -> None:
    from genbounds.estimators.loss_capture import _consistent

    e = torch.tensor([1.0, 2.0, 3.0])
    assert bool(_consistent(torch.tensor(2.0), e, None, 3.0, "mean", 1e-5))
    assert not bool(_consistent(torch.tensor(2.001), e, None, 3.0, "mean", 1e-5))
    assert bool(_consistent(torch.tensor(2.001), e, None, 3.0, "mean", 1e-2))
    assert bool(_consistent(torch.tensor(6.0), e, None, 1.0, "sum", 1e-5))
    nan = torch.tensor(float("nan"))
    assert bool(_consistent(nan, torch.tensor([nan, 1.0]), None, 2.0, "mean", 1e-5))
    assert not bool(_consistent(torch.tensor(1.0), torch.tensor([nan, 1.0]), None, 2.0, "mean", 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    x = (torch.randn(B, T, 64, generator=_gen(0)) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 64, (B, T), generator=_gen(1))
    with LossCapture(B, strict=True) as cap:
        value = F.cross_entropy(x.view(-1, 64), y.view(-1))
        F.mse_loss(x, torch.zeros_like(x))
    assert value.dtype == dtype
    for rec in cap.records:
        assert rec.verified
        ps = rec.per_sample()
        assert ps.dtype == torch.float32  # summed in float32: no half overflow
        torch.testing.assert_close(ps.mean(), rec.value.float(), rtol=1e-2, atol=1e-2)


def test_all_ignored_targets_give_nan_like_torch() -> None:
    x = _leaf(B, C)
    y = torch.full((B,), -100)
    with LossCapture(B, strict=True) as cap:
        value = F.cross_entropy(x, y)
    assert value.isnan()
    rec = cap.records[0]
    assert rec.verified  # NaN reproduces NaN
    assert rec.per_sample().isnan().all()


# ---------------------------------------------------------------------------------------------
# Combining captured losses: coefficients, remainder, per-sample graph
# ---------------------------------------------------------------------------------------------


def _mlp(d_in: int = 6, d_out: int = C, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out)).to(DT)


def test_coefficients_of_a_linear_combination() -> None:
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    target = torch.randn(B, C, generator=_gen(2), dtype=DT)
    with LossCapture(B, strict=True) as cap:
        out = net(x)
        ce = F.cross_entropy(out, y)
        mse = F.mse_loss(out, target, reduction="sum")
        loss = 0.7 * ce + 0.3 * mse
    coeffs, rem = loss_coefficients(loss, cap.records)
    torch.testing.assert_close(coeffs, torch.tensor([0.7, 0.3], dtype=DT))
    assert abs(float(rem.detach())) < 1e-12
    ps = combined_per_sample(cap.records, coeffs, B)
    # mean-scale convention: the 'sum' record is multiplied by b
    torch.testing.assert_close(ps, 0.7 * cap.records[0].per_sample() + 0.3 * B * cap.records[1].per_sample())
    torch.testing.assert_close(ps.mean(), loss)
    params = list(net.parameters())
    for a, b in zip(torch.autograd.grad(ps.mean(), params, retain_graph=True),
                    torch.autograd.grad(loss, params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_remainder_is_the_uncaptured_regularizer() -> None:
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    w = net[0].weight
    with LossCapture(B, strict=True) as cap:
        ce = F.cross_entropy(net(x), y)
        reg = 0.01 * w.pow(2).sum()
        loss = ce + reg
    coeffs, rem = loss_coefficients(loss, cap.records)
    torch.testing.assert_close(coeffs, torch.tensor([1.0], dtype=DT))
    torch.testing.assert_close(rem, reg, atol=1e-12, rtol=1e-12)
    # ∇r is the regularizer's gradient: the per-sample losses explain the rest
    (g_rem,) = torch.autograd.grad(rem, [w], retain_graph=True)
    torch.testing.assert_close(g_rem, 0.02 * w.detach())
    ps, rem2 = cap.per_sample(loss)
    torch.testing.assert_close(ps.mean() + rem2, loss)


def test_in_place_accumulation_into_the_captured_value() -> None:
    """``loss = F.cross_entropy(…); loss += reg``: the coefficient is taken at the call's output."""
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    w = net[2].weight
    with LossCapture(B, strict=True) as cap:
        loss = F.cross_entropy(net(x), y)
        ce_value = loss.detach().clone()
        loss += 0.5 * w.pow(2).sum()
        loss = 2 * loss
    coeffs, rem = loss_coefficients(loss, cap.records)
    torch.testing.assert_close(coeffs, torch.tensor([2.0], dtype=DT))
    torch.testing.assert_close(rem, loss - 2 * ce_value)
    torch.testing.assert_close(combined_per_sample(cap.records, coeffs, B).mean(), 2 * ce_value)


def test_coefficients_of_a_none_reduction_then_mean() -> None:
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    sample_w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DT)
    with LossCapture(B, strict=True) as cap:
        per = F.cross_entropy(net(x), y, reduction="none")
        loss = (sample_w * per).mean() + F.mse_loss(net(x), torch.zeros(B, C, dtype=DT))
    coeffs, rem = loss_coefficients(loss, cap.records)
    torch.testing.assert_close(coeffs, torch.cat([sample_w / B, torch.ones(1, dtype=DT)]))
    assert abs(float(rem.detach())) < 1e-12
    ps = combined_per_sample(cap.records, coeffs, B)
    torch.testing.assert_close(ps, sample_w * per + cap.records[1].per_sample())
    torch.testing.assert_close(ps.mean(), loss)


def test_nonlinear_combination_has_a_taylor_remainder() -> None:
    a = _leaf(B, 3)
    with LossCapture(B, strict=True) as cap:
        l1 = F.mse_loss(a, torch.zeros(B, 3, dtype=DT))
        l2 = F.l1_loss(a, torch.ones(B, 3, dtype=DT))
        loss = l1 * l2
    coeffs, rem = loss_coefficients(loss, cap.records)
    torch.testing.assert_close(coeffs, torch.stack([l2, l1]).detach())
    torch.testing.assert_close(rem, -loss.detach())  # loss − (l2·l1 + l1·l2)


def test_loss_coefficients_needs_a_graph() -> None:
    with pytest.raises(ValueError, match="autograd graph"):
        loss_coefficients(torch.tensor(1.0), [])


@pytest.mark.parametrize("tokens", [False, True])
def test_per_sample_losses_keep_the_graph(tokens: bool) -> None:
    net = _mlp()
    params = list(net.parameters())
    if tokens:
        x = torch.randn(B, T, 6, generator=_gen(1), dtype=DT)
        y = torch.randint(0, C, (B, T), generator=_gen(2))
        y[1, 0] = y[2, 2] = -100
    else:
        x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
        y = torch.tensor([0, 4, 2, 2])

    def step() -> Tensor:
        out = net(x)
        return F.cross_entropy(out.view(-1, C), y.view(-1))

    expected = torch.autograd.grad(step(), params)
    with LossCapture(B, strict=True) as cap:
        loss = step()
    got = torch.autograd.grad(loss, params, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # bit-identical gradients
    ps = cap.records[0].per_sample()
    for a, b in zip(torch.autograd.grad(ps.mean(), params, retain_graph=True), expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # per-sample gradients: sample i's loss only depends on sample i's inputs
    (gx,) = torch.autograd.grad(ps[1], [net[0].weight], retain_graph=True)
    x1 = x[1:2]
    out1 = net(x1).view(-1, C)
    y1 = y[1:2].view(-1)
    valid = (y != -100).sum()
    ref = B * F.cross_entropy(out1, y1, reduction="sum") / valid
    (gref,) = torch.autograd.grad(ref, [net[0].weight])
    torch.testing.assert_close(gx, gref, atol=1e-12, rtol=1e-10)


def test_bit_identical_training_gradients_with_module_losses() -> None:
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    crit = nn.CrossEntropyLoss(label_smoothing=0.05)

    def step() -> Tensor:
        out = net(x)
        return crit(out, y) + 0.1 * F.smooth_l1_loss(out, torch.zeros_like(out))

    net.zero_grad()
    ref_loss = step()
    ref_loss.backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with LossCapture(B, strict=True) as cap:
        loss = step()
    loss.backward(retain_graph=True)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), ref))
    assert len(cap.records) == 2


# ---------------------------------------------------------------------------------------------
# Overhead, torch.func
# ---------------------------------------------------------------------------------------------


def test_overhead_of_the_mode_on_a_small_mlp() -> None:
    """Prints the per-forward overhead (not asserted: shared CPUs are noisy). The mode is entered
    once and the forward repeated; a bare pass-through ``TorchFunctionMode`` is the floor that
    any torch-function mode pays per op."""
    from torch.overrides import TorchFunctionMode

    class Bare(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(32, 32), nn.ReLU())])  # 20 ops
    x = torch.randn(8, 32)

    def timed(mode: TorchFunctionMode | None, reps: int = 300) -> float:
        with torch.no_grad():
            if mode is None:
                start = time.perf_counter()
                for _ in range(reps):
                    net(x)
            else:
                with mode:
                    start = time.perf_counter()
                    for _ in range(reps):
                        net(x)
        return (time.perf_counter() - start) / reps * 1e6

    runs: dict[str, list[float]] = {"plain": [], "bare": [], "capture": []}
    for _ in range(7):  # interleaved, best of 7
        runs["plain"].append(timed(None))
        runs["bare"].append(timed(Bare()))
        runs["capture"].append(timed(LossCapture(8)))
    plain, bare, capture = (min(v) for v in runs.values())
    print(
        f"\nsmall MLP forward (20 torch functions): {plain:.1f} µs plain, {bare:.1f} µs under a bare "
        f"TorchFunctionMode, {capture:.1f} µs under LossCapture: +{capture - plain:.1f} µs per forward "
        f"(+{(capture - plain) / 20:.2f} µs per op; bare mode +{(bare - plain) / 20:.2f} µs per op)"
    )
    with LossCapture(8) as cap:
        net(x)
    assert cap.records == []


def test_functional_call() -> None:
    net = _mlp()
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    with LossCapture(B, strict=True) as cap:
        loss = F.cross_entropy(functional_call(net, params, (x,)), y)
    ps = cap.records[0].per_sample()
    torch.testing.assert_close(ps.mean(), loss)
    for a, b in zip(torch.autograd.grad(ps.mean(), list(params.values()), retain_graph=True),
                    torch.autograd.grad(loss, list(params.values()))):
        torch.testing.assert_close(a, b)


def test_per_sample_gradients_with_vmap_of_grad() -> None:
    """The mode entered *inside* ``f`` works under ``vmap(grad(f))``; there ``f`` sees a batch
    of one sample, so ``batch_size=1``."""
    net = _mlp()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    w = torch.rand(C, generator=_gen(2), dtype=DT) + 0.5

    def f(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        with LossCapture(batch_size=1, strict=True) as cap:
            out = functional_call(net, p, (xi.unsqueeze(0),))
            F.cross_entropy(out, yi.unsqueeze(0), weight=w)
        (rec,) = cap.records
        return rec.per_sample(1)[0]

    per_sample_grads = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    for i in range(B):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        li = F.cross_entropy(functional_call(net, p, (x[i : i + 1],)), y[i : i + 1], weight=w)
        ref = torch.autograd.grad(li, list(p.values()))
        for name, g in zip(p, ref):
            torch.testing.assert_close(per_sample_grads[name][i], g)
    # and the batch-level capture gives the same per-sample losses, up to the batch's weight
    # normalization (Σ_batch w[y] instead of the sample's own w[y_i])
    losses = vmap(f, in_dims=(None, 0, 0))(params, x, y)
    with LossCapture(B, strict=True) as cap:
        F.cross_entropy(functional_call(net, params, (x,)), y, weight=w)
    batch_ps = cap.records[0].per_sample()
    torch.testing.assert_close(batch_ps, losses * w[y] * B / w[y].sum())


def test_mode_outside_vmap_refuses_instead_of_mismapping() -> None:
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])

    def f(xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(net(xi.unsqueeze(0)), yi.unsqueeze(0))

    with LossCapture(B) as cap:
        with pytest.raises(RuntimeError, match="torch.func transform"):
            vmap(f)(x, y)
    with LossCapture(B, on_transform="skip") as cap:
        expected = vmap(f)(x, y)
    assert cap.records == []
    torch.testing.assert_close(expected, F.cross_entropy(net(x), y, reduction="none"))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LossCapture(0)
    with pytest.raises(ValueError, match="on_transform"):
        LossCapture(2, on_transform="ignore")


def test_record_is_a_dataclass() -> None:
    a = _leaf(B, 2)
    with LossCapture(B) as cap:
        F.mse_loss(a, torch.zeros(B, 2, dtype=DT))
    rec = cap.records[0]
    assert isinstance(rec, CapturedLoss)
    assert "mse_loss" in repr(rec)
    cap.clear()
    assert cap.records == [] and cap.errors == []


def test_capture_outside_transforms_leaves_functorch_state_alone(monkeypatch) -> None:
    """Outside any ``torch.func`` transform the mode never asks functorch for its level:
    ``maybe_current_level()`` creates functorch's thread-local state, which every later backward
    of the thread then copies (small allocations a step in the user's training). Under ``vmap``
    the level is still read (the transform created the state already) and the mode still refuses."""
    calls = []
    real = torch._C._functorch.maybe_current_level
    monkeypatch.setattr(torch._C._functorch, "maybe_current_level", lambda: calls.append(1) or real())
    net = _mlp()
    x = torch.randn(B, 6, generator=_gen(1), dtype=DT)
    y = torch.tensor([0, 4, 2, 2])
    with LossCapture(B) as cap:
        F.cross_entropy(net(x), y).backward()
    assert len(cap.records) == 1 and calls == []

    def f(xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(net(xi.unsqueeze(0)), yi.unsqueeze(0))

    with LossCapture(B):
        with pytest.raises(RuntimeError, match="torch.func transform"):
            vmap(f)(x, y)
    assert calls  # (read inside the transform)


def test_leaves_give_coefficients_where_the_weights_need_no_gradient():
    """``leaves=True``: at a point whose parameters need no gradient (a probe's perturbed weights),
    each captured loss value reaches the step as a leaf with the very same bits, so the returned
    loss's weights (mixup's λ) are still read by ``loss_coefficients``; without it the values have
    no graph and the coefficients are all zero."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def step():
        out = functional_call(net, params, (x,))
        return 0.3 * F.cross_entropy(out, y) + 0.7 * F.cross_entropy(out, y.flip(0))

    with torch.no_grad():
        plain = step()
    for leaves in (True, False):
        with torch.enable_grad(), LossCapture(batch_size=6, leaves=leaves) as cap:
            loss = step()
        assert torch.equal(loss.detach(), plain)
        if not leaves:
            assert not loss.requires_grad and all(r.detached for r in cap.records)
            continue
        c, rest = loss_coefficients(loss, cap.records)
        assert torch.allclose(c, torch.tensor([0.3, 0.7])) and abs(float(rest)) < 1e-6
        per_sample = combined_per_sample(cap.records, c, 6)
        want = 0.3 * F.cross_entropy(net(x), y, reduction="none") + 0.7 * F.cross_entropy(net(x), y.flip(0),
                                                                                         reduction="none")
        assert torch.allclose(per_sample, want.detach(), atol=1e-6) and not per_sample.requires_grad
