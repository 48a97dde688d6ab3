"""Running per-group weight-gradient sums, accumulated in deferred batches.

``group_grad[g] += sum_{n in group g} dW_n`` is a G-way split of the weight-gradient GEMM:
the same multiply-adds as ``dW``, but G outputs of ``|W|`` each. Done every batch, a layer
with a large weight and few rows per group (an MLP at batch 128 with 4 groups: 32 rows per
group) spends its time reading and writing the ``G x |W|`` sums, not multiplying.
:class:`DeferredGroupGrad` instead copies each batch's inputs and (scaled) output gradients,
sorted by group, into a fixed workspace, and runs the per-group GEMMs (or convolution weight
gradients) only when the workspace is full or the sums are read: many batches' rows per
GEMM, one pass over the sums per flush. The result is the same sum, in another order.

:func:`accumulate_group_grad` is the op (one flush) and
:func:`accumulate_group_grad_reference` its plain-torch definition through per-sample
gradients.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from spurfast.ops._common import live_padding, live_window

ConvArgs = Optional[Tuple[Sequence[int], Sequence[int], Sequence[int], int]]  # stride, padding, dilation, groups


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: Sequence[int], conv_args: ConvArgs) -> torch.Tensor:
    """``sum_n dW_n`` of rows ``x [N, D]``/``grad_out [N, C]`` (linear) or samples (conv)."""
    if conv_args is None:
        return grad_out.t().mm(x)
    stride, padding, dilation, groups = conv_args
    dummy = x.new_empty(tuple(weight_shape))  # convolution_backward reads only its shape
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, dummy, None, list(stride), list(padding), list(dilation), False,
        [0] * (len(weight_shape) - 2), groups, [False, True, False],
    )
    return grad_w


# Patch elements one im2col chunk of a small-map flush holds (4 MiB of float32; twice that
# with the copy into GEMM layout), so the flush stays within a bounded workspace.
_PATCH_CHUNK_ELEMENTS = 1 << 20


def _im2col_pays(out_g: torch.Tensor, rows_g: torch.Tensor, conv_args: ConvArgs) -> bool:
    """Whether ``dW`` of these conv rows is better done as im2col + GEMM than by
    ``convolution_backward``: an ungrouped 2-D conv of at least 256 output channels, several
    live taps and at most 16 output positions. There oneDNN's CPU weight-gradient kernels ran
    at 7-40 GF/s on this project's AVX2 host, while the patch matrix is still small next to the
    GEMM (timed side by side there: a 512x512 layer on 4x4 maps, B=32 in 4 groups, 46 ms per
    batch of deferred sums through oneDNN, 31 ms this way); on 8x8 maps, or with 128 channels,
    oneDNN was as fast or faster."""
    return (conv_args[3] == 1 and out_g.dim() == 4 and out_g.shape[0] >= 256 and out_g.shape[2] * out_g.shape[3] > 1
            and rows_g.shape[2] * rows_g.shape[3] <= 16 and out_g.dtype == rows_g.dtype and out_g.device == rows_g.device)


def _add_rows_im2col(out_g: torch.Tensor, rows_x: torch.Tensor, rows_g: torch.Tensor, conv_args: ConvArgs) -> None:
    """``out_g [Cout, Cin, kh, kw] += sum_n G_n^T U_n`` with ``U_n`` the im2col patches
    ``[L, Cin*kh*kw]`` of sample n, in chunks of samples; added by ``addmm_`` straight into
    ``out_g`` when it is contiguous (no ``|W|`` temporary)."""
    stride, padding, dilation, _ = conv_args
    out_channels, positions = rows_g.shape[1], rows_g.shape[2] * rows_g.shape[3]
    patch = out_g[0].numel()  # Cin * kh * kw
    dst = out_g.view(out_channels, patch) if out_g.is_contiguous() else None
    step = max(1, _PATCH_CHUNK_ELEMENTS // (positions * patch))
    for s0 in range(0, rows_x.shape[0], step):
        x, g = rows_x[s0:s0 + step], rows_g[s0:s0 + step]
        n = x.shape[0]
        patches = torch.nn.functional.unfold(x, out_g.shape[2:], dilation=dilation, padding=padding, stride=stride)
        patches = patches.transpose(1, 2).reshape(n * positions, patch)  # [n*L, K]
        grads = g.reshape(n, out_channels, positions).transpose(0, 1).reshape(out_channels, n * positions)  # [Cout, n*L]
        if dst is not None:
            dst.addmm_(grads, patches)
        else:
            out_g.add_(grads.mm(patches).view(out_g.shape))


def _add_rows(out_g: torch.Tensor, rows_x: torch.Tensor, rows_g: torch.Tensor, conv_args: ConvArgs) -> None:
    """``out_g += dW`` of one group's rows, straight into ``out_g`` for a Linear of its dtype
    and device (``dW`` is formed on the rows' device: sums kept on the CPU get one copy)."""
    if conv_args is None and out_g.dtype == rows_x.dtype and out_g.device == rows_x.device:
        out_g.addmm_(rows_g.t(), rows_x)
        return
    if conv_args is not None:
        stride, padding, dilation, groups = conv_args
        kernel = tuple(out_g.shape[2:])
        window = live_window(rows_x.shape[2:], rows_g.shape[2:], kernel, stride, padding, dilation)
        if window is not None:  # taps that read only padding get nothing: skip them
            live = (slice(None), slice(None)) + tuple(slice(lo, hi) for lo, hi in window)
            out_g, conv_args = out_g[live], (stride, live_padding(padding, window, dilation), dilation, groups)
        if rows_x.device.type == "cpu" and _im2col_pays(out_g, rows_g, conv_args):
            _add_rows_im2col(out_g, rows_x, rows_g, conv_args)
            return
    out_g.add_(_weight_grad(rows_x, rows_g, out_g.shape, conv_args).to(out_g.device, out_g.dtype))


def accumulate_group_grad(
    out: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, group_ids: torch.Tensor, conv_args: ConvArgs = None
) -> None:
    """``out[g] += sum over rows n with group_ids[n] == g of dW_n``, in place.

    Args:
        out: ``[G, *W.shape]`` running sums (float32 or float64).
        x, grad_out: linear: rows ``[N, D]`` and ``[N, C]``; conv: samples ``[N, Cin, *spatial]``
            and ``[N, Cout, *out_spatial]`` (explicit numeric padding in ``conv_args``).
        group_ids: ``[N]`` int64 in ``[0, G)``.
        conv_args: ``(stride, padding, dilation, groups)`` for a convolution, else None.
    """
    if x.shape[0] == 0:
        return
    num_groups = out.shape[0]
    order = torch.argsort(group_ids, stable=True)
    counts = torch.bincount(group_ids, minlength=num_groups).tolist()
    whole = max(counts) == x.shape[0]  # one group holds every row: no gather
    xs = x if whole else x.index_select(0, order)
    gs = grad_out if whole else grad_out.index_select(0, order)
    start = 0
    for g, count in enumerate(counts):
        if count == 0:
            continue
        _add_rows(out[g], xs.narrow(0, start, count), gs.narrow(0, start, count), conv_args)
        start += count


def accumulate_group_grad_reference(
    out: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, group_ids: torch.Tensor, conv_args: ConvArgs = None
) -> None:
    """Plain-torch definition of :func:`accumulate_group_grad`: every per-sample gradient, summed by group."""
    per_sample = torch.stack([
        _weight_grad(x[n:n + 1], grad_out[n:n + 1], out.shape[1:], conv_args) for n in range(x.shape[0])
    ]) if x.shape[0] else x.new_zeros((0,) + tuple(out.shape[1:]))
    out.index_add_(0, group_ids, per_sample.to(out.dtype))


class DeferredGroupGrad:
    """Per-group weight-gradient sums ``out [G, *W.shape]`` whose batches are added lazily.

    :meth:`stage` copies a batch's rows into a per-group workspace (no reference to the
    caller's tensors is kept, so later in-place changes to them cannot leak in);
    :meth:`commit` makes the staged rows part of the sums and :meth:`rollback` forgets them
    (a batch that failed); :meth:`flush` adds every committed row into ``out``, which is exact
    only after a flush. ``workspace_bytes`` bounds the workspace (it grows to one batch when a
    single batch is larger); 0 keeps no workspace: a commit adds the batch straight away.

    Example::

        >>> import torch
        >>> out = torch.zeros(2, 3, 4)                      # [G, C, D]: a Linear(4, 3), 2 groups
        >>> sums = DeferredGroupGrad(out, None, workspace_bytes=1 << 20)
        >>> x, g, ids = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> sums.stage(x, g, ids); sums.commit()
        >>> float(out.abs().sum()), sums.pending_rows      # nothing added yet
        (0.0, 5)
        >>> torch.allclose(sums.flushed()[1], g[ids == 1].t() @ x[ids == 1])
        True
    """

    def __init__(self, out: torch.Tensor, conv_args: ConvArgs, workspace_bytes: int):
        self.out = out
        self.conv_args = conv_args
        self.workspace_bytes = int(workspace_bytes)
        self._x: Optional[torch.Tensor] = None  # [G, capacity, *row] per-group input rows
        self._g: Optional[torch.Tensor] = None  # [G, capacity, *row] per-group output-gradient rows
        self._filled: List[int] = [0] * out.shape[0]  # committed rows per group
        self._staged: List[int] = [0] * out.shape[0]  # rows after them, from the open batch

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the workspace (0 before the first batch)."""
        if self._x is None:
            return 0
        return self._x.numel() * self._x.element_size() + self._g.numel() * self._g.element_size()

    @property
    def pending_rows(self) -> int:
        """Committed rows not yet added into ``out``."""
        return sum(self._filled)

    def _ensure_capacity(self, x: torch.Tensor, grad_out: torch.Tensor, counts: List[int]) -> None:
        same_rows = (
            self._x is not None and self._x.shape[2:] == x.shape[1:] and self._g.shape[2:] == grad_out.shape[1:]
            and self._x.dtype == x.dtype and self._x.device == x.device
        )
        if same_rows and all(f + s + c <= self._x.shape[1] for f, s, c in zip(self._filled, self._staged, counts)):
            return
        self.flush()  # committed rows go into out; staged ones move to the front
        if same_rows and all(s + c <= self._x.shape[1] for s, c in zip(self._staged, counts)):
            return
        if any(self._staged) and not same_rows:
            raise RuntimeError("DeferredGroupGrad: rows of one batch changed shape, dtype or device between stage calls")
        row_bytes = (x[0].numel() + grad_out[0].numel()) * x.element_size()
        rows = max(s + c for s, c in zip(self._staged, counts))
        capacity = max(rows, self.workspace_bytes // max(1, row_bytes * self.out.shape[0]))
        new_x = x.new_empty((self.out.shape[0], capacity) + tuple(x.shape[1:]))
        new_g = grad_out.new_empty((self.out.shape[0], capacity) + tuple(grad_out.shape[1:]))
        for g, staged in enumerate(self._staged):
            if staged:
                new_x[g, :staged] = self._x[g, :staged]
                new_g[g, :staged] = self._g[g, :staged]
        self._x, self._g = new_x, new_g

    def stage(self, x: torch.Tensor, grad_out: torch.Tensor, group_ids: torch.Tensor, scale: float = 1.0) -> None:
        """Copy ``scale * dW``'s rows ``x``/``grad_out`` (see :func:`accumulate_group_grad`) under ``group_ids``."""
        if x.shape[0] == 0:
            return
        counts = torch.bincount(group_ids, minlength=self.out.shape[0]).tolist()
        self._ensure_capacity(x, grad_out, counts)
        order = torch.argsort(group_ids, stable=True)
        start = 0
        for g, count in enumerate(counts):
            if count == 0:
                continue
            rows = order.narrow(0, start, count)
            start += count
            at = self._filled[g] + self._staged[g]
            torch.index_select(x, 0, rows, out=self._x[g, at:at + count])
            dst = self._g[g, at:at + count]
            torch.index_select(grad_out, 0, rows, out=dst)
            if scale != 1.0:
                dst.mul_(scale)
            self._staged[g] += count

    def commit(self) -> None:
        """The staged rows belong to the sums from now on."""
        self._filled = [f + s for f, s in zip(self._filled, self._staged)]
        self._staged = [0] * self.out.shape[0]
        if self.workspace_bytes <= 0:
            self.flush()

    def rollback(self) -> None:
        """Forget the staged rows (the batch they came from failed)."""
        self._staged = [0] * self.out.shape[0]

    def flush(self) -> None:
        """Add every committed row into ``out``; staged rows stay staged (moved to the front)."""
        if self._x is None or not any(self._filled):
            return
        for g, (filled, staged) in enumerate(zip(self._filled, self._staged)):
            if filled:
                _add_rows(self.out[g], self._x[g, :filled], self._g[g, :filled], self.conv_args)
            if filled and staged:
                self._x[g, :staged] = self._x[g, filled:filled + staged].clone()
                self._g[g, :staged] = self._g[g, filled:filled + staged].clone()
        self._filled = [0] * self.out.shape[0]

    def flushed(self) -> torch.Tensor:
        """``out`` with every committed row added."""
        self.flush()
        return self.out
