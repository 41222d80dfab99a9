"""Packed documents compute what each document computes alone.

Rows of several documents laid end to end (PackedDocuments: each token's document and its
position inside it) against every document run alone, float32 on CPU: per-document summed loss
within 1e-6 relative and every parameter gradient of the summed loss within 1e-5 relative. The
documents cross the SSD chunk boundary (chunk 8) and are shorter than the conv kernel too.
"""

import pytest
import torch

from falcon_h1.kernels import causal_conv1d, ssd_scan
from falcon_h1.model.packing import PackedDocuments
from falcon_h1.parity import build_from_hf, make_hf_model, relative_error

ROWS = [[5, 11, 2, 6], [14, 10]]  # document lengths per row (24 tokens each)


def packed_inputs(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    documents = [[torch.randint(2, vocab, (n,), generator=generator) for n in row] for row in ROWS]
    tokens = torch.stack([torch.cat(row) for row in documents])
    return documents, tokens


def doc_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels inside the document; the last token of a document predicts nothing."""
    labels = torch.roll(tokens, -1, dims=-1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[..., -1] = 0.0
    return labels, mask


@pytest.mark.parametrize("overrides", [dict(), dict(mamba_n_groups=2, mamba_rms_norm=True, num_attention_heads=6,
                                                     num_key_value_heads=2)])
def test_packed_rows_equal_documents_alone(single_rank, overrides):
    hf = make_hf_model(seed=31, mamba_chunk_size=8, num_hidden_layers=2, **overrides)
    model = build_from_hf(hf).train()
    documents, tokens = packed_inputs(hf.config.vocab_size)

    # Alone: each document, its own loss.
    alone_losses = []
    model.zero_grad()
    for row in documents:
        for doc in row:
            labels, mask = doc_labels(doc[None])
            loss = (model(doc[None], labels=labels) * mask).sum()
            loss.backward()
            alone_losses.append(loss.detach())
    alone_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # Packed: the same documents in two rows, labels and mask per document.
    packed = PackedDocuments.from_lengths(ROWS)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros(tokens.shape)
    for r, row in enumerate(documents):
        start = 0
        for doc in row:
            doc_label, doc_mask = doc_labels(doc[None])
            labels[r, start:start + len(doc)] = doc_label[0]
            mask[r, start:start + len(doc)] = doc_mask[0]
            start += len(doc)
    model.zero_grad()
    per_token = model(tokens, labels=labels, packed_seq_params=packed) * mask
    per_token.sum().backward()
    packed_losses = []
    for r, row in enumerate(documents):
        start = 0
        for doc in row:
            packed_losses.append(per_token[r, start:start + len(doc)].sum().detach())
            start += len(doc)

    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(alone_losses), rtol=1e-6, atol=1e-5)
    for name, param in model.named_parameters():
        assert relative_error(param.grad, alone_grads[name]) <= 1e-5, name


def test_packed_kernels_restart_at_each_document():
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 24, 4, 8, 2, 16
    packed = PackedDocuments.from_lengths(ROWS)
    x, dt, B, C = torch.randn(b, l, h, p), torch.randn(b, l, h), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    A, D, dt_bias = -torch.rand(h) - 0.5, torch.randn(h), torch.randn(h)
    kwargs = dict(chunk_size=8, D=D, dt_bias=dt_bias, dt_limit=(0.0, float("inf")), backend="torch")
    y = ssd_scan(x, dt, A, B, C, seq_idx=packed.seq_idx, **kwargs)
    conv_in, weight, bias = torch.randn(b, 6, l), torch.randn(6, 1, 4), torch.randn(6)
    conv = causal_conv1d(conv_in, weight, bias, seq_idx=packed.seq_idx, backend="torch")
    for r, row in enumerate(ROWS):
        start = 0
        for length in row:
            doc = slice(start, start + length)
            alone = ssd_scan(x[r:r + 1, doc], dt[r:r + 1, doc], A, B[r:r + 1, doc], C[r:r + 1, doc], **kwargs)
            torch.testing.assert_close(y[r:r + 1, doc], alone)
            torch.testing.assert_close(conv[r:r + 1, :, doc],
                                       causal_conv1d(conv_in[r:r + 1, :, doc], weight, bias, backend="torch"))
            start += length
