"""Every end-to-end operation once, over paths and plain options, returning a result object.

The CLI commands parse their options, build the images' Selection (retrieval.data.selection) and the Compute
(retrieval.compute) once, and call one of these; `quickstart` is a sequence of them; the HTTP service and the
torchrun entry point call the same functions. Messages go to the modules' loggers (the CLI shows them on stderr);
errors are RetrievalError / UsageError naming the argument, never a CLI flag. One module per kind of operation:
indexing, querying, evaluation, training, export, quickstart.

    build_index     checkpoint + dataset specs -> an index folder
    add_to_index    more dataset specs -> appended to an index folder with the index's own tower
    query           image files, folders, dataset items -> neighbours and predicted labels (+ a PNG grid)
    evaluate        a query spec against an index folder -> retrieval metrics (+ a report folder)
    evaluate_pairs  a checkpoint on balanced same/different pairs -> verification accuracy, ROC AUC
    calibrate       a query spec against an index folder -> the "unknown" distance threshold, stored
    tune_index      a query spec against an index folder -> the fastest search parameters reaching a recall, stored
    fewshot         a checkpoint (or raw pixels) on N-way K-shot episodes -> accuracy with confidence intervals
    export          a checkpoint -> its tower as an ONNX or TorchScript inference graph with a JSON sidecar
    train           a config -> a run folder (retrieval.training.train)
    quickstart      fetch, train, index, evaluate, few-shot, query: the whole chain into one folder
"""

from retrieval.compute import Compute
from retrieval.data.selection import Selection, merge_datasets
from retrieval.workflows.evaluation import (
    PIXELS, Evaluation, FewShotRun, PairEvaluation, calibrate, evaluate, evaluate_pairs, fewshot,
)
from retrieval.workflows.export import Export, export
from retrieval.workflows.indexing import (
    BuildRequest, Tuning, add_to_index, append_embeddings, build_index, default_index_name, tune_index,
)
from retrieval.workflows.querying import IndexQueries, QueryAnswers, index_search, load_index_queries, query
from retrieval.workflows.quickstart import QuickstartResult, quickstart
from retrieval.workflows.training import (
    resolve_config_path, run_summary, shipped_config, shipped_configs, train, train_digit_gate,
)

__all__ = [
    "Compute", "Selection", "merge_datasets", "PIXELS", "Evaluation", "FewShotRun", "PairEvaluation", "calibrate",
    "evaluate", "evaluate_pairs", "fewshot", "Export", "export", "BuildRequest", "Tuning", "add_to_index",
    "append_embeddings", "build_index", "default_index_name", "tune_index", "IndexQueries", "QueryAnswers",
    "index_search", "load_index_queries", "query", "QuickstartResult", "quickstart", "resolve_config_path",
    "run_summary", "shipped_config", "shipped_configs", "train", "train_digit_gate",
]
