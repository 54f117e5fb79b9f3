"""The map: every image's features projected to 2-D, PCA by default (a second at most, deterministic), UMAP when
`audit.map: umap` asks for it (umap-learn is not a dependency: asked for without it, the stage stops and says
so)."""
from __future__ import annotations

from typing import Literal

import numpy as np

from transfer_learning.common.errors import UserError

MapKind = Literal["pca", "umap"]


def project(unit_features: np.ndarray, kind: MapKind, seed: int) -> np.ndarray:
    if kind == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("audit.map: umap needs the umap-learn package (pip install umap-learn); "
                            "valid without it: pca") from None
        return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(unit_features)
    from sklearn.decomposition import PCA

    if len(unit_features) < 2:
        return np.zeros((len(unit_features), 2))
    points = PCA(min(2, unit_features.shape[1]), random_state=seed).fit_transform(unit_features.astype(np.float64))
    return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
