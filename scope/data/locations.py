"""Location semantics: k-means clusters of base stations' POI profiles (the ``E_pos`` labels).

A station's POI counts are normalised to proportions (stations without any POI keep a zero
vector and fall into whichever cluster is nearest the origin); k-means groups the profiles; each
cluster is named by the POI categories its centroid over-represents relative to the city.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans


@dataclass
class LocationClusters:
    labels: pd.Series         # BaseID -> cluster id (int16)
    centroids: np.ndarray     # [k, n_poi] mean POI proportions
    names: list[str]          # a short readable name per cluster
    poi_categories: list[str]

    def of(self, location_ids) -> np.ndarray:
        """Cluster id of each location id (-1 for ids without a POI profile)."""
        return self.labels.reindex(np.asarray(location_ids)).fillna(-1).to_numpy(np.int16)

    def to_dict(self) -> dict:
        return {"names": self.names, "poi_categories": self.poi_categories,
                "centroids": np.round(self.centroids, 5).tolist(),
                "sizes": self.labels.value_counts().sort_index().tolist()}


def poi_proportions(base_poi: pd.DataFrame) -> np.ndarray:
    counts = base_poi.to_numpy(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def cluster_locations(base_poi: pd.DataFrame, k: int = 6, seed: int = 0) -> LocationClusters:
    """Cluster every station of ``base_poi`` (index BaseID, one column per POI category)."""
    if len(base_poi) < k:
        raise ValueError(f"cannot make {k} location clusters from {len(base_poi)} base stations")
    profiles = poi_proportions(base_poi)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(profiles)
    # Order clusters by size (largest first) so labels are stable and readable.
    order = np.argsort(-np.bincount(km.labels_, minlength=k), kind="stable")
    relabel = np.empty(k, np.int64)
    relabel[order] = np.arange(k)
    centroids = km.cluster_centers_[order]
    city = profiles.mean(axis=0) + 1e-9
    names = []
    for centroid in centroids:
        lift = centroid / city
        top = [base_poi.columns[i] for i in np.argsort(-lift)[:2] if centroid[i] > 0.02]
        names.append(" / ".join(top) if top else "no POI")
    labels = pd.Series(relabel[km.labels_].astype(np.int16), index=base_poi.index, name="cluster")
    return LocationClusters(labels, centroids, names, list(base_poi.columns))
