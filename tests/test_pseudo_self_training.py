"""The self-training family's pseudo-label API (plca.pseudo; spec self-training.md): CBST's class-balanced thresholds
and labels, CRST's LRENT soft labels and mining ids, TPLD's voting, image confidence, split and full labels.

Hand cases are computed in the comments; `_reference_thresholds` is a literal loop transcription of the released
codes (crst_seg.py `val` + `kc_parameters`; CBST solve_ST.py `_val_impl`) for the random cross-checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from plca.pseudo import (
    class_balanced_thresholds,
    full_pseudo_labels,
    hard_pseudo_labels,
    image_confidence,
    mining_classes,
    soft_pseudo_labels,
    split_easy_hard,
    vote_densify,
)

torch.set_num_threads(1)

F64 = torch.float64
IGN = 255


def _probs(columns: list[list[float]], height: int = 1) -> torch.Tensor:
    """Pixels' class distributions in row-major order -> probs [1, C, height, len // height] (float64)."""
    t = torch.tensor(columns, dtype=F64)  # [P, C]
    return t.T.reshape(1, t.shape[1], height, t.shape[0] // height)


def _from_pred_conf(pred: list[int], conf: list[float], num_classes: int = 3) -> list[list[float]]:
    """Pixel distributions with argmax `pred` and max `conf` (the rest split evenly; conf > 1 / C)."""
    out = []
    for c, v in zip(pred, conf, strict=True):
        rest = (1.0 - v) / (num_classes - 1)
        out.append([v if k == c else rest for k in range(num_classes)])
    return out


def _reference_thresholds(probs: torch.Tensor, portion: float, ds_rate: int, policy: str, mxnet: bool) -> list[float]:
    """The released codes' loops, literally: per image, per class, conf[pred == c][::ds_rate], pooled, sorted."""
    num, num_classes, height, width = probs.shape
    lists: list[list[float]] = [[0.0] if mxnet else [] for _ in range(num_classes)]
    exists = [False] * num_classes
    for n in range(num):
        per_image: list[list[float]] = [[] for _ in range(num_classes)]
        for i in range(height):
            for j in range(width):
                values = [float(probs[n, c, i, j]) for c in range(num_classes)]
                c = values.index(max(values))
                per_image[c].append(max(values))
        for c in range(num_classes):
            if per_image[c]:
                exists[c] = True
                lists[c].extend(per_image[c][0::ds_rate])
    if policy == "global":
        pool = [0.0] if mxnet else []  # MXNet: array_pixel = 0.0, then every class's list (each with its 0.0)
        for c in range(num_classes):
            pool.extend(lists[c])
        pool.sort(reverse=True)
        k = int(math.floor(len(pool) * portion))
        value = pool[k - 1] if k >= 1 else 1.0
        return [1.0 if value == 0 else value] * num_classes
    out = []
    for c in range(num_classes):
        value = 1.0
        if exists[c]:
            values = sorted(lists[c], reverse=True)
            k = int(math.floor(len(values) * portion))
            if k != 0:
                value = values[k - 1]
        out.append(1.0 if value == 0 else value)
    return out


# --- CBST thresholds ---------------------------------------------------------------------------------------------

# five pixels, row-major: class 0 at .9, .6, .7, .8; class 1 once at .5; class 2 never predicted
HAND = _probs([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.8, 0.1, 0.1]])


def test_thresholds_hand_case_never_predicted_and_too_few_pixels_give_one() -> None:
    lam = class_balanced_thresholds(HAND, 0.5, ds_rate=1)
    # class 0: [.9, .8, .7, .6], k = floor(4 * .5) = 2 -> .8; class 1: n = 1, k = floor(.5) = 0 -> 1.0;
    # class 2: never predicted -> 1.0
    assert lam.tolist() == [0.8, 1.0, 1.0]
    assert class_balanced_thresholds(HAND, 0.75, ds_rate=1).tolist() == [0.7, 1.0, 1.0]  # k = 3
    assert class_balanced_thresholds(HAND, 1.0, ds_rate=1).tolist() == [0.6, 0.5, 1.0]  # k = n: the smallest
    assert class_balanced_thresholds(HAND, 0.0, ds_rate=1).tolist() == [1.0, 1.0, 1.0]  # k = 0 everywhere


