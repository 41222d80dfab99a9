"""Supervised fine-tuning data: jsonl examples -> token ids with a response-only loss mask, packed.

One example per line, either
    {"prompt": "...", "response": "..."}                       (plain text, joined as is)
    {"messages": [{"role": "user", "content": "..."}, ...]}    (rendered by the tokenizer's chat template)
The loss covers the response (and the end-of-sequence token after it), or every assistant turn;
prompts and other turns are context only. Documents are packed end to end into rows of
`seq_length` tokens; each row says which document every token belongs to and its position inside
it (see falcon_h1.model.packing), so no document sees another.
"""

import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from falcon_h1.data.preprocess import iter_jsonl
from falcon_h1.data.pretraining import _SizedDataModule


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist (one JSON example per line)")
    examples = []
    for number, example in iter_jsonl(path):
        if not (isinstance(example, dict) and ({"prompt", "response"} <= set(example) or "messages" in example)):
            raise ValueError(f"{path}:{number}: an example needs 'prompt' and 'response', or 'messages'")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def tokenize_example(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, loss mask of each token) of one example; the mask is 1 on tokens to learn."""
    if "messages" in example:
        return _tokenize_chat(example["messages"], tokenizer)
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Each assistant turn's tokens are what rendering it adds after the conversation so far (with
    the generation prompt): those are learned, everything else is context."""
    if not tokenizer.chat_template:
        raise ValueError("'messages' examples need a tokenizer with a chat template (tokenizer_config.json)")

    def render(turns, generation_prompt):
        out = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5

    ids, mask = [], []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            before = render(messages[:i], True)
            if before[: len(ids)] != ids:
                raise ValueError("the chat template renders a conversation differently from its prefix")
            mask += [0] * (len(before) - len(ids))
            ids = before
            after = render(messages[: i + 1], False)
            mask += [1] * (len(after) - len(ids))
            ids = after
    full = render(messages, False)
    mask += [0] * (len(full) - len(ids))
    return full, mask


def pack(documents: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int) -> list[dict]:
    """Rows of `seq_length` inputs: each document of n tokens gives n - 1 (input, next-token
    label) pairs, laid end to end in order; a document that does not fit starts a new row, one
    longer than a row is cut. Padding is a document of its own with no loss."""
    rows, current = [], []
    cut = 0

    def close():
        tokens, labels, loss_mask, seq_idx, positions = [], [], [], [], []
        for index, (ids, mask) in enumerate(current):
            tokens += ids[:-1]
            labels += ids[1:]
            loss_mask += mask[1:]
            seq_idx += [index] * (len(ids) - 1)
            positions += list(range(len(ids) - 1))
        pad = seq_length - len(tokens)
        tokens += [pad_id] * pad
        labels += [pad_id] * pad
        loss_mask += [0] * pad
        seq_idx += [len(current)] * pad
        positions += list(range(pad))
        rows.append({"tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
                     "loss_mask": torch.tensor(loss_mask, dtype=torch.float32), "seq_idx": torch.tensor(seq_idx),
                     "position_ids": torch.tensor(positions)})

    used = 0
    for ids, mask in documents:
        if len(ids) < 2:
            continue
        if len(ids) > seq_length + 1:
            ids, mask, cut = ids[: seq_length + 1], mask[: seq_length + 1], cut + 1
        if current and used + len(ids) - 1 > seq_length:
            close()
            current, used = [], 0
        current.append((ids, mask))
        used += len(ids) - 1
    if current:
        close()
    if cut:
        warnings.warn(f"{cut} SFT examples are longer than seq_length={seq_length} + 1 tokens and were cut")
    return rows


class _Rows(Dataset):
    """`num_samples` samples cycling over `rows` in a fresh shuffled order each pass (epoch)."""

    def __init__(self, rows: list[dict], num_samples: int, seed: int):
        self.rows, self.num_samples, self.seed = rows, num_samples, seed
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> order, drawn once

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        epoch, offset = divmod(index, len(self.rows))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(len(self.rows), generator=generator)
        return self.rows[int(self._orders[epoch][offset])]


class SFTDataModule(_SizedDataModule):
    """Packed SFT rows from jsonl files, with the tokenizer of the model being fine-tuned.

    Args:
        train_path / validation_path: jsonl files (without validation_path, `validation_fraction`
            of the training examples, taken by a seeded shuffle, are held out).
        tokenizer_dir: a Hugging Face tokenizer directory (a checkpoint's context/tokenizer; the
            `finetune` entrypoint fills in its checkpoint's when None).
    """

    def __init__(self, train_path: str | None, tokenizer_dir: str | None, validation_path: str | None = None,
                 seq_length: int = 2048, micro_batch_size: int = 1, global_batch_size: int = 8,
                 validation_fraction: float = 0.05, seed: int = 1234, num_workers: int = 0):
        super().__init__(seq_length, micro_batch_size, global_batch_size, num_workers)
        self.train_path, self.validation_path = train_path, validation_path
        self.tokenizer_dir = None if tokenizer_dir is None else str(tokenizer_dir)
        self.validation_fraction, self.seed = validation_fraction, seed
        self.tokenizer = None

    def setup(self, stage: str = "") -> None:
        from falcon_h1.data.preprocess import load_tokenizer

        if hasattr(self, "_train"):
            return
        if not self.train_path:
            raise ValueError("no SFT data: give the training jsonl (data=sft(path=FILE) on the command line, or "
                             "data=FILE to a finetune recipe); each line {\"prompt\": ..., \"response\": ...} "
                             "or {\"messages\": [...]}")
        if not self.tokenizer_dir:
            raise ValueError("no tokenizer for the SFT data: set data.tokenizer_dir (e.g. CHECKPOINT/context/tokenizer)")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        train = [tokenize_example(e, self.tokenizer) for e in read_jsonl(self.train_path)]
        if self.validation_path:
            validation = [tokenize_example(e, self.tokenizer) for e in read_jsonl(self.validation_path)]
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            held_out = max(1, int(len(train) * self.validation_fraction)) if len(train) > 1 else 0
            validation = [train[i] for i in order[:held_out]] or train
            train = [train[i] for i in order[held_out:]]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        train_rows, validation_rows = (pack(docs, self.seq_length, pad) for docs in (train, validation))
        if not train_rows:
            raise ValueError(f"{self.train_path}: no example has two or more tokens")
        train_n, validation_n, test_n = self._num_samples()
        self._train = _Rows(train_rows, train_n, self.seed)
        self._validation = _Rows(validation_rows, validation_n, self.seed + 1)
        self._test = _Rows(validation_rows, test_n, self.seed + 2)
