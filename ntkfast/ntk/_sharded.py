"""The empirical NTK split by rows of x1 over the processes of a group (see ntkfast.distributed)."""
from __future__ import annotations


from ..distributed import Shard, split_sizes
from ._empirical import _check_inputs, empirical_ntk_impl


def sharded_ntk(shard: Shard, model, x1, x2, *, masks, mode, params, memory_budget, create_graph, explain,
                gather: bool):
    """Rank r computes the rows ``shard.block(len(x1))`` of x1 against every column (for the
    diagonal modes its rows of both), then every rank receives all blocks (``gather``) or keeps its own."""
    _check_inputs(x1, x2, mode)
    if create_graph and gather:
        raise ValueError("create_graph: a kernel gathered across processes cannot be differentiated; pass "
                         "gather=False to differentiate this process's block of rows")
    n1 = x1.shape[0]
    rows = shard.block(n1)
    diagonal = mode.startswith("diagonal")

    def local():
        # a process without rows still needs the block's shape (for the gather): from one row
        r = slice(rows.start, rows.stop) if len(rows) else slice(0, 1)
        a = x1[r]
        b = (x2[r] if x2 is not None else None) if diagonal else (x2 if x2 is not None else x1)
        res = empirical_ntk_impl(model, a, b, masks=masks, mode=mode, params=params, memory_budget=memory_budget,
                                 create_graph=create_graph, explain=explain)
        out, report = res if explain else (res, None)
        return (out if len(rows) else out[:0]), report

    block, report = shard.run(local)
    if gather:
        block = shard.gather_rows(block.contiguous(), split_sizes(n1, shard.size))
    return (block, report) if explain else block
