"""Data modules for pretraining: Megatron indexed datasets (blended, split) and mock data.

Both yield, per step, dicts of [global_batch_size / data-parallel size, seq_length] tensors -
tokens, labels, loss_mask, position_ids - (the module cuts them into micro-batches) through
MegatronPretrainingSampler, and remember how many samples the run has
consumed so a resumed run continues with the next one.
"""

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from megatron.core import parallel_state
from torch.utils.data import DataLoader, Dataset

from falcon_h1.data.sampler import MegatronPretrainingSampler


class _DatasetTokenizer:
    """What Megatron's GPTDataset needs of a tokenizer: the end-of-document id and vocabulary size."""

    def __init__(self, hf_tokenizer):
        self.eod = hf_tokenizer.eos_token_id
        self.pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else -1
        self.vocab_size = len(hf_tokenizer)
        # Part of the description Megatron hashes to name its cached sample index.
        self.unique_identifiers = {"class": type(hf_tokenizer).__name__, "name": hf_tokenizer.name_or_path,
                                   "vocab_size": self.vocab_size, "eod": self.eod}


def _weight(value) -> float | None:
    """A blend weight: a number, or a string that is one (as command lines give them)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_blend(paths) -> tuple[list[str], list[float] | None]:
    """A dataset prefix, a list of prefixes (equal weight by size), or Megatron's flat
    [weight, prefix, weight, prefix, ...] list (weights as numbers or numeric strings)
    -> (prefixes, weights)."""
    if isinstance(paths, (str, os.PathLike)):
        return [str(paths)], None
    paths = list(paths)
    weights = [_weight(w) for w in paths[0::2]]
    if paths and len(paths) % 2 == 0 and None not in weights:
        return [str(p) for p in paths[1::2]], weights
    return [str(p) for p in paths], None


def check_dataset_prefixes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"dataset {prefix!r} not found: {', '.join(missing)} does not exist. Give the prefix of a "
                "Megatron indexed dataset (the path without .bin/.idx); make one from jsonl or text with "
                "`python -m falcon_h1.data.preprocess`")


class _SizedDataModule(pl.LightningDataModule):
    """Sample counts from the trainer, the sampler, and the consumed-samples state."""

    def __init__(self, seq_length: int, micro_batch_size: int, global_batch_size: int, num_workers: int = 0):
        super().__init__()
        if global_batch_size % micro_batch_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                             f"micro_batch_size={micro_batch_size}")
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.init_consumed_samples = 0

    def _num_samples(self) -> tuple[int, int, int]:
        """(train, validation, test) samples: exactly what max_steps and limit_val_batches read."""
        trainer = self.trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("pretraining data needs Trainer(max_steps=N) to size the training set")
        val_steps = trainer.limit_val_batches
        if not isinstance(val_steps, int):
            raise ValueError("pretraining data needs an integer Trainer(limit_val_batches=N): the number of "
                             "global batches per validation")
        test_steps = trainer.limit_test_batches if isinstance(trainer.limit_test_batches, int) else val_steps
        return (trainer.max_steps * self.global_batch_size, max(val_steps, 1) * self.global_batch_size,
                max(test_steps, 1) * self.global_batch_size)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.trainer.global_step * self.global_batch_size,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.init_consumed_samples = int(state["consumed_samples"])

    def _loader(self, dataset: Dataset, consumed_samples: int) -> DataLoader:
        sampler = MegatronPretrainingSampler(
            total_samples=len(dataset), consumed_samples=consumed_samples,
            micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size,
            data_parallel_rank=parallel_state.get_data_parallel_rank(),
            data_parallel_size=parallel_state.get_data_parallel_world_size())
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, self.init_consumed_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._validation, 0)  # the same batches at every validation

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test, 0)


class PreTrainingDataModule(_SizedDataModule):
    """Megatron GPTDatasets over indexed datasets (`python -m falcon_h1.data.preprocess` makes them).

    Args:
        paths: a dataset prefix, a list of prefixes, Megatron's [weight, prefix, ...] blend, or a
            dict {"train": ..., "validation": ..., "test": ...} of those for separate splits.
        tokenizer_dir: the Hugging Face tokenizer the data was tokenized with.
        split: train/validation/test proportions of each dataset (ignored with a dict of splits).
        seed: shuffling seed of the sample order.
        index_mapping_dir: where Megatron caches the sample index (default: next to the data).
        eod_mask_loss: do not train on predicting the token after an end-of-document.
    """

    def __init__(self, paths, tokenizer_dir: str, seq_length: int = 2048, micro_batch_size: int = 1,
                 global_batch_size: int = 8, split: str = "949,50,1", seed: int = 1234, num_workers: int = 0,
                 index_mapping_dir: str | None = None, eod_mask_loss: bool = False):
        super().__init__(seq_length, micro_batch_size, global_batch_size, num_workers)
        self.paths = paths
        self.tokenizer_dir = str(tokenizer_dir)
        self.split = split
        self.seed = seed
        self.index_mapping_dir = index_mapping_dir
        self.eod_mask_loss = eod_mask_loss
        self._blend, self._blend_per_split = self._parse_paths(paths)
        self.tokenizer = None

    @staticmethod
    def _parse_paths(paths):
        if isinstance(paths, dict):
            unknown = set(paths) - {"train", "validation", "test"}
            if unknown:
                raise ValueError(f"data paths dict has unknown splits {sorted(unknown)}; use train, validation, test")
            per_split = [parse_blend(paths[s]) if paths.get(s) else None for s in ("train", "validation", "test")]
            for blend in per_split:
                if blend:
                    check_dataset_prefixes(blend[0])
            return None, per_split
        blend = parse_blend(paths)
        check_dataset_prefixes(blend[0])
        return blend, None

    def setup(self, stage: str = "") -> None:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        from falcon_h1.data.preprocess import load_tokenizer

        if hasattr(self, "_train"):
            return
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        config = GPTDatasetConfig(
            random_seed=self.seed, sequence_length=self.seq_length, blend=self._blend,
            blend_per_split=self._blend_per_split, split=None if self._blend_per_split else self.split,
            tokenizer=_DatasetTokenizer(self.tokenizer), reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=self.eod_mask_loss, create_attention_mask=False, path_to_cache=self.index_mapping_dir,
            mmap_bin_files=True)
        builder = BlendedMegatronDatasetBuilder(GPTDataset, list(self._num_samples()), lambda: True, config)
        self._train, self._validation, self._test = builder.build()
        if self._train is None:
            raise ValueError(f"the data {self.paths!r} has no training split (split={self.split!r})")


class MockDataModule(_SizedDataModule):
    """Random token sequences (deterministic per sample index): for smoke tests and benchmarks."""

    def __init__(self, vocab_size: int, seq_length: int = 2048, micro_batch_size: int = 1,
                 global_batch_size: int = 8, seed: int = 1234, num_workers: int = 0):
        super().__init__(seq_length, micro_batch_size, global_batch_size, num_workers)
        self.vocab_size = vocab_size
        self.seed = seed
        self.tokenizer = None

    def setup(self, stage: str = "") -> None:
        train, validation, test = self._num_samples()
        self._train = _RandomTokens(train, self.seq_length, self.vocab_size, self.seed)
        self._validation = _RandomTokens(validation, self.seq_length, self.vocab_size, self.seed + 1)
        self._test = _RandomTokens(test, self.seq_length, self.vocab_size, self.seed + 2)


class _RandomTokens(Dataset):
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}
