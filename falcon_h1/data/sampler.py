"""The pretraining batch sampler: resumes exactly where the last checkpoint left off.

The dataset is already shuffled (Megatron's GPTDataset shuffles its sample index with the run's
seed), so samples are read in index order. A global batch is `global_batch_size` consecutive
samples, read in rounds of `micro_batch_size x data_parallel_size`; in each round data-parallel
rank r reads the r-th block of `micro_batch_size`. One item of the sampler is everything a rank
reads for one step (its blocks of every round, round by round), so a data loader item is a step:
Lightning's batch counts (`limit_val_batches`, `val_check_interval`) count global batches.

Starting at `consumed_samples` = steps taken x global batch size continues the sample sequence
with no sample repeated or skipped, whatever happened to the previous process.
"""

from __future__ import annotations


class MegatronPretrainingSampler:
    """Yields, per global batch from `consumed_samples` up to `total_samples`, this data-parallel
    rank's sample indices (micro-batch after micro-batch)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} outside [0, {data_parallel_size})")
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
                             f"{micro_batch_size} x data-parallel size {data_parallel_size}")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the {total_samples} samples of this "
                             "run; was the checkpoint written by a longer run? Raise trainer.max_steps")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_batch_size

    def __iter__(self):
        round_size = self.micro_batch_size * self.data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self.global_batch_size + 1,
                           self.global_batch_size):
            yield [start + offset + first + i for offset in range(0, self.global_batch_size, round_size)
                   for i in range(self.micro_batch_size)]
