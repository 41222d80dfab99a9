"""Data modules for pretraining: Megatron indexed datasets (sharded, blended, split) and mock data.

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

from falcon_h1.arguments import check_batch_sizes
from falcon_h1.data.sampler import MegatronPretrainingSampler
from falcon_h1.data.sharded import cache_prefix, check_tokenizer, dataset_path, document_count, is_sharded, read_shards

# Train, validation, test proportions of each dataset's documents, everywhere a split is not given
# (the main job python -m falcon_h1.train, the recipes, PreTrainingDataModule).
DEFAULT_SPLIT = "98,2,0"
SPLIT_NAMES = ("training", "validation", "test")


class _DatasetTokenizer:
    """What Megatron's GPTDataset needs of a tokenizer: the end-of-document id and vocabulary size."""

    def __init__(self, hf_tokenizer):
        self.eod = hf_tokenizer.eos_token_id
        # Packed pretraining samples hold no padding; a pad id equal to the end-of-document one (GPT-2
        # style tokenizers) would take document ends out of the loss (Megatron resets it, with a warning).
        pad = hf_tokenizer.pad_token_id
        self.pad = pad if pad is not None and pad != self.eod else -1
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
    """A dataset path, a list of paths (weighted by size), or Megatron's flat
    [weight, path, weight, path, ...] list (weights as numbers or numeric strings)
    -> (paths, weights). A path is a prefix or a sharded dataset (falcon_h1.data.sharded)."""
    if isinstance(paths, (str, os.PathLike)):
        return [str(paths)], None
    paths = list(paths)
    weights = [_weight(w) for w in paths[0::2]]
    if paths and len(paths) % 2 == 0 and None not in weights:
        return [str(p) for p in paths[1::2]], weights
    return [str(p) for p in paths], None


def split_ranges(split: str) -> list[tuple[float, float] | None]:
    """Megatron's [begin, end) fraction of the documents of each split ("98,2,0" -> train
    [0, .98), validation [.98, 1), no test)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def documents_needed(ranges: list[tuple[float, float] | None]) -> int:
    """The fewest documents that give each of `ranges` at least one, as Megatron rounds them."""
    for count in range(1, 1_000_001):
        if all(round(end * count) > round(begin * count) for begin, end in filter(None, ranges)):
            return count
    raise ValueError(f"a split fraction in {ranges} is too small to ever get a document")


def check_split_sizes(prefixes: list[str], split: str, num_samples: tuple[int, int, int]) -> None:
    """Every split the run reads must get a document of every dataset: Megatron would loop forever
    filling a split's samples from none (megatron-core 0.19, GPTDataset._get_num_epochs). A sharded
    dataset is split as one (its documents counted across its shards)."""
    ranges = [r if r is not None and samples > 0 else None for r, samples in zip(split_ranges(split), num_samples)]
    for prefix in prefixes:
        count = document_count(prefix)
        empty = [name for name, r in zip(SPLIT_NAMES, ranges) if r and round(r[1] * count) <= round(r[0] * count)]
        if empty:
            fix = f", or data.split='{count - 1},1,0' (one validation document)" if count > 1 else ""
            raise ValueError(
                f"dataset {prefix!r} has {count} documents, too few for split={split!r}: its {' and '.join(empty)} "
                f"split would get none. That split needs at least {documents_needed(ranges)} documents: add data"
                f"{fix}")


def check_dataset_prefixes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"dataset {prefix!r} not found: {', '.join(missing)} does not exist. Give the prefix of a "
                "Megatron indexed dataset (the path without .bin/.idx); make one from jsonl or text with "
                "`python -m falcon_h1.data.preprocess`")


def resolve_datasets(paths: list[str], tokenizer_dir: str) -> list[str]:
    """Each dataset path as Megatron is given it (sharded.dataset_path), checked: a prefix's files,
    a sharded dataset's manifest, shards and tokenizer. Cheap (file headers), before any index work."""
    resolved = []
    for path in paths:
        path = dataset_path(path)
        if is_sharded(path):
            check_tokenizer(read_shards(path), tokenizer_dir)
        elif not any(Path(f"{path}{ext}").exists() for ext in (".bin", ".idx")):
            raise FileNotFoundError(
                f"dataset {path!r} not found: neither {path}.bin/.idx nor {path}.manifest.json exists. Give the "
                "prefix of a Megatron indexed dataset (the path without .bin/.idx), a shard manifest "
                "(PREFIX.manifest.json) or a directory of shards; make them from jsonl or text with "
                "`python -m falcon_h1.data.preprocess`")
        else:
            check_dataset_prefixes([path])
        resolved.append(path)
    return resolved


