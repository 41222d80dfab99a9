"""Sharded pretraining data: shards written by `python -m falcon_h1.data.preprocess --shard-size`
(data/web_{i:05d}_{j:04d}.bin/.idx and data/web.manifest.json) are one dataset.

Named by its manifest, its prefix or its directory, a sharded dataset trains on exactly the
samples of the unsharded dataset of the same documents in the same order (not those of a blend of
its shards). Blends of sharded datasets draw by their weights. A bad manifest, a missing shard, a
directory without shards or shards of another tokenizer fail in one line when the data module is
made, before any index is built.

Most shards here are written by preprocess one input file each, named as shards, with the
manifest written by the test (every shard boundary where the test puts it); one test reads what
`preprocess(..., shard_size=...)` writes.
"""

import json
import os
import random
import re
import shutil
from types import SimpleNamespace

import pytest

from falcon_h1.data.pretraining import PreTrainingDataModule
from falcon_h1.data.sharded import MANIFEST_FORMAT

WEB_LETTERS, CODE_LETTERS = "abcdefgh", "nopqrstu"  # disjoint: a sample's tokens tell its dataset


def write_jsonl(path, letters, count, rng):
    """`count` documents of 5 to 80 of `letters` (no spaces: a space token would be shared)."""
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(rng.randint(5, 80)))}) + "\n")
    return str(path)


def write_manifest(path, shards, tokenizer):
    """The manifest preprocess writes last: shard prefixes relative to its directory, in order."""
    entries = [{"prefix": os.path.relpath(s.prefix, path.parent), "documents": s.documents, "tokens": s.tokens}
               for s in shards]
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "tokenizer": tokenizer, "shards": entries,
                                "documents": sum(s.documents for s in shards),
                                "tokens": sum(s.tokens for s in shards)}))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """web: 4 shards (input 0 in two shards, inputs 1 and 2 in one each) and the same documents
    unsharded; code: 2 shards of other letters; one BPE tokenizer trained on both."""
    from falcon_h1.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("sharded")
    rng = random.Random(0)
    web = [write_jsonl(root / f"web{i}.jsonl", WEB_LETTERS, n, rng) for i, n in enumerate((30, 25, 35, 30))]
    code = [write_jsonl(root / f"code{i}.jsonl", CODE_LETTERS, 40, rng) for i in range(2)]
    tokenizer = preprocess(web + code, str(root / "all"), train_bpe_vocab=300, log_every=0).tokenizer_dir

    def shards(directory, name, inputs, numbers):
        return [preprocess([file], str(root / directory / f"{name}_{i:05d}_{j:04d}"), tokenizer_dir=tokenizer,
                           log_every=0) for file, (i, j) in zip(inputs, numbers)]

    web_shards = shards("web", "web", web, [(0, 0), (0, 1), (1, 0), (2, 0)])
    code_shards = shards("code", "code", code, [(0, 0), (1, 0)])
    bare = root / "bare"  # the web shards without a manifest
    bare.mkdir()
    for shard in web_shards:
        for ext in (".bin", ".idx"):
            os.link(f"{shard.prefix}{ext}", bare / f"{os.path.basename(shard.prefix)}{ext}")
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, web_shards=web_shards,
        whole=preprocess(web, str(root / "whole" / "web"), tokenizer_dir=tokenizer, log_every=0).prefix,
        web=write_manifest(root / "web" / "web.manifest.json", web_shards, tokenizer),
        code=write_manifest(root / "code" / "code.manifest.json", code_shards, tokenizer), bare=str(bare))


def trainer_stub(max_steps):
    """What a data module reads of its Trainer: the run's length and validation batches."""
    return SimpleNamespace(max_steps=max_steps, limit_val_batches=2, limit_test_batches=2, lightning_module=None)


def loaded(paths, tokenizer, steps=30, **options):
    """The data module over `paths`, set up for `steps` steps of 4 samples of 32 tokens."""
    data = PreTrainingDataModule(paths, tokenizer, seq_length=32, micro_batch_size=2, global_batch_size=4,
                                 **options)
    data.trainer = trainer_stub(steps)
    data.setup("fit")
    return data