def test_a_pixel_exactly_at_its_threshold_is_kept_r_ge_1() -> None:
    lam = class_balanced_thresholds(HAND, 0.5, ds_rate=1)  # [.8, 1, 1]: .8 is pixel 4's own conf
    labels = hard_pseudo_labels(HAND, lam)
    # pixel 0: r0 = .9/.8 > 1; pixel 4: r0 = .8/.8 = 1 exactly -> kept (the code's >=); the rest have max r < 1
    assert labels.tolist() == [[[0, IGN, IGN, IGN, 0]]]
    assert labels.dtype == torch.int64
    # the paper's p > lambda drops it
    assert hard_pseudo_labels(HAND, lam, strict=True).tolist() == [[[0, IGN, IGN, IGN, IGN]]]
    # a class with threshold 1.0 is kept only where p = 1
    certain = _probs([[0.0, 0.0, 1.0], [0.0, 0.01, 0.99]])
    assert hard_pseudo_labels(certain, [0.8, 1.0, 1.0]).tolist() == [[[2, IGN]]]


def test_hard_labels_take_argmax_of_r_not_of_p_and_honour_ignore_index() -> None:
    probs = _probs([[0.6, 0.4, 0.0]])
    # r = [.6/.9, .4/.3, 0] = [.67, 1.33, 0]: class 1 although p says class 0
    assert hard_pseudo_labels(probs, [0.9, 0.3, 1.0]).tolist() == [[[1]]]
    assert hard_pseudo_labels(probs, [0.9, 0.9, 1.0], ignore_index=-1).tolist() == [[[-1]]]


def test_ds_rate_samples_every_4th_pixel_of_each_class_row_major_per_image_from_the_first() -> None:
    # image A: 2 x 4, all class 0, confs row-major .91 ... .98 -> sampled .91 (pixel 0) and .95 (pixel 4)
    a = _from_pred_conf([0] * 8, [0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98])
    # image B: classes row-major 0 1 0 0 / 1 0 0 0; class 0's pixels are #0 2 3 5 6 7 -> its 1st and 5th: #0 (.51)
    # and #6 (.55); class 1's: #1 (.61) only
    b = _from_pred_conf([0, 1, 0, 0, 1, 0, 0, 0], [0.51, 0.61, 0.52, 0.53, 0.62, 0.54, 0.55, 0.56])
    probs = torch.cat([_probs(a, height=2), _probs(b, height=2)])
    # class 0 pooled: [.95, .91, .55, .51] -> portions .25/.5/.75/1 give k = 1..4
    got = [class_balanced_thresholds(probs, p)[0].item() for p in (0.25, 0.5, 0.75, 1.0)]
    assert got == [0.95, 0.91, 0.55, 0.51]
    assert class_balanced_thresholds(probs, 1.0).tolist() == [0.51, 0.61, 1.0]
    # (column-major sampling would take A's .91 and .93; sampling the pooled list would mix the images)
    assert class_balanced_thresholds(probs, 1.0, ds_rate=1)[0].item() == 0.51
    assert class_balanced_thresholds(probs, 0.25, ds_rate=1)[0].item() == 0.96  # all 14: k = 3 -> .98 .97 .96


def test_class_wise_and_global_selection_differ() -> None:
    # class 0: four pixels at .9; class 1: two at .5 and .45 (its pixels are less confident)
    probs = _probs(_from_pred_conf([0, 0, 1, 0, 1, 0], [0.9, 0.9, 0.5, 0.9, 0.45, 0.9]))
    cb = class_balanced_thresholds(probs, 0.5, ds_rate=1)
    glob = class_balanced_thresholds(probs, 0.5, ds_rate=1, policy="global")
    # cb: class 0 k = 2 -> .9, class 1 k = 1 -> .5, class 2 never predicted -> 1
    assert cb.tolist() == [0.9, 0.5, 1.0]
    # global: pool [.9 .9 .9 .9 .5 .45], k = 3 -> .9 for every class
    assert glob.tolist() == [0.9, 0.9, 0.9]
    # class-balanced selection labels the rare class's best pixel, global selection never does
    assert hard_pseudo_labels(probs, cb).tolist() == [[[0, 0, 1, 0, IGN, 0]]]
    assert hard_pseudo_labels(probs, glob).tolist() == [[[0, 0, IGN, 0, IGN, 0]]]


