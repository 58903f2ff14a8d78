"""Metrics: detectors (uint8 images -> features), streaming statistics, FID.

The building blocks are shared by later metrics (KID, precision/recall): a :class:`Detector`,
:func:`open_images` / :func:`iter_features` for inputs, :class:`StreamingStats` for statistics.
"""

from scmctl.metrics.detectors import (INCEPTION_FILE, INCEPTION_MODES, INCEPTION_URL, Detector,
                                      InceptionDetector, TorchScriptDetector, find_inception_weights,
                                      load_detector, resolve_device)
from scmctl.metrics.fid import (MIN_SAMPLES, ImageSource, Reference, StreamingStats, compute_stats,
                                extract_stats, frechet_distance, iter_features, load_reference,
                                open_images, open_reference)

__all__ = [
    "INCEPTION_FILE", "INCEPTION_MODES", "INCEPTION_URL", "MIN_SAMPLES", "Detector", "ImageSource",
    "InceptionDetector", "Reference", "StreamingStats", "TorchScriptDetector", "compute_stats",
    "extract_stats", "find_inception_weights", "frechet_distance", "iter_features", "load_detector",
    "load_reference", "open_images", "open_reference", "resolve_device",
]