def token_batches(data):
    """Token ids of every training and validation batch (single_rank: the sampler's data-parallel rank)."""
    return ([batch["tokens"].tolist() for batch in data.train_dataloader()],
            [batch["tokens"].tolist() for batch in data.val_dataloader()])


def test_a_sharded_dataset_trains_on_the_samples_of_the_unsharded_one_however_it_is_named(single_rank, corpus):
    # 60 steps x 4 samples: more than one pass over the 118 training documents (54 global batches),
    # so two epochs are compared; every batch the data loader yields, not only the first 60.
    expected_train, expected_validation = token_batches(loaded(corpus.whole, corpus.tokenizer, steps=60))
    assert len(expected_train) > 60 and len(expected_validation) >= 2
    forms = {"manifest": corpus.web, "prefix": str(corpus.root / "web" / "web"),
             "directory": str(corpus.root / "web"), "directory without a manifest": corpus.bare}
    for form, path in forms.items():
        data = loaded(path, corpus.tokenizer, steps=60)
        assert token_batches(data) == (expected_train, expected_validation), form
    # A blend of the shards draws each sample from one shard: other samples.
    shards = [shard.prefix for shard in corpus.web_shards]
    blend_of_shards, _ = token_batches(loaded(shards, corpus.tokenizer, steps=60, weights=[1.0] * len(shards)))
    assert blend_of_shards != expected_train


def test_what_preprocess_shards_trains_as_what_it_writes_unsharded(single_rank, corpus, tmp_path):
    from falcon_h1.data.preprocess import preprocess
    from falcon_h1.data.sharded import read_shards

    inputs = [str(corpus.root / f"web{i}.jsonl") for i in range(4)]
    preprocess(inputs, str(tmp_path / "data" / "web"), tokenizer_dir=corpus.tokenizer, log_every=0, shard_size="300")
    unsharded = preprocess(inputs, str(tmp_path / "web"), tokenizer_dir=corpus.tokenizer, log_every=0).prefix
    manifest = tmp_path / "data" / "web.manifest.json"
    assert len(read_shards(str(manifest)).prefixes) > len(inputs)  # inputs cut into several shards
    expected = token_batches(loaded(unsharded, corpus.tokenizer, steps=60))
    for path in (manifest, tmp_path / "data" / "web", tmp_path / "data"):
        assert token_batches(loaded(str(path), corpus.tokenizer, steps=60)) == expected, path


def test_the_directory_and_prefix_forms_are_the_manifest_and_share_its_index_cache(corpus):
    forms = [corpus.web, str(corpus.root / "web" / "web"), str(corpus.root / "web")]
    assert {tuple(PreTrainingDataModule(path, corpus.tokenizer)._blend[0]) for path in forms} == {(corpus.web,)}
    loaded(corpus.web, corpus.tokenizer)
    # Megatron's default cache next to the data: data/web.manifest.json -> data/web/cache/.
    assert list((corpus.root / "web" / "web" / "cache").glob("ShardedGPTDataset_indices/*-train-shuffle_index.npy"))


def test_the_runs_header_counts_a_sharded_datasets_documents_and_tokens(corpus):
    from falcon_h1.training.callbacks import human_number
    from falcon_h1.training.pretrain import describe_data

    tokens = human_number(sum(shard.tokens for shard in corpus.web_shards))
    for path in (corpus.web, corpus.bare):
        assert describe_data(PreTrainingDataModule(path, corpus.tokenizer)) == \
            f"{path} ({tokens} tokens, 120 documents), split 98,2,0"


def source_of(sample, web_ids, code_ids, eod):
    tokens = set(sample) - {eod}
    if tokens <= web_ids:
        return "web"
    assert tokens <= code_ids, f"a sample mixes the datasets: {sample}"
    return "code"


