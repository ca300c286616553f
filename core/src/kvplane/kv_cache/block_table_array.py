"""Every request's block table as one row of a host array, kept in step with the lists.

A step's block tables are then one gather of rows (``array[rows, :num_cols]``) instead
of a copy of every request's list into a fresh array: a decode step at batch 256 with
1,024-token contexts copies 256 tables of 64 or more blocks each, and only a request
that crossed into a new block changed since the last step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kvplane.kv_cache.block_pool import check_invariant


class BlockTableArray:
    """Rows of block ids, one per request that holds blocks, zero past each table's end.

    The block manager writes the part of a table it changed (:meth:`write`) and frees the
    row with the table (:meth:`release`); the array grows (rows and columns) as needed,
    so a reference to :attr:`array` is valid until the next write.
    """

    def __init__(self, num_rows: int = 64, num_cols: int = 32) -> None:
        self.array = np.zeros((num_rows, num_cols), dtype=np.int32)  # [rows, cols]
        self._row_of: dict[str, int] = {}
        self._length_of_row: list[int] = [0] * num_rows  # blocks in each row's table
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: row 0 first

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._row_of

    def row_of(self, request_id: str) -> int:
        """The request's row; KeyError when it holds no blocks."""
        return self._row_of[request_id]

    def write(self, request_id: str, start: int, block_ids: Sequence[int]) -> None:
        """Set the request's table from index ``start`` on to ``block_ids`` (its new end);
        a request without a row gets one (``start`` must then be 0)."""
        row = self._row_of.get(request_id)
        if row is None:
            row = self._row_of[request_id] = self._take_row()
        end = start + len(block_ids)
        if end > self.array.shape[1]:
            self._grow(self.array.shape[0], max(end, 2 * self.array.shape[1]))
        self.array[row, start:end] = block_ids
        previous_end = self._length_of_row[row]
        if end < previous_end:
            self.array[row, end:previous_end] = 0
        self._length_of_row[row] = end

    def release(self, request_id: str) -> None:
        """Zero and free the request's row (nothing when it has none)."""
        row = self._row_of.pop(request_id, None)
        if row is None:
            return
        self.array[row, : self._length_of_row[row]] = 0
        self._length_of_row[row] = 0
        self._free_rows.append(row)

    def check_invariants(self, tables: Mapping[str, Sequence[int]]) -> None:
        """Raise AssertionError unless the rows are exactly ``tables``, zero-padded."""
        check_invariant(set(self._row_of) == set(tables), "rows and tables name other requests")
        for request_id, table in tables.items():
            row = self.array[self._row_of[request_id]]
            check_invariant(
                row[: len(table)].tolist() == list(table) and not row[len(table) :].any(),
                f"the row of {request_id!r} is not its table",
            )

    def _take_row(self) -> int:
        if not self._free_rows:
            num_rows = self.array.shape[0]
            self._grow(2 * num_rows, self.array.shape[1])
            self._free_rows = list(range(2 * num_rows - 1, num_rows - 1, -1))
            self._length_of_row += [0] * num_rows
        return self._free_rows.pop()

    def _grow(self, num_rows: int, num_cols: int) -> None:
        grown = np.zeros((num_rows, num_cols), dtype=np.int32)
        old_rows, old_cols = self.array.shape
        grown[:old_rows, :old_cols] = self.array
        self.array = grown
