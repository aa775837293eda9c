"""images (uint8, N x 28 x 28) -> embeddings (float32, N x D), in batches under inference mode."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from retrieval.towers import Tower


def images_to_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)


@torch.inference_mode()
def embed_images(
    tower: Tower,
    images: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """Embed uint8 images with `tower` (kept in eval mode); returns a float32 numpy array (N, D)."""
    device = torch.device(device) if device is not None else next(tower.parameters()).device
    was_training = tower.training
    tower.eval()
    out = np.empty((len(images), tower.embedding_size), dtype=np.float32)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(images), batch_size):
            batch = images_to_input(images[start : start + batch_size], device)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    emb = tower(batch.contiguous(memory_format=torch.channels_last))
            else:
                emb = tower(batch)
            out[start : start + len(batch)] = emb.float().cpu().numpy()
            bar.update(len(batch))
    finally:
        bar.close()
        tower.train(was_training)
    return out
