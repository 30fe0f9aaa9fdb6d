"""One-dimensional launch grids for kernels over (rows, blocks of a row). CUDA caps grid
dimensions 1 and 2 at 65535 programs (dimension 0 at 2^31 - 1), and Triton's launcher does not
check: a (rows, blocks) grid with more than 65535 blocks of a row (a 4096 x 4096 plane in blocks
of 256) would fail on a GPU, while the interpreter has no such limit."""
from __future__ import annotations

import triton
import triton.language as tl


def grid(rows: int, n: int, block: int) -> tuple[int]:
    """The grid of ``rows`` rows of ``n`` elements in blocks of ``block``: one dimension."""
    return (rows * triton.cdiv(n, block),)


@triton.jit
def row_and_offsets(N, BLOCK: tl.constexpr):
    """This program's row and the element offsets of its block within the row."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK)
    return pid // blocks, (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