def check_weights(paths: list[str], weights: list[float] | None) -> None:
    """Megatron asserts positive blend weights only once every dataset's index is built."""
    for path, weight in zip(paths, weights or []):
        if not weight > 0:
            raise ValueError(f"blend weight {weight} of {path!r} is not positive: give each dataset a weight > 0 "
                             "(weights are normalised to sum to 1), or leave the dataset out")


class _SizedDataModule(pl.LightningDataModule):
    """Sample counts from the trainer, the sampler, and the consumed-samples state."""

    def __init__(self, seq_length: int, micro_batch_size: int, global_batch_size: int, num_workers: int = 0):
        super().__init__()
        check_batch_sizes(seq_length, micro_batch_size, global_batch_size)
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
        paths: a dataset, a list of datasets, Megatron's [weight, dataset, ...] blend, or a dict
            {"train": ..., "validation": ..., "test": ...} of those for separate splits. A dataset is
            a prefix (PREFIX.bin/.idx), or a sharded dataset read as one: its manifest
            (PREFIX.manifest.json), its prefix, or its directory (falcon_h1.data.sharded).
        tokenizer_dir: the Hugging Face tokenizer the data was tokenized with.
        weights: blend weights of a list of datasets, one each (default: by size); normalised.
        split: train/validation/test proportions of each dataset's documents (ignored with a dict of
            splits); every non-zero part must get a document of every dataset.
        seed: shuffling seed of the sample order.
        index_mapping_dir: where Megatron caches the sample index (default: next to the data).
        eod_mask_loss: do not train on predicting the token after an end-of-document.
    """

    def __init__(self, paths: list[str] | str | dict, tokenizer_dir: str, seq_length: int = 2048,
                 micro_batch_size: int = 1, global_batch_size: int = 8, split: str = DEFAULT_SPLIT, seed: int = 1234,
                 num_workers: int = 0, index_mapping_dir: str | None = None, eod_mask_loss: bool = False,
                 weights: list[float] | None = None):
        super().__init__(seq_length, micro_batch_size, global_batch_size, num_workers)
        if not tokenizer_dir:
            raise ValueError("pretraining data needs the tokenizer it was made with: data.tokenizer_dir=DIR "
                             "(on the command line: data=pretraining(paths=PREFIX,tokenizer=DIR))")
        self.paths = paths
        self.tokenizer_dir = str(tokenizer_dir)
        self.split = split
        self.seed = seed
        self.index_mapping_dir = index_mapping_dir
        self.eod_mask_loss = eod_mask_loss
        self.weights = weights
        self._blend, self._blend_per_split = self._parse_paths(paths, weights, self.tokenizer_dir)
        self.tokenizer = None

    @staticmethod
    def _parse_paths(paths, weights, tokenizer_dir):
        """(blend, blend per split) for Megatron, every dataset path resolved and checked."""
        if not paths:
            raise ValueError("no pretraining data: give data.paths=PREFIX (a dataset made by "
                             "`python -m falcon_h1.data.preprocess`), or a list of them")
        if isinstance(paths, dict):
            if weights is not None:
                raise ValueError("data.weights blends a list of paths; with a dict of splits give each split "
                                 "Megatron's [weight, prefix, ...] list")
            unknown = set(paths) - {"train", "validation", "test"}
            if unknown:
                raise ValueError(f"data paths dict has unknown splits {sorted(unknown)}; use train, validation, test")
            per_split = [parse_blend(paths[s]) if paths.get(s) else None for s in ("train", "validation", "test")]
            per_split = [(resolve_datasets(blend[0], tokenizer_dir), blend[1]) if blend else None
                         for blend in per_split]
            for blend in filter(None, per_split):
                check_weights(*blend)
            return None, per_split
        blend = parse_blend(paths)
        if weights is not None:
            if blend[1] is not None:
                raise ValueError("blend weights are given twice: in data.paths ([weight, prefix, ...]) and in "
                                 "data.weights; keep one")
            if len(weights) != len(blend[0]):
                raise ValueError(f"data.weights={list(weights)} has {len(weights)} values for {len(blend[0])} "
                                 f"paths {blend[0]}: give one weight per path")
            blend = (blend[0], [float(w) for w in weights])
        blend = (resolve_datasets(blend[0], tokenizer_dir), blend[1])
        check_weights(*blend)
        return blend, None

    def setup(self, stage: str = "") -> None:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

        from falcon_h1.data.preprocess import load_tokenizer
        from falcon_h1.data.sharded_dataset import ShardedGPTDataset

        if hasattr(self, "_train"):
            return
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        num_samples = self._num_samples()
        if self._blend:  # (a dict of splits reads each dataset whole)
            check_split_sizes(self._blend[0], self.split, num_samples)
        config = GPTDatasetConfig(
            random_seed=self.seed, sequence_length=self.seq_length, blend=self._blend,
            blend_per_split=self._blend_per_split, split=None if self._blend_per_split else self.split,
            tokenizer=_DatasetTokenizer(self.tokenizer), reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=self.eod_mask_loss, create_attention_mask=False, path_to_cache=self._index_cache(),
            mmap_bin_files=True)
        # One class for every dataset (BlendedDataset asserts its datasets share one): GPTDataset's
        # reading of a prefix, and a sharded dataset read as one indexed dataset.
        builder = BlendedMegatronDatasetBuilder(ShardedGPTDataset, list(num_samples), lambda: True, config)
        self._train, self._validation, self._test = builder.build()
        if self._train is None:
            raise ValueError(f"the data {self.paths!r} has no training split (split={self.split!r})")

    def _index_cache(self) -> str | None:
        """Megatron caches a dataset's sample index next to it by default (PREFIX/cache/; for a
        sharded dataset, see sharded.cache_prefix), but a blend's index nowhere, saying so on every
        run: give a blend the first dataset's."""
        if self.index_mapping_dir is None and self._blend and len(self._blend[0]) > 1:
            return os.path.join(cache_prefix(self._blend[0][0]), "cache")
        return self.index_mapping_dir


class MockDataModule(_SizedDataModule):
    """Random token sequences (deterministic per sample index): for smoke tests and benchmarks.
    vocab_size None: the vocabulary of the model being trained."""

    def __init__(self, vocab_size: int | None = None, seq_length: int = 2048, micro_batch_size: int = 1,
                 global_batch_size: int = 8, seed: int = 1234, num_workers: int = 0):
        super().__init__(seq_length, micro_batch_size, global_batch_size, num_workers)
        self.vocab_size = vocab_size
        self.seed = seed
        self.tokenizer = None

    def setup(self, stage: str = "") -> None:
        model = getattr(self.trainer, "lightning_module", None)
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if self.vocab_size is None:
            if model_vocab is None:
                raise ValueError("MockDataModule(vocab_size=None) takes the model's vocabulary, and this model has "
                                 "no config.vocab_size: set data.vocab_size=N")
            self.vocab_size = model_vocab
        elif model_vocab is not None and self.vocab_size > model_vocab:
            raise ValueError(f"data.vocab_size={self.vocab_size} exceeds the model's vocab_size={model_vocab}: "
                             "leave data.vocab_size unset (the model's) or lower it")
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
