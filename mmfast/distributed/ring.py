"""The ring: each rank's rows meet every rank's key block without any rank holding more than two
blocks, and without any B × N logits.

    row = ring_rows(q, k, scale, bias, sigmoid, key_rows, group, backend)

q: (N, D) this rank's rows; k: (M_r, D) this rank's keys; key_rows: every rank's key count. Forward:
the key blocks travel around the ring (rank r sends to r+1, receives from r−1), the transfer of
the next block overlapping the fused statistics of the current one (mmfast's contrastive_stats),
which merge across blocks: softmax rows by logaddexp, sigmoid rows by sum. Backward: the blocks
travel again, each with an fp32 accumulator of its gradient; every rank adds its rows'
contribution (contrastive_stats_backward with the merged statistics) and passes block and
accumulator on; after W hops each accumulator is back at its owner, holding Σ over ranks of
∂L_rank/∂k. ∂/∂q, the scale
and the bias get this rank's rows' terms only (open_clip's local_loss + gather_with_grad
gradients, which DDP then averages). Memory per rank: O((N + 2·max M_r)·D) whatever the world size.

Sigmoid rows: this rank's own block holds the positives (positives[i] indexes k), other blocks none.
Every rank must run the backward (as every rank of a DDP job does); a rank that skips it leaves
the others waiting until the group's timeout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.contrastive.op import contrastive_stats, contrastive_stats_backward


class Ring:
    """Neighbours of this rank in `group` and one exchange step: send right, receive from left."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.right = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.left = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def start(self, sends: list, recv_rows: int):
        """Starts sending each tensor of `sends` right and receiving one like it, of recv_rows rows,
        from the left (tag: its position) → (works, buffers): wait on the works before reading
        the buffers or freeing `sends`."""
        bufs = [t.new_empty((recv_rows, *t.shape[1:])) for t in sends]
        ops = [dist.P2POp(dist.isend, t, self.right, self.group, tag) for tag, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, b, self.left, self.group, tag) for tag, b in enumerate(bufs)]
        return dist.batch_isend_irecv(ops), bufs

    def shift(self, sends: list, recv_rows: int) -> list:
        works, bufs = self.start(sends, recv_rows)
        for w in works:
            w.wait()
        return bufs

    def blocks(self, k: Tensor, key_rows: list):
        """(owner, block) for each rank's key block in turn, starting with this rank's own; the
        next block's transfer runs while the caller computes on the current one."""
        block = k.contiguous()
        for hop in range(self.world):
            owner = (self.rank - hop) % self.world
            pending = self.start([block], key_rows[(owner - 1) % self.world]) if hop < self.world - 1 else None
            yield owner, block
            if pending is not None:
                for w in pending[0]:
                    w.wait()
                block = pending[1][0]


class _RingRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias, positives, sigmoid, key_rows, group, backend):
        ring = Ring(group)
        row = None
        for owner, block in ring.blocks(k.detach(), key_rows):
            r, _ = contrastive_stats(q.detach(), block, scale.detach(), None if bias is None else bias.detach(),
                                     _positives(positives, owner == ring.rank, sigmoid), sigmoid, False, backend)
            row = r if row is None else (row + r if sigmoid else torch.logaddexp(row, r))
        ctx.save_for_backward(q, k, scale, bias, positives, row)
        ctx.sigmoid, ctx.key_rows, ctx.group, ctx.backend = sigmoid, key_rows, group, backend
        return row

    @staticmethod
    def backward(ctx, grad_row):
        q, k, scale, bias, positives, row = ctx.saved_tensors
        ring, sigmoid, key_rows = Ring(ctx.group), ctx.sigmoid, ctx.key_rows
        none = row.new_empty(0)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dscale = torch.zeros((), dtype=torch.float32, device=q.device)
        dbias = torch.zeros((), dtype=torch.float32, device=q.device)
        block, acc = k.detach().contiguous(), None  # acc: the block's gradient, summed over the ranks it visited
        for hop in range(ring.world):
            owner = (ring.rank - hop) % ring.world
            da, db, ds, dbi = contrastive_stats_backward(
                q.detach(), block, scale.detach(), None if bias is None else bias.detach(),
                _positives(positives, owner == ring.rank, sigmoid), row, none, grad_row.contiguous(), none,
                sigmoid, True, True, ctx.backend)
            dq += da
            dscale += ds
            dbias += dbi
            acc = db.float() if acc is None else acc.add_(db)
            del da, db
            if ring.world == 1:
                break
            # The block and its accumulator go right together (one batch_isend_irecv), once this
            # rank's term is in: a prefetched next block would need a second block buffer from 3
            # ranks on, and the accumulator cannot move before its term is added anyway. After
            # the last hop only the accumulators move, each to its owner.
            rows = key_rows[(owner - 1) % ring.world]
            if hop < ring.world - 1:
                block, acc = ring.shift([block, acc], rows)
            else:
                (acc,) = ring.shift([acc], rows)
        return (dq.to(q.dtype), acc.to(k.dtype), dscale.reshape(scale.shape).to(scale.dtype),
                None if bias is None else dbias.reshape(bias.shape).to(bias.dtype), None, None, None, None, None)


def _positives(positives: Optional[Tensor], own: bool, sigmoid: bool) -> Optional[Tensor]:
    """Sigmoid rows: the positives index this rank's own block; in any other block, none (−1)."""
    if not sigmoid:
        return None
    return positives if own else torch.full_like(positives, -1)


def ring_rows(q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor], sigmoid: bool, key_rows: list, group,
              backend: str, positives: Optional[Tensor] = None) -> Tensor:
    """(N,) fp64 row statistics of q against every rank's keys (see the module docstring)."""
    return _RingRows.apply(q, k, scale, bias, positives, sigmoid, key_rows, group, backend)
