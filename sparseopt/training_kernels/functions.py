"""Autograd functions of masked Conv2d and Linear layers on the compiled sparse kernels.

Forward, input gradient and weight gradient each cost the active weights' share of the dense
multiply-adds (:mod:`sparseopt.native.grad`). The weight gradient is returned as a dense tensor
holding the masked dense gradient at the active positions and zeros elsewhere, so the optimizer,
gradient clipping, ``GradScaler``, DDP's all-reduce and the topology updaters see the tensor they see
in masked training. On the steps where a topology update needs the gradient at every position
(RigL's growth), ``dense_grad`` makes the weight gradient a dense pass of torch's kernel.
"""

from __future__ import annotations

import torch

from ..native import conv as native_conv
from ..native import grad as native_grad


class SparseConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tw: native_grad.TrainingWeight, geometry: tuple, dense_grad: bool):
        kernel, stride, padding = geometry
        x = x.contiguous()
        tw.refresh(weight)
        # the packed input is kept for the weight gradient (one pack less in the backward); not when no backward
        # will run (evaluation, no_grad), which would take a buffer no backward gives back
        packed = native_grad.packed_input(x, tw, kernel, stride, padding) if ctx.needs_input_grad[1] else None
        y = native_conv.conv2d(x, tw.forward, None if bias is None else bias.detach().contiguous(),
                               kernel, stride, padding, packed=packed)
        ctx.save_for_backward(x, weight)
        ctx.tw, ctx.geometry, ctx.dense_grad, ctx.has_bias, ctx.packed = tw, geometry, dense_grad, bias is not None, packed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        tw: native_grad.TrainingWeight = ctx.tw
        dy = dy.contiguous()
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_input:
            tw.refresh_transposed(weight)
        dx, dval = native_grad.conv2d_backward(x, dy, tw, kernel, stride, padding, ctx.packed, need_input,
                                               need_weight and not ctx.dense_grad)
        tw.release(ctx.packed)
        ctx.packed = None
        dw = db = None
        if need_weight:
            if ctx.dense_grad:
                dw = torch.ops.aten.convolution_backward(dy, x, weight, None, list(stride), list(padding), [1, 1], False,
                                                         [0, 0], 1, [False, True, False])[1]
            else:
                dw = tw.dense(dval)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None, None, None


class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tw: native_grad.TrainingWeight, dense_grad: bool):
        tw.refresh(weight)
        # the kernel writes (out, batch): made contiguous once here, since the BatchNorm1d, ReLU and
        # losses that follow a Linear run 10x slower on the transposed view (MLP at batch 128, measured)
        y = native_conv.linear(x, tw.forward, None if bias is None else bias.detach().contiguous()).contiguous()
        ctx.save_for_backward(x, weight)
        ctx.tw, ctx.dense_grad, ctx.has_bias = tw, dense_grad, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        tw: native_grad.TrainingWeight = ctx.tw
        rows, grads = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            if ctx.dense_grad:
                dw = grads.t() @ rows
            else:
                dw = tw.dense(native_grad.linear_weight_grad(rows.contiguous(), grads, tw))
        if ctx.needs_input_grad[0]:
            tw.refresh_transposed(weight)
            dx = native_grad.linear_input_grad(grads, tw).contiguous().reshape(x.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grads.sum(0)
        return dx, dw, db, None, None
