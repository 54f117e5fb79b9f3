"""Nearest neighbours by cosine similarity, exact, in row blocks: the similarity matrix of 70,000 images would not
fit in memory, one block of it does."""
from __future__ import annotations

import numpy as np

BLOCK_ROWS = 1024  # query rows per matrix product: 1,024 x 70,000 float32 similarities are 290 MB


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32), so that a dot product is a cosine similarity; a zero row stays zero."""
    rows = np.asarray(features, np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1)


def nearest(queries: np.ndarray, database: np.ndarray, same: np.ndarray,
            wanted: list[tuple[int, np.ndarray | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (k, columns) of `wanted`: (indices into database, cosine similarities), each (len(queries), k'),
    most similar first, among the database rows `columns` allows (all when None); k' = k, or fewer when fewer rows
    are allowed. Rows are unit rows; `same[i]` is the database index of query i itself (or -1): never its own
    neighbour. One matrix product per block of queries serves every (k, columns)."""
    sizes = [min(k, int(len(database) if columns is None else columns.sum()) - 1) for k, columns in wanted]
    found = [(np.empty((len(queries), k), np.int64), np.empty((len(queries), k), np.float32)) for k in sizes]
    for start in range(0, len(queries), BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, len(queries))
        block = queries[start:stop] @ database.T
        itself = np.flatnonzero(same[start:stop] >= 0)
        block[itself, same[start:stop][itself]] = -np.inf
        for k, (_, columns), (indices, similarities) in zip(sizes, wanted, found):
            if k <= 0:
                continue
            allowed = block if columns is None else np.where(columns, block, -np.inf)
            top = np.argpartition(-allowed, k - 1, axis=1)[:, :k]
            values = np.take_along_axis(allowed, top, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            indices[start:stop] = np.take_along_axis(top, order, axis=1)
            similarities[start:stop] = np.take_along_axis(values, order, axis=1)
    return found
