"""Sums whose bits do not depend on the number of ranks (reproducible mode, validation, the
standardization statistics).

A floating-point sum depends on the order of its additions, and an allreduce adds the ranks'
partial sums in an order the MPI library picks for the rank count. Here a sum is cut into `parts`
numbered parts (micro-batches of a global batch, validation batches, blocks of rows), each the
same computation whichever rank does it, and the parts are always added along ONE binary tree
over their indices: node [lo, hi) is the sum of node [lo, mid) and node [mid, hi), mid =
(lo + hi) // 2, a leaf is one part. Rank r computes the contiguous parts
shard_bounds(parts, r, size), as the sums of the largest tree nodes inside its run (at most two
per tree level). Then, for each rank's slice of the vector (shard_bounds(n, q, size) elements),
its owner receives every rank's node sums of that slice (one Alltoallv), finishes the tree over
them, and one Allgatherv gives every rank the whole sum. The tree and every addition in it are the
same on any number of ranks, so are the bits; x + y = y + x in IEEE arithmetic, so who adds a pair
does not matter. The traffic is that of a ring allreduce: each rank sends and receives about
(size − 1)/size of the vector in each of the two collectives (more when a rank's run is not one
tree node: when size does not divide parts into powers of two).

Two ranks holding one node each (any even number of parts) skip the collectives: their total is
ONE addition per element, node [0, mid) + node [mid, parts). They swap their nodes (one
Sendrecv each way: a ring allreduce's bytes, one message instead of two collectives) and each
computes that addition itself, left node first as the tree does, so even a NaN's payload has
the same bits on both (an MPI allreduce adds in an order, and with arithmetic, of its own).

    total = np.empty(n)
    OrderedSum(comm, n, parts, dtype).reduce(lambda m, out: ..., total)  # out = part m's sum
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from distbp.data.plan import shard_bounds

__all__ = ["OrderedSum", "tree_cover"]

Node = tuple[int, int]


def _mid(lo: int, hi: int) -> int:
    return (lo + hi) // 2


def tree_cover(parts: int, a: int, b: int) -> list[Node]:
    """The largest nodes of the tree over [0, parts) that lie in [a, b), left to right: their
    leaves are exactly parts a..b-1."""
    found: list[Node] = []

    def visit(lo: int, hi: int) -> None:
        if b <= lo or hi <= a:
            return
        if a <= lo and hi <= b:
            found.append((lo, hi))
            return
        visit(lo, _mid(lo, hi))
        visit(_mid(lo, hi), hi)

    if a < b:
        visit(0, parts)
    return found


class OrderedSum:
    """The sum over parts 0..parts-1 of n-element vectors, with the same bits on any number of
    ranks. Buffers are made once; `reduce` allocates no arrays."""

    def __init__(self, comm, n: int, parts: int, dtype):
        if parts < 1 or n < 0:
            raise ValueError(f"need parts >= 1 and n >= 0, got {parts}, {n}")
        self.comm, self.n, self.parts, self.dtype = comm, n, parts, np.dtype(dtype)
        p, r = comm.size, comm.rank
        self.first, self.stop = shard_bounds(parts, r, p)  # the parts this rank computes
        covers = [tree_cover(parts, *shard_bounds(parts, q, p)) for q in range(p)]
        self.nodes = covers[r]
        # two ranks, one node each: the total is their one addition, after one swap
        self.pair = p == 2 and all(len(c) == 1 for c in covers)
        self.slices = [shard_bounds(n, q, p) for q in range(p)]  # owner q sums elements lo..hi
        lo, hi = self.slices[r]
        # what this rank sends, owner by owner: its node sums' slices q; and what it receives
        self.send_counts = [len(self.nodes) * (b - a) for a, b in self.slices]
        self.recv_counts = [len(c) * (hi - lo) for c in covers]
        alone = p == 1 or self.pair  # no exchange buffers: the node is summed into `out`
        self._other = np.empty(n if self.pair else 0, self.dtype)  # the peer's node
        self.send = np.empty(0 if alone else sum(self.send_counts), self.dtype)
        self.recv = np.empty(0 if alone else sum(self.recv_counts), self.dtype)
        self.received: dict[Node, np.ndarray] = {}
        at = 0
        for cover in covers:
            for node in cover:
                self.received[node] = self.recv[at:at + hi - lo]
                at += hi - lo
        self._runs = np.cumsum([0, *self.send_counts[:-1]]).tolist()  # owner q's run starts
        self.own = np.empty(hi - lo, self.dtype)  # this rank's slice of the total
        self._tmp: dict[int, np.ndarray] = {}       # right children's sums, by depth (made once)
        self._slice_tmp: dict[int, np.ndarray] = {}
        self._node = np.empty(n, self.dtype) if len(self.nodes) > 1 else None
        self.compute_s = 0.0  # the last reduce's seconds in `leaf` and the local additions

    def reduce(self, leaf: Callable[[int, np.ndarray], None], out: np.ndarray) -> None:
        """out (n,) = the sum of every part, on every rank; leaf(m, buf) writes part m's sum into
        buf (n,), overwriting it, for this rank's parts first..stop-1, in increasing order."""
        self.compute(leaf, out)
        self.exchange(out)

    def compute(self, leaf: Callable[[int, np.ndarray], None], out: np.ndarray) -> None:
        """reduce's first half, no collective in it (a caller may check that every rank got
        through it before the exchange): this rank's node sums; on one rank, the total in out
        (two ranks of one node each: the rank's node in out)."""
        t0 = time.perf_counter()
        if self.comm.size == 1:
            self._node_sum(0, self.parts, leaf, out, 0)
        elif self.pair:
            self._node_sum(*self.nodes[0], leaf, out, 0)
        elif len(self.nodes) == 1:  # one node: its sum, owner by owner, IS the send buffer
            self._node_sum(*self.nodes[0], leaf, self.send, 0)
        else:
            for i, node in enumerate(self.nodes):
                self._node_sum(*node, leaf, self._node, 0)
                for (a, b), run in zip(self.slices, self._runs):  # owner q's run: node i's
                    self.send[run + i * (b - a):run + (i + 1) * (b - a)] = self._node[a:b]
        self.compute_s = time.perf_counter() - t0

    def exchange(self, out: np.ndarray) -> None:
        """reduce's second half, on every rank: out (n,) = the sum of every part."""
        if self.comm.size == 1:
            return
        if self.pair:  # out holds this rank's node: left + right, in the tree's order
            self.comm.swap(out, self._other, 1 - self.comm.rank)
            if self.comm.rank == 0:
                out += self._other
            else:
                np.add(self._other, out, out=out)
            return
        self.comm.alltoallv(self.send, self.send_counts, self.recv, self.recv_counts)
        np.copyto(self.own, self._slice_total(0, self.parts, 0))
        self.comm.gather(self.own, out, [b - a for a, b in self.slices], root=None)

    def _node_sum(self, lo: int, hi: int, leaf, buf: np.ndarray, depth: int) -> None:
        """buf = the sum of parts lo..hi-1 along the tree (this rank computes them all)."""
        if hi - lo == 1:
            leaf(lo, buf)
            return
        mid = _mid(lo, hi)
        self._node_sum(lo, mid, leaf, buf, depth + 1)
        right = _scratch(self._tmp, depth, self.n, self.dtype)
        self._node_sum(mid, hi, leaf, right, depth + 1)
        buf += right

    def _slice_total(self, lo: int, hi: int, depth: int) -> np.ndarray:
        """This rank's slice of node [lo, hi)'s sum, from the received node sums."""
        got = self.received.get((lo, hi))
        if got is not None:
            return got
        mid = _mid(lo, hi)
        out = _scratch(self._slice_tmp, depth, self.own.size, self.dtype)
        np.copyto(out, self._slice_total(lo, mid, depth + 1))  # before the right side reuses
        out += self._slice_total(mid, hi, depth + 1)             # the deeper buffers
        return out


def _scratch(buffers: dict[int, np.ndarray], depth: int, n: int, dtype) -> np.ndarray:
    """The buffer of tree depth `depth`, made at its first use."""
    buf = buffers.get(depth)
    if buf is None:
        buf = buffers[depth] = np.empty(n, dtype)
    return buf