def test_the_mxnet_placeholder_changes_k() -> None:
    # class 0: .9 .8 .7 (n = 3); class 1: .6 (n = 1); class 2 never predicted
    probs = _probs(_from_pred_conf([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]))
    # CRST: k = floor(3 * .5) = 1 -> .9; floor(1 * .5) = 0 -> 1.0
    assert class_balanced_thresholds(probs, 0.5, ds_rate=1).tolist() == [0.9, 1.0, 1.0]
    # MXNet: [.9 .8 .7 0], k = floor(4 * .5) = 2 -> .8; [.6 0], k = 1 -> .6; class 2 still 1.0
    assert class_balanced_thresholds(probs, 0.5, ds_rate=1, cbst_mxnet=True).tolist() == [0.8, 0.6, 1.0]
    # portion 1: k = n + 1 picks the placeholder 0, which the code turns into 1.0
    assert class_balanced_thresholds(probs, 1.0, ds_rate=1, cbst_mxnet=True).tolist() == [1.0, 1.0, 1.0]
    # global: 4 values + 1 + C = 4 zeros = 8, k = floor(8 * .5) = 4 -> .6 (CRST-style pool: k = 2 -> .8)
    assert class_balanced_thresholds(probs, 0.5, ds_rate=1, policy="global", cbst_mxnet=True).tolist() == [0.6] * 3
    assert class_balanced_thresholds(probs, 0.5, ds_rate=1, policy="global").tolist() == [0.8] * 3


@pytest.mark.parametrize("policy", ["cb", "global"])
@pytest.mark.parametrize("mxnet", [False, True])
def test_thresholds_match_a_literal_transcription_of_the_codes(policy: str, mxnet: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, 9, generator=gen, dtype=F64) * 2
    logits[:, 4] -= 6  # a rare class
    probs = logits.softmax(1)
    for ds_rate in (1, 3, 4):
        for portion in (0.0, 0.05, 0.2, 0.35, 0.5, 1.0):
            got = class_balanced_thresholds(probs, portion, ds_rate=ds_rate, policy=policy, cbst_mxnet=mxnet)
            want = _reference_thresholds(probs, portion, ds_rate, policy, mxnet)
            assert got.tolist() == want, (ds_rate, portion)


