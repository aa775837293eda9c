"""Faiss on a GPU, when a GPU build of Faiss is installed (the optional extra `gpu`, faiss-gpu-cu12, in place of
faiss-cpu; README "Scaling out"). CPU Faiss stays the default: an index is searched on a GPU only when the command
runs on CUDA (`--device cuda`, or auto on a CUDA machine) and Faiss was built with GPU support. Index types Faiss
has no GPU version of (HNSW, refine stages, on-disk inverted lists) stay on the CPU, with a note in the log.
"""

from __future__ import annotations

import functools
import logging

import faiss
import torch

logger = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs the installed Faiss can use (0 with faiss-cpu, which has no get_num_gpus)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@functools.lru_cache(maxsize=None)
def _resources(device_index: int):
    # one StandardGpuResources per GPU and process: it owns the temporary memory and the CUDA streams
    return faiss.StandardGpuResources()


def to_search_device(index: faiss.Index, device: torch.device | str) -> faiss.Index | None:
    """A GPU copy of `index` for searching on `device`, or None when the search stays on the CPU (a CPU device,
    faiss-cpu, or an index type without a GPU version). The copy's vectors are those of `index` at this moment."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if gpu_count() == 0:
        logger.info("Faiss searches on the CPU: the installed Faiss has no GPU support "
                    "(pip install faiss-gpu-cu12 in place of faiss-cpu; README \"Scaling out\")")
        return None
    number = device.index if device.index is not None else torch.cuda.current_device()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False  # the same distances as on the CPU
    try:
        return faiss.index_cpu_to_gpu(_resources(number), number, index, options)
    except RuntimeError as e:  # no GPU version of this index type
        logger.info(f"Faiss searches on the CPU: {type(index).__name__} has no GPU version "
                    f"({str(e).strip().splitlines()[-1][:120]})")
        return None
