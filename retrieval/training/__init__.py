"""Training a Siamese tower: a PML-style composition of tower, objective (loss + miner, or pair head), batches
(sampler, device-side augmentation), an optimizer and a learning-rate schedule, with per-epoch validation and a
run folder (retrieval.run_folder: config.json, metrics.jsonl, best/last checkpoints, the training state, card.md;
everything written to a temp name and renamed).

    run      train(config, out_dir, ...): the options as one TrainRequest; the run folder checked and locked
    setup    build_trainer(cfg, ...): data, validation slice, seeded tower and objective, sampler, augmentation,
             optimizer and schedule -> a Trainer
    loop     Trainer: epochs of steps, validation, checkpoints and metrics after each epoch, Ctrl-C
    step     TrainStep: the one place a step computes its loss; EpochTotals
    batches  Batches: each step's batch (positions, scaling, class expansions, augmentation)
    state    save_state / load_state: what a resume continues from (weights, optimizer, scheduler, position, and
             one "sessions" entry per run of the loop: where it started, steps run, device, threads, precision)
    control  CPU threads, Ctrl-C (TrainingInterrupted), the words for a lost process

Precision (train.precision, retrieval.precision): the tower's forward pass in fp32 or under bf16 autocast; the
objective (loss, miner, distances, a pair head), the gradients the optimizer sees and its state stay fp32. The
checkpoints' sidecars and every session in state.json say which precision trained them.

Reproducibility: every random choice of epoch e, step s is drawn from a generator seeded with (seed, e, s)
(retrieval.seeding), so the training state is just weights + optimizer + scheduler + position, and a resumed run
ends with the same weights as an uninterrupted one (bit for bit on CPU with the same thread count).

Distributed (launched by torchrun with more than one process, retrieval.distributed): every process holds the
data and a replica of the tower (batch norm over the global batch, DistributedDataParallel), takes its disjoint
share of each global batch (sampling.ShardedBatchSampler; train.batch_size is the global batch), augments its rows
with the whole batch's seeded draws, and computes the objective's loss of the global batch (objectives'
distributed() forms), so N processes train as one process would, up to floating-point rounding. Rank 0 alone
validates, writes the run folder (checkpoints, metrics.jsonl, the state), logs and draws the progress bar; the
state is the same whatever the number of processes, so a run resumes under any number of them.
"""

from retrieval.training.batches import Batches
from retrieval.training.control import TrainingInterrupted, cpu_threads
from retrieval.training.loop import StepInfo, Trainer, TrainerSettings, Validation
from retrieval.training.run import TrainRequest, train
from retrieval.training.setup import build_optimizer, build_trainer, config_sha256
from retrieval.training.state import STATE_FORMAT
from retrieval.training.step import TrainStep

__all__ = [
    "STATE_FORMAT", "Batches", "StepInfo", "TrainRequest", "TrainStep", "Trainer", "TrainerSettings",
    "TrainingInterrupted", "Validation", "build_optimizer", "build_trainer", "config_sha256", "cpu_threads",
    "train",
]