def test_a_blend_of_sharded_datasets_draws_samples_in_the_proportions_of_its_weights(single_rank, corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from falcon_h1.data.sharded import read_shards
    from falcon_h1.data.sharded_dataset import ShardedIndexedDataset

    def ids(dataset):
        return {int(t) for i in range(len(dataset)) for t in dataset[i]}

    whole = IndexedDataset(corpus.whole)  # (kept: its arrays are views of its memory map)
    eod = int(whole[0][-1])
    web_ids = ids(whole) - {eod}
    code_ids = ids(ShardedIndexedDataset(read_shards(corpus.code))) - {eod}
    assert web_ids and code_ids and not web_ids & code_ids

    # 1000 training samples. Megatron's blending picks, sample after sample, the dataset furthest
    # below its share, so each share is within a sample of its weight: tolerance 0.5%.
    steps = 250
    for paths, weights in (([0.3, corpus.web, 0.7, str(corpus.root / "code")], None),
                           ([corpus.web, corpus.code], [3, 7]),  # weights are normalised
                           ({"train": [0.3, corpus.web, 0.7, corpus.code], "validation": corpus.bare}, None)):
        data = loaded(paths, corpus.tokenizer, steps=steps, weights=weights)
        train, validation = token_batches(data)
        sources = [source_of(sample, web_ids, code_ids, eod) for batch in train for sample in batch]
        assert len(sources) == steps * 4
        assert abs(sources.count("web") / len(sources) - 0.3) <= 0.005, (paths, sources.count("web"))
    # The dict's validation split reads the web dataset alone.
    assert {source_of(sample, web_ids, code_ids, eod) for batch in validation for sample in batch} == {"web"}


def test_shards_read_with_one_open_at_a_time_are_the_unsharded_documents(corpus):
    """Past its open-shard limit the dataset closes shards as it reads: what it returned stays valid."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from falcon_h1.data.sharded import read_shards
    from falcon_h1.data.sharded_dataset import ShardedIndexedDataset

    whole = IndexedDataset(corpus.whole)
    sharded = ShardedIndexedDataset(read_shards(corpus.web), open_shards=1)
    assert len(sharded) == len(whole) == 120 and sharded.sequence_lengths.tolist() == whole.sequence_lengths.tolist()
    assert sharded.document_indices.tolist() == whole.document_indices.tolist()
    order = random.Random(0).sample(range(120), 120)  # across shards, back and forth
    read = [(sharded[i], sharded.get(i, offset=1, length=2)) for i in order]
    assert len(sharded._open) == 1
    assert all(document.tolist() == whole[i].tolist() and part.tolist() == whole.get(i, 1, 2).tolist()
               for i, (document, part) in zip(order, read))


def test_the_index_cache_tells_a_rewritten_manifest_from_the_one_it_replaces(single_rank, corpus, tmp_path):
    manifest = tmp_path / "web.manifest.json"
    write_manifest(manifest, corpus.web_shards, corpus.tokenizer)
    before, _ = token_batches(loaded(str(manifest), corpus.tokenizer, index_mapping_dir=str(tmp_path / "cache")))
    write_manifest(manifest, corpus.web_shards[:3], corpus.tokenizer)  # same path, one shard fewer
    after, _ = token_batches(loaded(str(manifest), corpus.tokenizer, index_mapping_dir=str(tmp_path / "cache")))
    assert after != before
    assert len(list((tmp_path / "cache").glob("*-train-shuffle_index.npy"))) == 2


def fails(paths, tokenizer, error, match):
    """Making the data module (no setup: no index work) fails with a one-line `error`."""
    with pytest.raises(error, match=match) as raised:
        PreTrainingDataModule(paths, tokenizer)
    assert "\n" not in str(raised.value)


def test_a_bad_sharded_dataset_fails_in_one_line_when_the_data_module_is_made(corpus, tmp_path):
    # The web shards, listed from tmp_path (shard prefixes are relative to the manifest).
    listed = json.loads(open(write_manifest(tmp_path / "web.manifest.json", corpus.web_shards,
                                            corpus.tokenizer)).read())

    missing = tmp_path / "missing.manifest.json"
    missing.write_text(json.dumps({**listed, "shards": listed["shards"] + [{"prefix": "web_00009_0000"}]}))
    fails(str(missing), corpus.tokenizer, FileNotFoundError,
          r"manifest '.*missing.manifest.json' lists a missing shard: .*web_00009_0000.bin does not exist "
          r"\(2 shard files missing\): restore it, or re-run `python -m falcon_h1.data.preprocess")

    other_format = tmp_path / "other.manifest.json"
    other_format.write_text(json.dumps({**listed, "format": "megatron-blend"}))
    fails(str(other_format), corpus.tokenizer, ValueError,
          rf"'.*other.manifest.json' is not a falcon-h1 shard manifest \(format 'megatron-blend', expected "
          rf"'{MANIFEST_FORMAT}'\): give a manifest written by `python -m falcon_h1.data.preprocess ... --shard-size")
    newer = tmp_path / "newer.manifest.json"
    newer.write_text(json.dumps({**listed, "version": 2}))
    fails(str(newer), corpus.tokenizer, ValueError, r"has version 2; this falcon-h1 reads version 1")

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(str(empty), corpus.tokenizer, ValueError, r"directory '.*empty' holds no shards \(no .bin/.idx pairs")
    # In a blend, with a weight, as anywhere a dataset is accepted.
    fails([0.5, corpus.web, 0.5, str(empty)], corpus.tokenizer, ValueError, "holds no shards")

    two = tmp_path / "two"
    two.mkdir()
    for name in ("web", "code"):
        (two / f"{name}.manifest.json").write_text(json.dumps(listed))
    fails(str(two), corpus.tokenizer, ValueError, r"holds 2 shard manifests \(code.manifest.json, web.manifest.json\): "
                                                  r"give the one to read")

    # Shards preprocess has not finished, in a directory without a manifest (written last).
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "web_00000_0000.bin").write_bytes(b"")
    fails(str(unfinished), corpus.tokenizer, FileNotFoundError,
          r"shard '.*web_00000_0000' has a .bin but no .idx \(1 unpaired in that directory\): wait for "
          r"preprocessing to finish")
    shard = corpus.web_shards[0].prefix
    for ext in (".bin", ".idx"):
        shutil.copy(f"{shard}{ext}", unfinished / f"web_00000_0000{ext}")
        shutil.copy(f"{shard}{ext}", unfinished / f"web_00001_0000.tmp4242{ext}")
    fails(str(unfinished), corpus.tokenizer, ValueError,
          r"directory '.*unfinished' holds shards preprocess has not finished \(web_00001_0000.tmp4242.bin/.idx, a "
          r"temporary\) and no .manifest.json: wait for preprocessing to finish")
    for ext in (".bin", ".idx"):
        (unfinished / f"web_00001_0000.tmp4242{ext}").unlink()
    (unfinished / "web_00001.done.json").write_text("{}")  # a finished input's record, the manifest not yet
    fails(str(unfinished), corpus.tokenizer, ValueError, r"holds shards preprocess has not finished "
                                                         r"\(web_00001.done.json\)")

    fails(str(tmp_path / "nowhere"), corpus.tokenizer, FileNotFoundError,
          r"dataset '.*nowhere' not found: neither .*nowhere.bin/.idx nor .*nowhere.manifest.json exists")


def test_shards_of_another_tokenizer_than_the_runs_fail_in_one_line(corpus, tmp_path):
    from falcon_h1.data.preprocess import preprocess

    text = tmp_path / "other.jsonl"
    write_jsonl(text, "xyz", 20, random.Random(1))
    other = preprocess([str(text)], str(tmp_path / "other"), train_bpe_vocab=270, log_every=0).tokenizer_dir
    made, run = re.escape(corpus.tokenizer), re.escape(other)
    fails(corpus.web, other, ValueError,
          rf"dataset '.*web.manifest.json' was tokenized with '{made}' \(300 tokens\), whose vocabulary is not the "
          rf"run's tokenizer '{run}' \(\d+ tokens\): give data.tokenizer_dir={made}, or tokenize the data again with "
          rf"--tokenizer {run}")
    # A copy of the data's tokenizer elsewhere is the same vocabulary.
    copy = shutil.copytree(corpus.tokenizer, tmp_path / "copy")
    assert PreTrainingDataModule(corpus.web, str(copy))._blend == ([corpus.web], None)