def test_thresholds_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        class_balanced_thresholds(HAND, 0.5, policy="classwise")
    with pytest.raises(ValueError, match="portion"):
        class_balanced_thresholds(HAND, 1.5)
    with pytest.raises(ValueError, match="ds_rate"):
        class_balanced_thresholds(HAND, 0.5, ds_rate=0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        class_balanced_thresholds(HAND[0], 0.5)
    with pytest.raises(ValueError, match=r"thresholds must be \[C\]"):
        hard_pseudo_labels(HAND, [0.5, 0.5])
    with pytest.raises(ValueError, match="> 0"):
        hard_pseudo_labels(HAND, [0.5, 0.0, 1.0])


# --- CRST: LRENT soft labels, mining -----------------------------------------------------------------------------


def _lrent_by_hand(p: list[float], lam: list[float], alpha: float) -> tuple[list[float], bool]:
    w = [(pc / lc) ** (1 / alpha) for pc, lc in zip(p, lam, strict=True)]
    y = [v / sum(w) for v in w]
    reg = sum(-yc * math.log(pc + 1e-32) + alpha * yc * math.log(yc + 1e-32) for yc, pc in zip(y, p, strict=True))
    sel = sum(-yc * math.log(lc + 1e-32) for yc, lc in zip(y, lam, strict=True))
    return y, reg < sel


def test_lrent_soft_labels_and_keep_rule_on_hand_pixels() -> None:
    lam, alpha = [0.5, 0.8], 0.5
    # pixel 0: p = (.4, .6), r = (.8, .75), y ∝ r^2 = (.64, .5625) -> (.5322, .4678); reg .3811 < sel .4733: kept
    # (CBST would drop it: max r = .8 < 1); pixel 1: p = (.95, .05), kept, label 0
    probs = _probs([[0.4, 0.6], [0.95, 0.05]])
    soft, labels = soft_pseudo_labels(probs, lam, alpha)
    y0, keep0 = _lrent_by_hand([0.4, 0.6], lam, alpha)
    assert keep0 and y0[0] == pytest.approx(0.64 / 1.2025, rel=1e-15)
    assert soft[0, :, 0, 0].tolist() == pytest.approx(y0, rel=1e-13)
    assert labels.tolist() == [[[0, 0]]]
    assert hard_pseudo_labels(probs, lam).tolist() == [[[IGN, 0]]]
    # dropped: p = (.5, .5) at lambda = (.9, .9): y = (.5, .5), reg = log 2 - .5 log 2 = .3466 >= sel = .1054
    probs = _probs([[0.5, 0.5], [0.95, 0.05]])
    soft, labels = soft_pseudo_labels(probs, [0.9, 0.9], alpha)
    assert not _lrent_by_hand([0.5, 0.5], [0.9, 0.9], alpha)[1]
    assert labels.tolist() == [[[IGN, 0]]]
    assert soft[0, :, 0, 0].tolist() == [0.0, 0.0]  # zero where dropped
    y1, keep1 = _lrent_by_hand([0.95, 0.05], [0.9, 0.9], alpha)
    assert keep1 and soft[0, :, 0, 1].tolist() == pytest.approx(y1, rel=1e-13)
    assert soft_pseudo_labels(probs, [0.9, 0.9], alpha, ignore_index=7)[1].tolist() == [[[7, 0]]]
    # near the boundary (lambda = (.9, .9), alpha = .5): p0 = .895 gives reg - sel = -.5 log(1.0025) = -.00125,
    # kept; p0 = .892 gives +.0017, dropped
    probs = _probs([[0.895, 0.105], [0.892, 0.108]])
    assert [_lrent_by_hand(px, [0.9, 0.9], alpha)[1] for px in ([0.895, 0.105], [0.892, 0.108])] == [True, False]
    assert soft_pseudo_labels(probs, [0.9, 0.9], alpha)[1].tolist() == [[[0, IGN]]]


def test_lrent_keep_rule_is_sum_r_pow_one_over_alpha_above_one_on_random_pixels() -> None:
    # reg - sel = -alpha log sum_c r_c^(1/alpha) (without the 1e-32): kept iff that sum > 1
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 4, 6, 6, generator=gen, dtype=F64).mul(2).softmax(1)
    lam = torch.tensor([0.9, 0.5, 0.7, 0.95], dtype=F64)
    for alpha in (0.25, 0.5, 1.0):
        soft, labels = soft_pseudo_labels(probs, lam, alpha)
        z = (probs / lam[None, :, None, None]).pow(1 / alpha).sum(1)
        clear = (z.log().abs() > 1e-9)
        assert torch.equal((labels != IGN)[clear], (z > 1)[clear])
        kept = labels != IGN
        assert torch.allclose(soft.sum(1)[kept], torch.ones_like(z[kept]), rtol=0, atol=1e-12)
        assert torch.equal(soft.argmax(1)[kept], labels[kept])


def test_mining_ids_ascending_share_stable_and_strictly_below_mine_port() -> None:
    # 2000 pixels (one 40 x 50 image): class 0 1000, 1 none, 2 two (share exactly 1e-3: not mined), 3 none, 4 998
    pred = torch.zeros(2000, dtype=torch.long)
    pred[1000:1002] = 2
    pred[1002:] = 4
    probs = torch.nn.functional.one_hot(pred, 5).to(F64).T.reshape(1, 5, 40, 50)
    rare, mine = mining_classes(probs)
    assert mine.tolist() == [1, 3]  # shares 0, 0 (ties in class order)
    assert rare.tolist() == [1, 3, 2]
    assert rare.dtype == mine.dtype == torch.int64
    rare, mine = mining_classes(probs, mine_port=1.1e-3, rare_cls_num=4)
    assert mine.tolist() == [1, 3, 2] and rare.tolist() == [1, 3, 2, 4]
    assert mining_classes(probs, mine_port=0.5)[1].tolist() == [1, 3, 2, 4]  # .499 < .5; class 0's .5 is not


