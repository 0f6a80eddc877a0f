"""Block-wise kernels for softmaxes over bilinear similarity rows: the memory-saving core of PLCA's association.

A similarity row is d_r = (a_r . b_k)_k over all pixels k of the other image, scaled by a per-row constant
`inv_r` (1 / (std + 1e-10) under contrast normalisation, Eq 5-6; 1 for a plain softmax). By default no L x L
matrix is held: each kernel walks over blocks of rows, keeps its inputs and a few numbers per row, and
recomputes a block in backward. Peak extra memory is one block of about 2^21 entries instead of several L x L
matrices. On request (`cache`, `similarities`) the cosine kernels keep the similarity blocks they computed in
forward for backward instead: fewer matrix products, one L x L matrix (or half of one) more. The per-row scale
is a constant to autograd: the spec detaches the CN statistics.

Rows are exponentiated as exp((d - rowmax) * inv - log_sum), with log_sum = log sum_k exp((d_k - rowmax) * inv),
and the argument is floored just above the log of the smallest normal float: terms below 1e-38 of the row
maximum change nothing, and denormal numbers would make exp tens of times slower on CPUs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from plca.losses.constants import CN_EPS, NORM_EPS

#: Default number of similarity entries one block holds (rows x columns): 2^21 floats are 8 MiB in float32,
#: big enough for efficient matrix products, small enough to keep the peak low.
DEFAULT_BLOCK_ELEMENTS = 2**21


def rows_per_block(num_columns: int, block_rows: int | None = None) -> int:
    """Rows per block: `block_rows` if given, else as many as fit DEFAULT_BLOCK_ELEMENTS (at least 1)."""
    if block_rows is not None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        return block_rows
    return max(1, DEFAULT_BLOCK_ELEMENTS // max(num_columns, 1))


def _blocks(num_rows: int, step: int) -> Iterator[slice]:
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _exp_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _inverse_std_(d: Tensor, src: Tensor | None = None) -> Tensor:
    """Centre each row of d in place (or of src into d) and return 1 / (unbiased std + CN_EPS) per row (two-pass
    variance)."""
    src = d if src is None else src
    torch.sub(src, src.mean(dim=1, keepdim=True), out=d)
    var = torch.linalg.vector_norm(d, dim=1).square_().div_(d.shape[1] - 1)
    return var.sqrt_().add_(CN_EPS).reciprocal_()


def _exp_rows_(d: Tensor, inv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """d <- exp((d - rowmax) * inv) in place; returns (rowmax, argmax, rowsum)."""
    peak, arg = d.max(dim=1)
    d.sub_(peak[:, None]).mul_(inv[:, None]).clamp_(min=_exp_floor(d.dtype)).exp_()
    return peak, arg, d.sum(dim=1)


def _probs_(d: Tensor, row_max: Tensor, inv: Tensor, log_sum: Tensor) -> Tensor:
    """d <- softmax probabilities in place, from the row statistics of a forward pass."""
    d.sub_(row_max[:, None]).mul_(inv[:, None]).sub_(log_sum[:, None])
    return d.clamp_(min=_exp_floor(d.dtype)).exp_()


class _UnitRows(torch.autograd.Function):
    """x / max(||x||, NORM_EPS) along the last dim.

    Saves the norms and either the output or the input: the input when the caller keeps it alive anyway
    (its own features), so that the unit vectors are freed as soon as their consumers are done. Backward works
    in blocks of rows, so recomputing unit vectors from the input never takes a full copy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep_input: bool) -> Tensor:
        norm = _row_norms(x)
        # same memory layout as x (pixel rows are usually a transposed view of an image): no transposing copies
        unit = torch.div(x, norm, out=torch.empty_like(x))
        ctx.save_for_backward(x if keep_input else unit, norm)
        ctx.keep_input = keep_input
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, norm = ctx.saved_tensors
        # same memory layout as what was kept: no transposing copies
        return _through_unit_rows(grad, kept, norm, kept_is_unit=not ctx.keep_input, out=torch.empty_like(kept)), None


