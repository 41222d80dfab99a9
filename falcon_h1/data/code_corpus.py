"""A code corpus from installed Python packages: what a machine holds without any download.

    python -m falcon_h1.data.code_corpus --root SITE_PACKAGES --output DIR [--vocab-size 32768]

The Python sources under ROOT (a site-packages folder: torch, transformers, scipy, ...) become
three Megatron indexed datasets, train, validation and test, with a byte-level BPE trained on the
training files (falcon_h1.data.preprocess). What is left out, and why:
- generated files: protobuf modules (`*_pb2.py`), files that say so in their first 2 KB
  ("auto-generated", "do not edit", "@generated", "this file was generated": transformers'
  modeling files expanded from their modular sources among them), files over MAX_FILE_BYTES or
  with a line over MAX_LINE (tables of data, not code);
- near-copies: the same module vendored or copied into several packages. A file whose word 8-grams
  overlap those of a larger kept file with an estimated Jaccard similarity above NEAR_COPY (MinHash
  signatures, candidates found through LSH bands) is dropped; the larger one stays.
Validation and test are whole packages (a top-level folder of ROOT, or a top-level module), so
they measure code of libraries the model never saw, not other files of libraries it trained on.
Packages are drawn in a seeded order until each held-out split holds its share of the bytes; a
package above MAX_HELD_OUT_PACKAGE of the corpus (torch, say) always trains. corpus.json records
every package's split, the dropped files and why, and the bytes and tokens of each split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from falcon_h1.data.default_corpus import ngram_hashes
from falcon_h1.data.preprocess import preprocess

MAX_FILE_BYTES = 1_000_000
MAX_LINE = 1000
GENERATED_MARKERS = re.compile(r"auto[- ]?generated|do not (edit|modify)|@generated"
                               r"|(file|code|module) (is |was |has been )?(automatically )?generated", re.IGNORECASE)
GENERATED_NAMES = re.compile(r"_pb2(_grpc)?\.py$")
NEAR_COPY = 0.5  # estimated Jaccard similarity of word 8-gram sets above which a file is a near-copy
PERMUTATIONS, BANDS = 32, 8  # MinHash signature length; LSH bands of PERMUTATIONS // BANDS rows
MAX_HELD_OUT_PACKAGE = 0.05  # a package above this share of the bytes stays in training
_SKIPPED_DIRS = {"__pycache__", "bin", "include", "share"}


@dataclass(frozen=True)
class CodeFile:
    path: Path
    name: str  # relative to the root
    package: str
    nbytes: int


def package_files(root: Path) -> list[CodeFile]:
    """Every .py file under `root`, with its package: the top-level folder it lies in, or the
    module's own name for a top-level file. Distribution metadata (*.dist-info, *.egg-info) is not code."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if _SKIPPED_DIRS.intersection(parts) or parts[0].endswith((".dist-info", ".egg-info")) or path.is_symlink():
            continue
        package = parts[0] if len(parts) > 1 else path.stem
        files.append(CodeFile(path, path.relative_to(root).as_posix(), package, path.stat().st_size))
    return files


def generated_reason(file: CodeFile, text: str) -> str | None:
    """Why a file is not hand-written code (None: it is)."""
    if GENERATED_NAMES.search(file.name):
        return "protobuf module"
    if file.nbytes > MAX_FILE_BYTES:
        return f"over {MAX_FILE_BYTES} bytes"
    if GENERATED_MARKERS.search(text[:2048]):
        return "says it is generated"
    if max((len(line) for line in text.splitlines()), default=0) > MAX_LINE:
        return f"a line over {MAX_LINE} characters"
    return None