# --- TPLD -------------------------------------------------------------------------------------------------------


def test_voting_on_a_3x3_grid_by_hand() -> None:
    # lambda = .5 for every class, so r = 2p. r per pixel (row-major):
    r = [[1.6, 0.2, 0.2], [1.2, 0.6, 0.2], [0.2, 1.4, 0.4],    # labelled 0, 0, 1 by CBST
         [0.98, 0.6, 0.42], [0.9, 0.8, 0.3], [0.2, 1.8, 0.0],  # unlabelled, unlabelled, labelled 1
         [0.6, 0.6, 0.8], [0.6, 0.6, 0.8], [0.6, 0.6, 0.8]]    # unlabelled: top two classes 2 and 0 (tie: 0)
    probs = _probs([[v / 2 for v in px] for px in r], height=3)
    lam = [0.5, 0.5, 0.5]
    assert hard_pseudo_labels(probs, lam).tolist() == [[[0, 0, 1], [IGN, IGN, 1], [IGN, IGN, IGN]]]
    # centre: pooled0 = (1.6 + 1.2) / 2 = 1.4, pooled1 = (1.4 + 1.8) / 2 = 1.6; v0 = .3 * .9 + .7 * 1.4 = 1.25,
    #   v1 = .3 * .8 + .7 * 1.6 = 1.36 -> class 1 (voting overturns the argmax)
    # (1, 0): window = columns 0-1: pooled0 = 1.4, no 1 yet (synchronous) -> v0 = .294 + .98 = 1.274 -> 0
    # bottom row: no labelled 2 nor 0 in its windows in pass 1; in pass 2 pooled0 = .98 -> v0 = .18 + .686 < 1
    assert vote_densify(probs, lam).tolist() == [[[0, 0, 1], [0, 1, 1], [IGN, IGN, IGN]]]
    assert vote_densify(probs, lam, iterations=0).tolist() == hard_pseudo_labels(probs, lam).tolist()
    # alpha = 0: v = r < 1 for every unlabelled pixel -> nothing changes
    assert vote_densify(probs, lam, alpha=0.0).tolist() == hard_pseudo_labels(probs, lam).tolist()


