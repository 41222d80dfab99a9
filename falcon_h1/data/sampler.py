"""The pretraining batch sampler: resumes exactly where the last checkpoint left off.

The dataset is already shuffled (Megatron's GPTDataset shuffles its sample index with the run's
seed), so samples are read in index order. A global batch is `global_batch_size` consecutive
samples; each of its micro-batch rounds takes `micro_batch_size x data_parallel_size` consecutive
samples, of which data-parallel rank r reads the r-th block. Starting the sampler at
`consumed_samples` = steps taken x global batch size therefore continues the sample sequence with
no sample repeated or skipped, whatever happened to the previous process.
"""

from __future__ import annotations


class MegatronPretrainingSampler:
    """Yields this data-parallel rank's micro-batches (lists of sample indices) from
    `consumed_samples` up to `total_samples`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} outside [0, {data_parallel_size})")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the {total_samples} samples of this "
                             "run; was the checkpoint written by a longer run? Raise trainer.max_steps")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    @property
    def _round(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self._round

    def __iter__(self):
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self._round + 1, self._round):
            yield list(range(start + first, start + first + self.micro_batch_size))