def _row_norms(x: Tensor) -> Tensor:
    """max(||x_r||, NORM_EPS) per row r (last dim), [..., 1]: the divisor of x's unit rows."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_(min=NORM_EPS)


def _through_unit_rows(grad: Tensor, kept: Tensor, norm: Tensor, *, kept_is_unit: bool = False,
                       out: Tensor | None = None) -> Tensor:
    """The gradient wrt x of `grad`, a gradient wrt x / |x| (per row), in blocks of rows so that recomputing unit
    vectors from x never takes a full copy. kept: x, or its unit rows (`kept_is_unit`); out: where to write
    (default: grad itself, in place)."""
    out = grad if out is None else out
    # per matrix of rows (views keep each layout), in blocks of rows
    for o, x, n, g in zip(*(t.view(-1, *t.shape[-2:]) for t in (out, kept, norm)), grad.reshape(-1, *grad.shape[-2:]),
                          strict=True):
        for rows in _blocks(x.shape[0], rows_per_block(x.shape[1])):
            unit = x[rows] if kept_is_unit else x[rows] / n[rows]
            g_rows = g[rows]
            # d(x/|x|) = (g - u (u . g)) / |x|; where the norm was floored the divisor is a constant: g / eps
            along = (unit * g_rows).sum(dim=-1, keepdim=True).mul_(n[rows] > NORM_EPS)
            o[rows] = torch.addcmul(g_rows, unit, along, value=-1.0).div_(n[rows])
    return out


def unit_rows(x: Tensor, *, keep_input: bool = False) -> Tensor:
    """x scaled to unit length along the last dim, as torch.nn.functional.normalize(x, dim=-1).

    keep_input: save x rather than the result for backward (cheaper when x stays alive anyway).
    """
    return _UnitRows.apply(x, keep_input)


@dataclass
class RowStatistics:
    """What one pass over the rows of d = a @ b.T keeps (no gradient)."""

    #: Column of each row's maximum: argmax of d_r = argmax of softmax(CN(d_r)), as CN's scale is positive.
    argmax: Tensor
    #: d_r at the argmax.
    row_max: Tensor
    #: The per-row scale applied before the softmax.
    inv_scale: Tensor
    #: log sum_k exp((d_rk - row_max_r) * inv_r): minus the log-probability of the argmax.
    log_sum: Tensor

    def take(self, index: Tensor) -> RowStatistics:
        """The statistics of a subset of the rows (index or boolean mask)."""
        return RowStatistics(self.argmax[index], self.row_max[index], self.inv_scale[index], self.log_sum[index])


def _block_statistics_(
    d: Tensor, normalise: bool, inv: Tensor | None, src: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(argmax, row_max, inv, log_sum) of the rows of a block of similarities; d is overwritten.

    src: read the similarities from src (left intact) and use d as scratch, instead of a copy into d.
    """
    mean = (d if src is None else src).mean(dim=1) if normalise else None
    if mean is not None:
        inv = _inverse_std_(d, src)
    elif src is not None:
        d.copy_(src)
    if inv is None:
        inv = d.new_ones(d.shape[0])
    peak, arg, total = _exp_rows_(d, inv)
    return arg, (peak if mean is None else peak + mean), inv, total.log_()


@torch.no_grad()
def row_statistics(
    a: Tensor,
    b: Tensor,
    *,
    normalise: bool,
    rows: Tensor | None = None,
    inv_scale: Tensor | None = None,
    block_rows: int | None = None,
    keep: Tensor | None = None,
) -> RowStatistics:
    """Argmax, maximum, scale and log-sum of the rows of d = a @ b.T ([R, C] x [K, C]), block by block.

    normalise: scale by the CN factor 1 / (std + 1e-10); else by `inv_scale` (default 1).
    rows: only these rows of a, in this order. keep: an [R, K] tensor that receives d.
    """
    num_rows = a.shape[0] if rows is None else rows.shape[0]
    num_cols = b.shape[0]
    step = rows_per_block(num_cols, block_rows)
    stats = RowStatistics(torch.empty(num_rows, dtype=torch.long, device=a.device), a.new_empty(num_rows),
                          a.new_empty(num_rows), a.new_empty(num_rows))
    buffer = a.new_empty(min(step, num_rows), num_cols)
    for blk in _blocks(num_rows, step):
        a_blk = a[blk] if rows is None else a[rows[blk]]
        scratch = buffer[: blk.stop - blk.start]
        # with `keep`, the product lands there and the statistics read it (no copy)
        d = torch.mm(a_blk, b.T, out=scratch if keep is None else keep[blk])
        given = None if normalise or inv_scale is None else inv_scale[blk]
        stats.argmax[blk], stats.row_max[blk], stats.inv_scale[blk], stats.log_sum[blk] = _block_statistics_(
            scratch, normalise, given, None if keep is None else d)
    return stats


@torch.no_grad()
def column_statistics(d: Tensor, cols: Tensor, *, normalise: bool, block_rows: int | None = None) -> RowStatistics:
    """`row_statistics` of the rows `cols` of d.T, read from a stored similarity matrix d."""
    step = rows_per_block(d.shape[0], block_rows)
    stats = RowStatistics(torch.empty(cols.shape[0], dtype=torch.long, device=d.device), d.new_empty(cols.shape[0]),
                          d.new_empty(cols.shape[0]), d.new_empty(cols.shape[0]))
    for blk in _blocks(cols.shape[0], step):
        block = d[:, cols[blk]].T.contiguous()
        stats.argmax[blk], stats.row_max[blk], stats.inv_scale[blk], stats.log_sum[blk] = _block_statistics_(
            block, normalise, None)
    return stats