def _reference_vote(probs: torch.Tensor, lam: list[float], iterations: int, alpha: float, window: int) -> torch.Tensor:
    """The voting written out over every class: window sums of the one-hot labels and of r x one-hot, then the two
    largest r by a stable descending sort (the spec's reading, literally)."""
    r = probs / torch.tensor(lam, dtype=probs.dtype)[None, :, None, None]
    labels = hard_pseudo_labels(probs, lam)
    num_classes, (height, width), pad = r.shape[1], r.shape[2:], window // 2

    def window_sum(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        total = torch.zeros_like(x)
        for dy in range(window):
            for dx in range(window):
                total = total + padded[..., dy:dy + height, dx:dx + width]
        return total

    top2 = torch.sort(r, dim=1, descending=True, stable=True).indices[:, :2]
    r_top = r.gather(1, top2)
    for _ in range(iterations):
        unlabelled = labels == IGN
        onehot = torch.zeros_like(r).scatter_(1, labels.clamp(0, num_classes - 1)[:, None], 1.0)
        onehot = onehot * (~unlabelled)[:, None].to(r.dtype)
        count = window_sum(onehot)
        pooled = torch.where(count > 0, window_sum(r * onehot) / count.clamp(min=1), torch.zeros_like(r))
        votes = (1 - alpha) * r_top + alpha * pooled.gather(1, top2)
        second = votes[:, 1] > votes[:, 0]
        best = torch.where(second, votes[:, 1], votes[:, 0])
        labels = torch.where(unlabelled & (best >= 1), torch.where(second, top2[:, 1], top2[:, 0]), labels)
    return labels


@pytest.mark.parametrize(("window", "alpha", "dtype"), [(3, 0.7, torch.float32), (5, 0.5, torch.float64)])
def test_voting_equals_the_window_sums_over_every_class_exactly(window: int, alpha: float, dtype: torch.dtype) -> None:
    """vote_densify pools only the two candidates' ratios; on random maps with ties (probabilities on a coarse
    grid) it gives the labels of the literal form over every class, to the bit."""
    g = torch.Generator().manual_seed(3)
    probs = (torch.randint(0, 6, (3, 7, 9, 11), generator=g).to(dtype) + 1).div(10)
    probs = probs / probs.sum(1, keepdim=True)
    lam = [0.3, 0.25, 0.5, 0.2, 0.35, 0.3, 0.4]
    for iterations in (1, 3):
        expected = _reference_vote(probs, lam, iterations, alpha, window)
        got = vote_densify(probs, lam, window=window, alpha=alpha, iterations=iterations)
        assert torch.equal(got, expected)
    hard = hard_pseudo_labels(probs, lam)
    assert 0 < int(((hard == IGN) & (got != IGN)).sum()) < int((hard == IGN).sum())  # the vote decides some pixels


def test_voting_ties_go_to_the_lower_class() -> None:
    # a row: labelled 0 (r 1.6, .2, .2) | r = (.8, .8, .4) | labelled 1 (r .2, 1.6, .2), lambda = .5:
    # candidates 0 then 1 (tie in r: lower class first); v0 = v1 = .24 + 1.12 -> the first, class 0
    probs = _probs([[0.8, 0.1, 0.1], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1]])
    assert vote_densify(probs, [0.5, 0.5, 0.5]).tolist() == [[[0, 0, 1]]]


def test_voting_is_synchronous_and_each_iteration_reaches_one_pixel_further() -> None:
    # a row of four pixels, p = (.8, .2), lambda = (.5, 1): r = (1.6, .2); only the first is given a label
    probs = _probs([[0.8, 0.2]] * 4)
    labels = torch.tensor([[[0, IGN, IGN, IGN]]])
    # a pixel with a labelled 0 in its 3-wide window: v0 = .3 * 1.6 + .7 * 1.6 = 1.6 -> 0; one pixel per pass
    assert vote_densify(probs, [0.5, 1.0], labels, iterations=1).tolist() == [[[0, 0, IGN, IGN]]]
    assert vote_densify(probs, [0.5, 1.0], labels, iterations=2).tolist() == [[[0, 0, 0, IGN]]]
    assert vote_densify(probs, [0.5, 1.0], labels, iterations=3).tolist() == [[[0, 0, 0, 0]]]
    assert labels.tolist() == [[[0, IGN, IGN, IGN]]]  # the input is not modified
    # 2 x 2, every pixel in every window: A labelled 0 (r 1.6, .2); B r = (.98, .51); C, D r = (.3, .85).
    # Synchronous: C, D see only A: pooled0 = 1.6, v0 = .09 + 1.12 = 1.21 -> 0. (Sequential, B first, would
    # give pooled0 = (1.6 + .98) / 2 = 1.29, v0 = .993 < 1 for C.)
    probs = _probs([[0.8, 0.2], [0.49, 0.51], [0.3, 0.85], [0.3, 0.85]], height=2)
    assert vote_densify(probs, [0.5, 1.0], iterations=1).tolist() == [[[0, 0], [0, 0]]]
    # a wider window reaches further
    row = _probs([[0.8, 0.2]] * 4)
    assert vote_densify(row, [0.5, 1.0], labels, iterations=1, window=5).tolist() == [[[0, 0, 0, IGN]]]
    with pytest.raises(ValueError, match="odd"):
        vote_densify(row, [0.5, 1.0], window=2)
    with pytest.raises(ValueError, match="outside"):
        vote_densify(row, [0.5, 1.0], torch.tensor([[[0, 2, IGN, IGN]]]))