class MinHasher:
    """MinHash signatures of files' word 8-gram sets, one file at a time (the corpus never sits in
    memory whole). Words get ids from one vocabulary shared by all files, so an 8-gram hashes the
    same wherever it occurs; each of the PERMUTATIONS hash functions is a seeded 64-bit mix."""

    def __init__(self, permutations: int = PERMUTATIONS, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.multipliers = rng.integers(1, 2**63, permutations, dtype=np.uint64) | np.uint64(1)  # odd
        self.offsets = rng.integers(0, 2**63, permutations, dtype=np.uint64)
        self.vocabulary: dict[str, int] = {}

    def ngrams(self, text: str) -> np.ndarray:
        """The distinct word 8-grams of `text` (words and punctuation marks) as 64-bit hashes."""
        return ngram_hashes(text, self.vocabulary)

    def signature(self, grams: np.ndarray) -> np.ndarray:
        """The minimum of each hash function over `grams`; all-max for an empty set (matches nothing)."""
        if not len(grams):
            return np.full(len(self.multipliers), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the mix intends
            y = grams[:, None] * self.multipliers + self.offsets
            y ^= y >> np.uint64(29)
            y *= np.uint64(0xBF58476D1CE4E5B9)
            y ^= y >> np.uint64(32)
        return y.min(axis=0)


def drop_near_copies(sizes: np.ndarray, signatures: np.ndarray) -> dict[int, int]:
    """{dropped file: the larger kept file it nearly copies}. Files are visited largest first; one
    whose signature agrees with a kept file's on more than NEAR_COPY of its entries (the estimate of
    their Jaccard similarity) is dropped. Candidates come from LSH: files that agree on every row of
    some band, so a pair at similarity s is compared with probability 1 - (1 - s^rows)^bands."""
    rows = signatures.shape[1] // BANDS
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
    dropped = {}
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        keys = [signatures[i, band * rows:(band + 1) * rows].tobytes() for band in range(BANDS)]
        candidates = {j for band, key in enumerate(keys) for j in buckets[band].get(key, ())}
        best = max(candidates, key=lambda j: (signatures[i] == signatures[j]).mean(), default=None)
        if best is not None and (signatures[i] == signatures[best]).mean() > NEAR_COPY:
            dropped[i] = best
            continue
        for band, key in enumerate(keys):
            buckets[band].setdefault(key, []).append(i)
    return dropped


def split_packages(package_bytes: dict[str, int], validation_share: float, test_share: float,
                   seed: int = 0) -> dict[str, str]:
    """{package: "train" | "validation" | "test"}: packages in an order seeded by their names' hashes
    go to validation, then test, until each holds its share of the bytes; the largest packages
    (over MAX_HELD_OUT_PACKAGE of the corpus) train."""
    total = sum(package_bytes.values())
    order = sorted(package_bytes, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
    split = dict.fromkeys(package_bytes, "train")
    held = {"validation": 0, "test": 0}
    for name in order:
        if package_bytes[name] > MAX_HELD_OUT_PACKAGE * total:
            continue
        for part, share in (("validation", validation_share), ("test", test_share)):
            if held[part] < share * total:
                split[name] = part
                held[part] += package_bytes[name]
                break
    for part, share in (("validation", validation_share), ("test", test_share)):
        if share > 0 and held[part] == 0:
            raise ValueError(f"no package of at most {MAX_HELD_OUT_PACKAGE:.0%} of the corpus is left for the {part} "
                             f"split: give --root a folder of several packages")
    return split


def plan_corpus(root: Path, validation_share: float, test_share: float, seed: int = 0) -> dict:
    """Which file goes where: {"splits": {split: [files]}, "packages": {package: split},
    "dropped": {file: reason}}, file names relative to `root`."""
    files = package_files(root)
    if not files:
        raise ValueError(f"--root {root}: no .py files there; give a folder of installed packages (e.g. site-packages)")
    hasher = MinHasher(seed=seed)
    kept, sizes, signatures, dropped = [], [], [], {}
    for file in files:
        text = file.path.read_text(encoding="utf-8", errors="replace")
        reason = generated_reason(file, text)
        if reason:
            dropped[file.name] = reason
            continue
        grams = hasher.ngrams(text)
        kept.append(file)
        sizes.append(len(grams))
        signatures.append(hasher.signature(grams))
    copies = drop_near_copies(np.array(sizes), np.array(signatures).reshape(len(kept), PERMUTATIONS))
    for i, j in copies.items():
        dropped[kept[i].name] = f"near-copy of {kept[j].name}"
    kept = [file for i, file in enumerate(kept) if i not in copies]
    package_bytes: dict[str, int] = {}
    for file in kept:
        package_bytes[file.package] = package_bytes.get(file.package, 0) + file.nbytes
    packages = split_packages(package_bytes, validation_share, test_share, seed)
    splits = {part: [f.name for f in kept if packages[f.package] == part] for part in ("train", "validation", "test")}
    return {"splits": splits, "packages": packages, "dropped": dict(sorted(dropped.items()))}


def build_code_corpus(root: str | os.PathLike, output: str | os.PathLike, vocab_size: int = 32768,
                      validation_share: float = 0.02, test_share: float = 0.02, workers: int = 1,
                      seed: int = 0) -> dict:
    """Plan the corpus, train the tokenizer on its training files, write the three datasets under
    `output` (train, validation, test; train_tokenizer/) and corpus.json; returns the manifest."""
    root, output = Path(root), Path(output)
    start = time.time()
    plan = plan_corpus(root, validation_share, test_share, seed)
    output.mkdir(parents=True, exist_ok=True)
    results = {"train": preprocess([str(root / f) for f in plan["splits"]["train"]], str(output / "train"),
                                   train_bpe_vocab=vocab_size, workers=workers, log_every=30)}
    for part in ("validation", "test"):
        results[part] = preprocess([str(root / f) for f in plan["splits"][part]], str(output / part),
                                   tokenizer_dir=results["train"].tokenizer_dir, workers=workers, log_every=0)
    reasons: dict[str, int] = {}
    for reason in plan["dropped"].values():
        key = "near-copy" if reason.startswith("near-copy") else reason
        reasons[key] = reasons.get(key, 0) + 1
    manifest = {"root": str(root), "seed": seed, "vocab_size": vocab_size,
                "tokenizer_dir": results["train"].tokenizer_dir, **plan, "dropped_by_reason": reasons,
                "files": {part: len(names) for part, names in plan["splits"].items()},
                "bytes": {part: sum((root / f).stat().st_size for f in names) for part, names in plan["splits"].items()},
                "tokens": {part: result.tokens for part, result in results.items()},
                "seconds": round(time.time() - start, 1)}
    (output / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def code_corpus_data(corpus: str, seq_length: int, micro_batch_size: int, global_batch_size: int,
                     seed: int = 1234):
    """A PreTrainingDataModule over a code corpus made by `build_code_corpus` (its directory):
    train, validation and test as its three datasets, with its tokenizer."""
    from falcon_h1.data.pretraining import PreTrainingDataModule

    problem = missing_corpus(corpus)
    if problem:
        raise ValueError(f"corpus={corpus}: {problem}")
    paths = {part: str(Path(corpus) / part) for part in ("train", "validation", "test")}
    # The tokenizer beside the datasets (preprocess names it after the training prefix), wherever
    # the corpus was moved after it was made.
    return PreTrainingDataModule(paths, str(Path(corpus) / "train_tokenizer"), seq_length=seq_length,
                                 micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, seed=seed)


def missing_corpus(corpus: str) -> str | None:
    """What is wrong with `corpus` as a code corpus directory, with the command that makes one (None: nothing)."""
    if (Path(corpus) / "corpus.json").is_file():
        return None
    return ("no corpus.json there; make it first with "
            f"`python -m falcon_h1.data.code_corpus --root SITE_PACKAGES --output {corpus}`")


def summary(manifest: dict) -> str:
    """What a user reads at the end: files, bytes and tokens of each split, and what was dropped."""
    lines = [f"code corpus from {manifest['root']} in {manifest['seconds']:.0f} s:"]
    for part in ("train", "validation", "test"):
        packages = sum(1 for split in manifest["packages"].values() if split == part)
        lines.append(f"  {part:<10} {packages:5d} packages {manifest['files'][part]:7d} files "
                     f"{manifest['bytes'][part] / 1e6:9.1f} MB {manifest['tokens'][part]:13,d} tokens")
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(manifest["dropped_by_reason"].items()))
    lines.append(f"  dropped: {dropped or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m falcon_h1.data.code_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="a folder of installed Python packages, e.g. site-packages")
    parser.add_argument("--output", required=True, help="where the datasets, tokenizer and corpus.json go")
    parser.add_argument("--vocab-size", type=int, default=32768, help="BPE vocabulary trained on the training files")
    parser.add_argument("--validation-share", type=float, default=0.02, help="share of the bytes held out")
    parser.add_argument("--test-share", type=float, default=0.02, help="share of the bytes held out")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--seed", type=int, default=0, help="which packages are held out")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: --root {args.root}: not a directory; give a folder of installed packages "
              "(e.g. python -c 'import site; print(site.getsitepackages()[0])')", file=sys.stderr)
        return 2
    for name in ("validation_share", "test_share"):
        if not 0 <= getattr(args, name) < 0.5:
            print(f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be in [0, 0.5)", file=sys.stderr)
            return 2
    try:
        manifest = build_code_corpus(args.root, args.output, args.vocab_size, args.validation_share,
                                     args.test_share, args.workers, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