def _aggregate_forward(
    q: Tensor, k: Tensor, v: Tensor, inv: Tensor | None, alpha: float, step: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of the aggregation for a batch [N, L, .], block by block.

    Returns (y, inv, row_max, log_sum) with y = (1 - alpha) v + alpha agg, agg the softmax-weighted sums (made in
    y's buffer). y has v's layout: [N, L, Cv] rows of images [N, Cv, h, w] reshape back without a copy.
    """
    n_img, num_rows, _ = q.shape
    agg = torch.empty_like(v)  # v's layout: the lerp below runs in place over matching strides
    inv_all = q.new_empty(n_img, num_rows) if inv is None else inv.detach()
    row_max, log_sum = q.new_empty(n_img, num_rows), q.new_empty(n_img, num_rows)
    buffer = q.new_empty(min(step, num_rows), k.shape[1])
    for n in range(n_img):
        for rows in _blocks(num_rows, step):
            d = torch.mm(q[n, rows], k[n].T, out=buffer[: rows.stop - rows.start])
            mean = d.mean(dim=1) if inv is None else None
            if mean is not None:
                inv_all[n, rows] = _inverse_std_(d)
            peak, _, total = _exp_rows_(d, inv_all[n, rows])
            row_max[n, rows] = peak if mean is None else peak + mean
            log_sum[n, rows] = total.log()
            agg[n, rows] = torch.mm(d, v[n]).div_(total[:, None])
    y = agg if alpha == 1.0 else torch.lerp(v, agg, alpha, out=agg)  # in place: agg is not needed any more
    return y, inv_all, row_max, log_sum


class _Aggregate(torch.autograd.Function):
    """y_r = (1 - alpha) v_r + alpha sum_k softmax_k(inv_r * q_r . k_k) v_k, per image of a batch [N, L, .].

    inv [N, L] has no gradient; None computes it as the detached CN scale of each row.
    """

    @staticmethod
    def forward(ctx, q, k, v, inv, alpha, block_rows):  # type: ignore[override]
        step = rows_per_block(k.shape[1], block_rows)
        y, inv_all, row_max, log_sum = _aggregate_forward(q, k, v, inv, alpha, step)
        ctx.save_for_backward(q, k, v, inv_all, row_max, log_sum)
        ctx.step, ctx.alpha = step, alpha
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, k, v, inv, row_max, log_sum = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        alpha, step = ctx.alpha, ctx.step
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_v = grad_y * (1.0 - alpha) if need_v else None
        buffer = q.new_empty(min(step, q.shape[1]), k.shape[1])
        grad_w_buffer = q.new_empty(buffer.shape) if need_q or need_k else None
        for n in range(q.shape[0]):
            for rows in _blocks(q.shape[1], step):
                size = rows.stop - rows.start
                w = _probs_(torch.mm(q[n, rows], k[n].T, out=buffer[:size]), row_max[n, rows], inv[n, rows],
                            log_sum[n, rows])
                g = grad_y[n, rows]
                if need_v:
                    grad_v[n].addmm_(w.T, g, alpha=alpha)
                if need_q or need_k:
                    grad_w = torch.mm(g, v[n].T, out=grad_w_buffer[:size]).mul_(alpha)
                    # softmax backward: w * (dw - sum_k w dw), times the constant scale of the logits
                    centre = (w * grad_w).sum(dim=1, keepdim=True)
                    grad_logits = grad_w.sub_(centre).mul_(w).mul_(inv[n, rows, None])
                    if need_q:
                        grad_q[n, rows] = grad_logits @ k[n]
                    if need_k:
                        grad_k[n].addmm_(grad_logits.T, q[n, rows])
        return grad_q, grad_k, grad_v, None, None, None


def aggregate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    inv_scale: Tensor | None = None,
    *,
    alpha: float = 1.0,
    block_rows: int | None = None,
) -> Tensor:
    """(1 - alpha) v_r + alpha sum_k softmax_k(inv_r * q_r . k_k) v_k per image: [N, L, C] x2, [N, L, Cv].

    `inv_scale` [N, L] or None for contrast normalisation (Eq 5-6: the detached 1 / (std + 1e-10) per row).
    """
    return _Aggregate.apply(q, k, v, inv_scale, alpha, block_rows)


def _logit_grad(w: Tensor, grad_rows: Tensor, v_cols: Tensor, centre: Tensor, inv: Tensor, out: Tensor) -> Tensor:
    """Softmax backward for a block of weights w: inv * w * (dw - centre), with dw = grad_rows @ v_cols.T."""
    grad_w = torch.mm(grad_rows, v_cols.T, out=out)
    return grad_w.sub_(centre[:, None]).mul_(w).mul_(inv[:, None])


def _merge_moments_(count: Tensor, mean: Tensor, m2: Tensor, peak: Tensor, d: Tensor) -> None:
    """Fold a block of columns of some rows (d: [rows, k]) into their running count, mean, M2 and maximum."""
    k = d.shape[1]
    block_mean = d.mean(dim=1)
    block_m2 = (d - block_mean[:, None]).square_().sum(dim=1)
    total = count + k
    delta = block_mean - mean
    mean.add_(delta * k / total)
    m2.add_(block_m2 + delta.square() * count * k / total)
    count.copy_(total)
    torch.maximum(peak, d.amax(dim=1), out=peak)


def _symmetric_forward(
    x: Tensor, v: Tensor, inv: Tensor | None, alpha: float, side: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[dict[tuple[int, int], Tensor]]]:
    """`_aggregate_forward` for q = k = x that computes only the blocks x_a x_b^T with a <= b and keeps them.

    A first sweep computes and stores the blocks and gathers each row's moments and maximum; a second one
    exponentiates them for rows a and rows b. Returns (y, inv, row_max, log_sum, blocks per image).
    """
    n_img, num_rows, _ = x.shape
    blocks = list(_blocks(num_rows, side))
    agg = torch.zeros_like(v)
    inv_all = x.new_empty(n_img, num_rows) if inv is None else inv.detach()
    row_max, log_sum = x.new_empty(n_img, num_rows), x.new_empty(n_img, num_rows)
    floor = _exp_floor(x.dtype)
    kept = []
    for n in range(n_img):
        stored: dict[tuple[int, int], Tensor] = {}
        count, mean, m2 = x.new_zeros(num_rows), x.new_zeros(num_rows), x.new_zeros(num_rows)
        peak = x.new_full((num_rows,), -math.inf)
        for ia, a in enumerate(blocks):
            for ib in range(ia, len(blocks)):
                b = blocks[ib]
                d = stored[ia, ib] = x[n, a] @ x[n, b].T
                _merge_moments_(count[a], mean[a], m2[a], peak[a], d)
                if ib != ia:
                    _merge_moments_(count[b], mean[b], m2[b], peak[b], d.T)
        if inv is None:
            inv_all[n] = m2.div_(num_rows - 1).sqrt_().add_(CN_EPS).reciprocal_()
        sums = x.new_zeros(num_rows)
        for (ia, ib), d in stored.items():
            for rows, cols, block in ((blocks[ia], blocks[ib], d), (blocks[ib], blocks[ia], d.T)):
                e = (block - peak[rows, None]).mul_(inv_all[n, rows, None]).clamp_(min=floor).exp_()
                agg[n, rows].addmm_(e, v[n, cols])
                sums[rows] += e.sum(dim=1)
                if ib == ia:
                    break
        agg[n].div_(sums[:, None])
        row_max[n], log_sum[n] = peak, sums.log_()
        kept.append(stored)
    y = agg if alpha == 1.0 else torch.lerp(v, agg, alpha, out=agg)  # in place: agg is not needed any more
    return y, inv_all, row_max, log_sum, kept


def _unit_(v: Tensor) -> tuple[Tensor, Tensor]:
    """(v / max(||v||, NORM_EPS) along the last dim, the floored norms [..., 1]), in v's memory layout."""
    norm = _row_norms(v)
    return torch.div(v, norm, out=torch.empty_like(v)), norm


class _CosineAggregate(torch.autograd.Function):
    """y_r = (1 - alpha) v_r + alpha sum_k softmax_k(inv_r * x_r . x_k) v_k with x = v / |v|: the cosine SAGG.

    The unit vectors x are recomputed in backward, block by block, rather than saved, and each block's gradient
    is taken through x = v / |v| into grad_v at once: backward holds neither x nor its gradient whole (two
    L x C less at its peak). Backward exploits the symmetric similarity
    x x^T: it walks over pairs of square blocks (a <= b), recomputes (or, with `cache`, reads) x_a x_b^T once for
    rows a and rows b, and sums the logit gradients of both directions before multiplying by x: about 3.5 products of
    L x L x C instead of 5 (3 with the cache, whose forward also computes only half of x x^T).
    """

    @staticmethod
    def forward(ctx, v, inv, alpha, block_rows, cache):  # type: ignore[override]
        step = rows_per_block(v.shape[1], block_rows)
        # square blocks with about as many entries as a row block
        ctx.side = max(1, min(v.shape[1], math.isqrt(step * v.shape[1])))
        x, norm = _unit_(v)
        ctx.stored = None
        if cache:
            y, inv_all, row_max, log_sum, ctx.stored = _symmetric_forward(x, v, inv, alpha, ctx.side)
        else:
            y, inv_all, row_max, log_sum = _aggregate_forward(x, x, v, inv, alpha, step)
        # y rather than agg: the cycle keeps y for its own backward, and agg = (y - (1 - alpha) v) / alpha
        ctx.save_for_backward(v, norm, inv_all, row_max, log_sum, y)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        v, norm, inv, row_max, log_sum, y = ctx.saved_tensors
        alpha, side = ctx.alpha, ctx.side
        grad_v = grad_y * (1.0 - alpha)
        logits_buf, w_ba_buf, grad_buf = (v.new_empty(side, side) for _ in range(3))
        # one buffer per block-sized temporary, reused over the pairs (fresh ones would fault in new pages each time)
        x_a_buf, x_b_buf, grad_x_buf, scratch = (v.new_empty(side, v.shape[2]) for _ in range(4))
        blocks = list(_blocks(v.shape[1], side))
        for n in range(v.shape[0]):
            # unit vectors block by block (cheap to recompute), and each block's gradient taken through x = v / |v|
            # into grad_v at once (the map is linear per row): neither x nor its gradient is held whole
            def unit(rows: slice, buf: Tensor, n: int = n) -> Tensor:
                return torch.div(v[n, rows], norm[n, rows], out=buf[: rows.stop - rows.start])

            def through_unit(out: Tensor, grad_x: Tensor, x: Tensor, rows: slice, n: int = n) -> None:
                _add_through_unit_(out, grad_x, x, norm[n, rows], alpha, scratch[: x.shape[0]])

            g_agg = grad_y[n]
            # the softmax backward needs sum_k w_rk dw_rk over whole rows: it equals g_agg_r . agg_r
            centre = _aggregate_dot(g_agg, y[n], v[n], alpha)
            for ia, a in enumerate(blocks):
                x_a = unit(a, x_a_buf)
                for ib in range(ia, len(blocks)):
                    b = blocks[ib]
                    x_b = x_a if ib == ia else unit(b, x_b_buf)
                    na, nb = a.stop - a.start, b.stop - b.start
                    if ctx.stored is None:
                        logits = torch.mm(x_a, x_b.T, out=logits_buf[:na, :nb])
                    else:  # the forward pass kept it (copied: a second backward finds it intact)
                        logits = logits_buf[:na, :nb].copy_(ctx.stored[n][ia, ib])
                    # logits_ab = x_a . x_b is entry b of rows a and entry a of rows b
                    w_ba = None
                    if ib != ia:
                        w_ba = _probs_(w_ba_buf[:nb, :na].copy_(logits.T), row_max[n, b], inv[n, b], log_sum[n, b])
                    w_ab = _probs_(logits, row_max[n, a], inv[n, a], log_sum[n, a])
                    grad_v[n, b].addmm_(w_ab.T, g_agg[a], alpha=alpha)
                    if w_ba is not None:
                        grad_v[n, a].addmm_(w_ba.T, g_agg[b], alpha=alpha)
                    both = _logit_grad(w_ab, g_agg[a], v[n, b], centre[a], inv[n, a], grad_buf[:na, :nb])
                    if w_ba is None:
                        through_unit(grad_v[n, a], torch.mm(both + both.T, x_a, out=grad_x_buf[:na]), x_a, a)
                        continue
                    # w_ab is used up: its buffer takes the other direction's gradient
                    both.add_(_logit_grad(w_ba, g_agg[b], v[n, a], centre[b], inv[n, b], logits_buf[:nb, :na]).T)
                    through_unit(grad_v[n, a], torch.mm(both, x_b, out=grad_x_buf[:na]), x_a, a)
                    through_unit(grad_v[n, b], torch.mm(both.T, x_a, out=grad_x_buf[:nb]), x_b, b)
        return grad_v, None, None, None, None


def _aggregate_dot(g: Tensor, y: Tensor, v: Tensor, alpha: float) -> Tensor:
    """g_r . agg_r per row, with agg = (y - (1 - alpha) v) / alpha made block by block (no L x C copy)."""
    if alpha == 1.0:
        return (g * y).sum(dim=1)
    out = g.new_empty(g.shape[0])
    for rows in _blocks(g.shape[0], rows_per_block(g.shape[1])):
        agg = torch.sub(y[rows], v[rows], alpha=1.0 - alpha).div_(alpha)
        out[rows] = (g[rows] * agg).sum(dim=1)
    return out


def _add_through_unit_(out: Tensor, grad_x: Tensor, x: Tensor, norm: Tensor, scale: float, scratch: Tensor) -> None:
    """out += scale * d(x)/d(v)^T grad_x for x = v / |v|: (g - x (x . g)) / |v|, constant where |v| was floored.

    scratch: a tensor of x's shape to work in.
    """
    along = torch.mul(x, grad_x, out=scratch).sum(dim=1, keepdim=True).mul_(norm > NORM_EPS)
    # out += scale / |v| * grad_x - scale / |v| * (x . grad_x) x: two passes over the block, no temporary
    factor = norm.reciprocal().mul_(scale)
    out.addcmul_(grad_x, factor).addcmul_(x, along.mul_(factor), value=-1.0)


def cosine_aggregate(
    v: Tensor, inv_scale: Tensor | None = None, *, alpha: float = 1.0, block_rows: int | None = None,
    cache: bool = False,
) -> Tensor:
    """`aggregate(x, x, v, inv_scale, alpha=alpha)` with x = v / |v| per row, for a batch v [N, L, C].

    inv_scale [N, L] or None for contrast normalisation. cache: compute only the upper half of x x^T in forward
    and keep it for backward (about half an L x L matrix per image) instead of recomputing it.
    """
    return _CosineAggregate.apply(v, inv_scale, alpha, block_rows, cache)


@dataclass
class Pick:
    """One set of picks for `picked_log_softmax`: rows of d = tensors[a] @ tensors[b].T and a column in each."""

    a: int
    b: int
    #: Distinct row indices into tensors[a].
    rows: Tensor
    #: Column picked in each row.
    cols: Tensor
    inv_scale: Tensor
    #: `row_statistics` of these rows with this scale (row_max, log_sum); None computes them.
    row_max: Tensor | None = None
    log_sum: Tensor | None = None
    #: With batched tensors [N, L, C]: the image pair n the pick reads; None for tensors [L, C].
    pair: int | None = None


def _mat(t: Tensor, pair: int | None) -> Tensor:
    return t if pair is None else t[pair]


def _fill_statistics(pick: Pick, a: Tensor, b: Tensor, block_rows: int | None) -> Pick:
    """The pick with its row statistics, computed if it came without (direct use and tests)."""
    if pick.row_max is not None:
        return pick
    stats = row_statistics(a[pick.rows] * pick.inv_scale[:, None], b, normalise=False, block_rows=block_rows)
    return replace(pick, row_max=stats.row_max / pick.inv_scale, log_sum=stats.log_sum)


class _PickedLogSoftmax(torch.autograd.Function):
    """value_r = log softmax_k(inv_r * a_{row_r} . b_k) at k = col_r, for several picks sharing inputs.

    Sharing matters for the cosine cycle: D_st and D_ts = D_st^T use the same two tensors, whose gradients
    then accumulate in one buffer each instead of two.
    """

    @staticmethod
    def forward(ctx, picks: Sequence[Pick], block_rows: int | None, *tensors: Tensor):  # type: ignore[override]
        values, filled = [], []
        for p in picks:
            a, b = _mat(tensors[p.a], p.pair), _mat(tensors[p.b], p.pair)
            p = _fill_statistics(p, a, b, block_rows)
            picked = a.new_empty(p.rows.shape[0])
            for blk in _blocks(p.rows.shape[0], rows_per_block(b.shape[0], block_rows)):
                picked[blk] = (a[p.rows[blk]] * b[p.cols[blk]]).sum(dim=1)
            values.append((picked - p.row_max).mul_(p.inv_scale).sub_(p.log_sum))
            filled.append(p)
        ctx.save_for_backward(*tensors)
        ctx.picks, ctx.block_rows = filled, block_rows
        return tuple(values)

    @staticmethod
    def backward(ctx, *grad_values: Tensor):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        grads = [torch.zeros_like(t) if needed else None for t, needed in zip(tensors, need, strict=True)]
        for p, grad_value in zip(ctx.picks, grad_values, strict=True):
            a, b = _mat(tensors[p.a], p.pair), _mat(tensors[p.b], p.pair)
            grad_a = None if grads[p.a] is None else _mat(grads[p.a], p.pair)
            grad_b = None if grads[p.b] is None else _mat(grads[p.b], p.pair)
            if grad_a is None and grad_b is None:
                continue
            coef = grad_value * p.inv_scale  # d value_r / d(a_r . b_k) = inv_r * (onehot_k - softmax_rk)
            step = rows_per_block(b.shape[0], ctx.block_rows)
            buffer = a.new_empty(min(step, p.rows.shape[0]), b.shape[0])
            for blk in _blocks(p.rows.shape[0], step):
                size = blk.stop - blk.start
                a_blk = a[p.rows[blk]]
                g = _probs_(torch.mm(a_blk, b.T, out=buffer[:size]), p.row_max[blk], p.inv_scale[blk],
                            p.log_sum[blk])
                g.mul_(-coef[blk, None])
                g[torch.arange(size, device=g.device), p.cols[blk]] += coef[blk]
                if grad_a is not None:
                    grad_a.index_add_(0, p.rows[blk], g @ b)
                if grad_b is not None:
                    grad_b.addmm_(g.T, a_blk)
        return (None, None, *grads)


def picked_log_softmax(tensors: Sequence[Tensor], picks: Sequence[Pick], *, block_rows: int | None = None
                       ) -> tuple[Tensor, ...]:
    """For each pick: log softmax_k(inv_r * a_{rows_r} . b_k) at k = cols_r, a = tensors[pick.a], b = tensors[pick.b].

    Differentiable in the tensors ([L, C] each, or [N, L, C] with `Pick.pair` set), recomputing the picked rows
    block by block in backward.
    """
    for p in picks:
        if (p.row_max is None) != (p.log_sum is None):
            raise ValueError("picked_log_softmax: give both row_max and log_sum of a pick, or neither")
    return _PickedLogSoftmax.apply(picks, block_rows, *tensors)




def _column_grad(d_cols: Tensor, rows: Tensor, pick: Pick, coef: Tensor) -> Tensor:
    """Gradient wrt d[rows, J] of the transposed picks (one per column j of J): coef_j (onehot - softmax)."""
    g = d_cols.sub_(pick.row_max).mul_(pick.inv_scale).sub_(pick.log_sum)
    g.clamp_(min=_exp_floor(g.dtype)).exp_().mul_(-coef)
    return g.add_((rows[:, None] == pick.cols[None, :]) * coef)


class _TransposedPicks(torch.autograd.Function):
    """Picks on d = a @ b.T (rows P of a) and on its transpose d.T = b @ a.T (rows J of b), as the cosine cycle,
    for each image pair of a batch (a [N, La, C], b [N, Lb, C]; one pick of each kind per pair).

    Backward forms the joint gradient of d block by block: full rows for P, and only the columns J for the
    other rows of a, so that each needed entry of d is computed once: 3 (p + q - p q) products of L x L x C
    where separate picks take 3 (p + q), with p, q the shares of rows in P and J; 2 (p + q - p q) when the
    forward pass kept d (`similarities`).

    With `normalise`, d is taken between the unit rows a / |a| and b / |b|, made block by block from the saved
    inputs and their norms: neither unit tensor is held, and the gradients reach a and b through the
    normalisation in place (two L x C less than unit rows made beforehand, and two more at their backward).
    """

    @staticmethod
    def forward(ctx, a, b, picks_ab, picks_ba, similarities, block_rows, normalise):  # type: ignore[override]
        norm_a = norm_b = None
        if normalise:
            norm_a, norm_b = _row_norms(a), _row_norms(b)
        if any(p.row_max is None for p in (*picks_ab, *picks_ba)):  # direct use: statistics from whole unit rows
            unit_a, unit_b = (a, b) if norm_a is None else (a / norm_a, b / norm_b)
            picks_ab = [_fill_statistics(p, _mat(unit_a, p.pair), _mat(unit_b, p.pair), block_rows) for p in picks_ab]
            picks_ba = [_fill_statistics(p, _mat(unit_b, p.pair), _mat(unit_a, p.pair), block_rows) for p in picks_ba]
            del unit_a, unit_b
        values: tuple[list[Tensor], list[Tensor]] = ([], [])
        for out, picks, (x, y, nx, ny) in ((values[0], picks_ab, (a, b, norm_a, norm_b)),
                                           (values[1], picks_ba, (b, a, norm_b, norm_a))):
            for p in picks:
                x_n, y_n = _mat(x, p.pair), _mat(y, p.pair)
                nx_n, ny_n = (None, None) if nx is None else (_mat(nx, p.pair), _mat(ny, p.pair))
                picked = x_n.new_empty(p.rows.shape[0])
                for blk in _blocks(p.rows.shape[0], rows_per_block(y_n.shape[0], block_rows)):
                    picked[blk] = (_unit_of(x_n, nx_n, p.rows[blk]) * _unit_of(y_n, ny_n, p.cols[blk])).sum(dim=1)
                out.append((picked - p.row_max).mul_(p.inv_scale).sub_(p.log_sum))
        # the kept similarities go with the saved tensors: freed after backward unless the graph is retained
        kept = [] if similarities is None else list(similarities)
        ctx.save_for_backward(a, b, *(() if norm_a is None else (norm_a, norm_b)), *kept)
        ctx.picks, ctx.block_rows, ctx.normalise, ctx.cached = (picks_ab, picks_ba), block_rows, normalise, bool(kept)
        return torch.cat(values[0]), torch.cat(values[1])

    @staticmethod
    def backward(ctx, grad_ab: Tensor, grad_ba: Tensor):
        a, b, *rest = ctx.saved_tensors
        norm_a, norm_b = (rest.pop(0), rest.pop(0)) if ctx.normalise else (None, None)
        stored_all = rest if ctx.cached else None
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        start_ab = start_ba = 0
        for k, (p_ab, p_ba) in enumerate(zip(*ctx.picks, strict=True)):
            n_ab, n_ba = p_ab.rows.shape[0], p_ba.rows.shape[0]
            norms = None if norm_a is None else (_mat(norm_a, p_ab.pair), _mat(norm_b, p_ab.pair))
            _transposed_backward(
                _mat(a, p_ab.pair), _mat(b, p_ab.pair), _mat(grad_a, p_ab.pair), _mat(grad_b, p_ab.pair), p_ab, p_ba,
                grad_ab[start_ab : start_ab + n_ab], grad_ba[start_ba : start_ba + n_ba],
                None if stored_all is None else stored_all[k], ctx.block_rows, norms)
            start_ab, start_ba = start_ab + n_ab, start_ba + n_ba
        if norm_a is not None:  # gradients wrt the unit rows -> wrt the inputs
            _through_unit_rows(grad_a, a, norm_a)
            _through_unit_rows(grad_b, b, norm_b)
        need_a, need_b = ctx.needs_input_grad[:2]
        return (grad_a if need_a else None), (grad_b if need_b else None), None, None, None, None, None


def _unit_of(x: Tensor, norm: Tensor | None, rows: Tensor | slice) -> Tensor:
    """Rows of x, or of its unit rows x / norm when norms are given (the same floats as dividing whole x)."""
    return x[rows] if norm is None else x[rows] / norm[rows]


def _transposed_backward(
    a: Tensor,
    b: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    p_ab: Pick,
    p_ba: Pick,
    grad_ab: Tensor,
    grad_ba: Tensor,
    stored: Tensor | None,
    block_rows: int | None,
    norms: tuple[Tensor, Tensor] | None = None,
) -> None:
    """One pair's share of `_TransposedPicks.backward`, accumulated into grad_a and grad_b.

    norms: (|a|, |b|) per row when d is between unit rows; the gradients are then wrt the unit rows.
    """
    norm_a, norm_b = (None, None) if norms is None else norms
    coef_ab, coef_ba = grad_ab * p_ab.inv_scale, grad_ba * p_ba.inv_scale
    j_rows = p_ba.rows
    step = rows_per_block(b.shape[0], block_rows)
    buffer = a.new_empty(min(step, max(p_ab.rows.shape[0], 1)), b.shape[0])
    # unit rows of b whole only where d is recomputed; with d kept, its gradient's columns are scaled instead
    b_full = b if norm_b is None or stored is not None else b / norm_b
    col_scale = None if norm_b is None or stored is None else norm_b.reciprocal().squeeze(1)
    # rows P of a: whole rows of d, their own picks plus the transposed picks' share in columns J
    for blk in _blocks(p_ab.rows.shape[0], step):
        size, rows = blk.stop - blk.start, p_ab.rows[blk]
        a_blk = _unit_of(a, norm_a, rows)
        if stored is None:
            d = torch.mm(a_blk, b_full.T, out=buffer[:size])
        else:
            d = torch.index_select(stored, 0, rows, out=buffer[:size])
        col_grad = _column_grad(d[:, j_rows], rows, p_ba, coef_ba)
        g = _probs_(d, p_ab.row_max[blk], p_ab.inv_scale[blk], p_ab.log_sum[blk]).mul_(-coef_ab[blk, None])
        g[torch.arange(size, device=g.device), p_ab.cols[blk]] += coef_ab[blk]
        g.index_add_(1, j_rows, col_grad)
        grad_b.addmm_(g.T, a_blk)
        grad_a.index_add_(0, rows, (g if col_scale is None else g.mul_(col_scale)) @ b_full)
    del b_full
    # the other rows of a meet only the columns J
    others = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    others[p_ab.rows] = False
    others = others.nonzero().squeeze(1)
    b_j = _unit_of(b, norm_b, j_rows)
    grad_b_j = torch.zeros_like(b_j)
    for blk in _blocks(others.shape[0], rows_per_block(j_rows.shape[0], block_rows)):
        rows = others[blk]
        a_blk = _unit_of(a, norm_a, rows)
        d_j = a_blk @ b_j.T if stored is None else stored[rows[:, None], j_rows]
        g = _column_grad(d_j, rows, p_ba, coef_ba)
        grad_a[rows] = g @ b_j
        grad_b_j.addmm_(g.T, a_blk)
    grad_b.index_add_(0, j_rows, grad_b_j)


def transposed_picks(
    a: Tensor,
    b: Tensor,
    picks_ab: Sequence[Pick],
    picks_ba: Sequence[Pick],
    *,
    similarities: Sequence[Tensor] | None = None,
    block_rows: int | None = None,
    normalise: bool = False,
) -> tuple[Tensor, Tensor]:
    """`picked_log_softmax([a, b], picks_ab + picks_ba)`, concatenated per kind, for picks_ab on a @ b.T and
    picks_ba on b @ a.T, one of each per image pair (a, b [L, C] with pair None, or [N, L, C]).

    Same values and gradients, with a cheaper backward (see `_TransposedPicks`). similarities: per pair, a @ b.T
    as computed by the caller (e.g. `row_statistics(..., keep=)`), read in backward instead of recomputed.
    normalise: the similarities are between the unit rows of a and b (cosine), made inside (see
    `_TransposedPicks`); `similarities` and the picks' statistics are then those of the unit rows.
    """
    if len(picks_ab) != len(picks_ba) or any(p.pair != q.pair for p, q in zip(picks_ab, picks_ba, strict=True)):
        raise ValueError("transposed_picks: one pick of each kind per pair, in the same order")
    for p, q in zip(picks_ab, picks_ba, strict=True):
        if (p.a, p.b, q.a, q.b) != (0, 1, 1, 0):
            raise ValueError("transposed_picks: picks_ab must read rows of a (a=0, b=1), picks_ba rows of b (a=1, b=0)")
        for pick in (p, q):
            if (pick.row_max is None) != (pick.log_sum is None):
                raise ValueError("transposed_picks: give both row_max and log_sum of a pick, or neither")
    if similarities is not None:
        for p, d in zip(picks_ab, similarities, strict=True):
            expected = (_mat(a, p.pair).shape[0], _mat(b, p.pair).shape[0])
            if d.shape != expected:
                raise ValueError(f"transposed_picks: similarities must be {list(expected)}, got {tuple(d.shape)}")
    return _TransposedPicks.apply(a, b, list(picks_ab), list(picks_ba), similarities, block_rows, normalise)