def test_image_confidence_by_hand() -> None:
    lam = [0.5, 0.8]
    # image 0: class 0 at p0 .9, .6 (both >= .5); class 1 at p1 .55 (< .8), .9 -> (2/2)/.5 = 2, (1/2)/.8 = .625
    # image 1: class 0 at .5 (tie: argmax 0; .5 >= .5 kept), .7; class 1 at .6, .7 (< .8) -> 2 and 0
    probs = torch.cat([_probs([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.1, 0.9]]),
                       _probs([[0.5, 0.5], [0.7, 0.3], [0.4, 0.6], [0.3, 0.7]])])
    conf = image_confidence(probs, lam)
    assert conf.tolist() == pytest.approx([(2 + 0.625) / 2, 1.0], rel=1e-15)
    # an image predicting one class only averages over that class
    only = _probs([[0.6, 0.4], [0.55, 0.45]])
    assert image_confidence(only, lam).tolist() == [2.0]


def test_split_easy_hard_takes_floor_q_n_in_stable_descending_order() -> None:
    conf = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.7, 0.9], dtype=F64)
    # q = .3: floor(2.1) = 2 -> the first two .9s in input order
    assert split_easy_hard(conf).tolist() == [False, True, False, True, False, False, False]
    assert split_easy_hard(conf, q=0.5).nonzero().flatten().tolist() == [1, 3, 6]  # floor(3.5) = 3
    assert split_easy_hard(conf, q=0.6).nonzero().flatten().tolist() == [1, 3, 5, 6]  # floor(4.2) = 4
    assert split_easy_hard(conf, q=0.0).sum() == 0 and split_easy_hard(conf, q=1.0).all()
    # a Python float product: .29 * 100 = 28.999999999999996 -> 28
    assert split_easy_hard(torch.arange(100, dtype=F64), q=0.29).sum() == 28
    assert split_easy_hard(conf).dtype == torch.bool
    with pytest.raises(ValueError, match="NaN"):
        split_easy_hard(torch.tensor([0.1, float("nan")]))


def test_full_pseudo_labels_one_hot_where_confident_else_r_pow_gamma() -> None:
    lam = [0.5, 0.8]
    probs = _probs([[0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    # r: (1.2, .5) -> one-hot 0; (.9, .6875) -> r^gamma; (.4, 1) -> one-hot 1 (r = 1 exactly)
    full = full_pseudo_labels(probs, lam)
    want = torch.tensor([[1.0, 0.0], [0.9 ** 2, 0.6875 ** 2], [0.0, 1.0]], dtype=F64)
    assert torch.allclose(full[0, :, 0].T, want, rtol=1e-14, atol=0)
    assert full.shape == probs.shape
    full3 = full_pseudo_labels(probs, lam, gamma=3.0)
    assert full3[0, :, 0, 1].tolist() == pytest.approx([0.9 ** 3, 0.6875 ** 3], rel=1e-14)


# --- dtypes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_function_computes_in_the_input_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(3, 4, 5, 6, generator=gen, dtype=F64).mul(2).softmax(1).to(dtype)
    lam = class_balanced_thresholds(probs, 0.3, ds_rate=2)
    assert lam.dtype == dtype
    assert class_balanced_thresholds(probs, 0.3, policy="global", cbst_mxnet=True).dtype == dtype
    assert hard_pseudo_labels(probs, lam).dtype == torch.int64
    soft, labels = soft_pseudo_labels(probs, lam, 0.25)
    assert soft.dtype == dtype and labels.dtype == torch.int64
    assert all(t.dtype == torch.int64 for t in mining_classes(probs))
    assert vote_densify(probs, lam).dtype == torch.int64
    conf = image_confidence(probs, lam)
    assert conf.dtype == dtype and conf.shape == (3,)
    assert split_easy_hard(conf).dtype == torch.bool
    assert full_pseudo_labels(probs, lam).dtype == dtype
    # thresholds given in another dtype are used in the probs' one
    assert full_pseudo_labels(probs, lam.to(torch.float16 if dtype == F64 else F64)).dtype == dtype
