"""Validation loss and perplexity of a checkpoint on a dataset.

    evaluate_checkpoint("runs/x/checkpoints/step=0001000", "data/val.jsonl", seq_length=2048)

Data: a jsonl file of SFT examples (prompt/response or chat messages: the loss covers what
fine-tuning learns, see falcon_h1.data.sft) or of {"text": ...} documents (every token), or the
prefix of a Megatron indexed dataset (every token). Documents are packed into rows and never see
each other; the result is the mean loss per counted token and its exponential.
"""

import math
from pathlib import Path

import torch

from falcon_h1.data.sft import pack, read_jsonl, tokenize_example


def documents_of(data: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each document of a jsonl file or an indexed dataset prefix."""
    if str(data).endswith(".jsonl"):
        if not Path(data).is_file():
            raise FileNotFoundError(f"evaluation data {data} does not exist")
        from falcon_h1.data.preprocess import iter_jsonl

        first = next(iter_jsonl(Path(data)), (0, {}))[1]
        if isinstance(first, dict) and "text" in first:
            out = []
            for _, record in iter_jsonl(Path(data)):
                ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                out.append((ids, [1] * len(ids)))
            return out
        return [tokenize_example(e, tokenizer) for e in read_jsonl(data)]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from falcon_h1.data.pretraining import check_dataset_prefixes

    check_dataset_prefixes([str(data)])
    dataset = IndexedDataset(str(data))
    documents = (dataset[i].tolist() for i in range(len(dataset)))
    return [(ids, [1] * len(ids)) for ids in documents]


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, data: str, seq_length: int = 2048, batch_size: int = 4,
                        max_rows: int | None = None, device: str | None = None) -> dict:
    """{"loss", "perplexity", "tokens", "rows"} of the checkpoint's model on `data`."""
    from falcon_h1.single_process import single_process_megatron
    from falcon_h1.inference.text import load_for_generation
    from falcon_h1.model.packing import PackedDocuments

    with single_process_megatron():
        model, tokenizer = load_for_generation(checkpoint, device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = pack(documents_of(data, tokenizer), seq_length, pad)[:max_rows]
        if not rows:
            raise ValueError(f"{data} holds no document of two or more tokens")
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = {k: torch.stack([r[k] for r in rows[start:start + batch_size]]).to(device) for k in rows[0]}
            packed = PackedDocuments(batch["seq_idx"], batch["position_ids"])
            loss = model(batch["tokens"], labels=batch["labels"], packed_seq_params=packed).float()
            total += float((loss * batch["loss_mask"]).sum())
            count += int(batch["loss_mask"].sum())
    if count == 0:
        raise ValueError(f"{data}: no token counts towards the loss")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "rows": len(rows)}
