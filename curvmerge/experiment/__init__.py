"""Experiments: a model pool, a task pool and methods in; tables, plots and models out.

One runner serves the demo, ``curvmerge compare`` and ``curvmerge run``:

.. code-block:: python

    from curvmerge.experiment import Experiment, ModelPool, TaskData

    pool = ModelPool([model_a, model_b], base=base)            # own heads, shared body
    tasks = [TaskData("a", train=..., val=..., test=...), TaskData("b", ...)]
    result = Experiment(pool, tasks, ["average", "fisher_diagonal"],
                        output_dir="results").run()
    result.table("macro_f1"), result.choices, result.costs

or from a configuration (schema: :mod:`curvmerge.experiment.schema`):

.. code-block:: python

    result = load_config("experiment.yaml").run()

Every statistic is computed once (:class:`StatisticsStore`; diagonal Fishers can be kept as
Fisher files and reused by a rerun), coefficients are chosen on the validation splits from the
grids of the method registry (:meth:`curvmerge.merging.MethodSpec.grid_points`), the test
splits are evaluated once per row, and the tables show accuracy and macro-F1 per task (MSE
for regression), with a majority-class reference row; a merge that predicts one class for
nearly every input gets a :class:`OneClassWarning`.
"""

from curvmerge.experiment.config import Experiment, load_config
from curvmerge.experiment.evaluation import Evaluator, majority_metrics, selection_score
from curvmerge.experiment.outputs import (
    MERGED_WRITERS,
    format_report,
    output_paths,
    register_merged_writer,
    result_json,
    write_results,
)
from curvmerge.experiment.pools import (
    ModelPool,
    TaskData,
    first_examples,
    fisher_batches,
    shared_parameters,
)
from curvmerge.experiment.runner import run_experiment
from curvmerge.experiment.schema import validate_config
from curvmerge.experiment.sources import (
    FILES_OPTIONS,
    MODEL_SOURCES,
    TASK_SOURCES,
    LoadedModel,
    build_model,
    bundled_task,
    files_task,
    register_model_source,
    register_task_source,
)
from curvmerge.experiment.spec import (
    DEFAULT_METHODS,
    REFERENCE_ROW,
    ExperimentResult,
    MethodRun,
    Settings,
)
from curvmerge.experiment.statistics import StatisticsStore, statistics_key
from curvmerge.train import OneClassWarning

__all__ = [
    # running
    "Experiment",
    "ExperimentResult",
    "MethodRun",
    "Settings",
    "run_experiment",
    "DEFAULT_METHODS",
    "REFERENCE_ROW",
    # pools
    "ModelPool",
    "TaskData",
    "fisher_batches",
    "first_examples",
    "shared_parameters",
    # statistics and evaluation
    "StatisticsStore",
    "statistics_key",
    "Evaluator",
    "majority_metrics",
    "selection_score",
    "OneClassWarning",
    # configuration and sources
    "load_config",
    "validate_config",
    "LoadedModel",
    "MODEL_SOURCES",
    "TASK_SOURCES",
    "register_model_source",
    "register_task_source",
    "build_model",
    "bundled_task",
    "files_task",
    "FILES_OPTIONS",
    # outputs
    "write_results",
    "format_report",
    "result_json",
    "output_paths",
    "MERGED_WRITERS",
    "register_merged_writer",
]
