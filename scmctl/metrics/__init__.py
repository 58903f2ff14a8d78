"""Metrics: detectors (uint8 images -> features), image sources, streaming statistics, references,
and the metrics themselves (FID / FD_DINOv2, KID, precision/recall).

- :mod:`~scmctl.metrics.detectors`: Inception (clean-fid), TorchScript, offline weight lookup;
  :mod:`~scmctl.metrics.dinov2`: DINOv2 ViT-L/14 written in torch.
- :mod:`~scmctl.metrics.fid`: image files, :class:`StreamingStats`, :func:`frechet_distance`.
- :mod:`~scmctl.metrics.sources`: datasets and on-the-fly generation, seed sets.
- :mod:`~scmctl.metrics.reference`: reading/writing reference statistics (npz, EDM2 pkl).
- :mod:`~scmctl.metrics.kid`, :mod:`~scmctl.metrics.prdc`: KID, precision/recall.
- :mod:`~scmctl.metrics.evaluate`: a metric over seed sets, as `scmctl eval` runs it.
"""

from scmctl.metrics.detectors import (DINOV2_FILE, DINOV2_URL, INCEPTION_FILE, INCEPTION_MODES, INCEPTION_URL,
                                      Detector, InceptionDetector, TorchScriptDetector, cache_dir,
                                      find_inception_weights, find_weights, load_detector, offline,
                                      sha256_file)
from scmctl.metrics.fid import (MIN_SAMPLES, ImageSource, StreamingStats, compute_stats, extract_features,
                                extract_stats, frechet_distance, iter_features, open_images)
from scmctl.metrics.kid import kernel_inception_distance, kid_subsets, polynomial_mmd2
from scmctl.metrics.prdc import knn_radii_sq, precision_recall
from scmctl.metrics.reference import (PendingReference, Reference, check_dims, load_reference,
                                      open_reference, read_pickled_arrays)

__all__ = [
    "DINOV2_FILE", "DINOV2_URL", "INCEPTION_FILE", "INCEPTION_MODES", "INCEPTION_URL", "MIN_SAMPLES",
    "Detector", "ImageSource", "InceptionDetector", "PendingReference", "Reference", "StreamingStats",
    "TorchScriptDetector", "cache_dir", "check_dims", "compute_stats", "extract_features", "extract_stats",
    "find_inception_weights", "find_weights", "frechet_distance", "iter_features", "kernel_inception_distance",
    "kid_subsets", "knn_radii_sq", "load_detector", "load_reference", "offline", "open_images",
    "open_reference", "polynomial_mmd2", "precision_recall", "read_pickled_arrays",
    "sha256_file",
]
