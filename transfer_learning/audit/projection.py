"""The map: every image's features projected to 2-D, PCA by default (the audit's own principal components), UMAP when
`audit.map: umap` asks for it (umap-learn is not a dependency: asked for without it, the stage stops and says
so)."""
from __future__ import annotations

from typing import Literal

import numpy as np

from transfer_learning.common.errors import UserError

MapKind = Literal["pca", "umap"]


def project(unit_features: np.ndarray, components: np.ndarray, kind: MapKind, seed: int) -> np.ndarray:
    """(n, 2): the first two principal `components` (pca), or UMAP of the unit-length features (umap)."""
    if kind == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("audit.map: umap needs the umap-learn package (pip install umap-learn); "
                            "valid without it: pca") from None
        return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(unit_features)
    return np.pad(components[:, :2], ((0, 0), (0, max(0, 2 - components.shape[1]))))
