"""The code corpus from installed packages (falcon_h1/data/code_corpus.py): generated files and
near-copies are left out, and validation and test are whole packages the training split never saw."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from falcon_h1.data import code_corpus

WORDS = ["alpha", "beta", "gamma", "delta", "value", "result", "index", "count", "total", "name", "path", "item"]


def _module(seed: int, functions: int = 12) -> str:
    """A plausible Python module whose text differs from every other seed's."""
    rng = random.Random(seed)
    lines = []
    for f in range(functions):
        args = ", ".join(rng.sample(WORDS, 3))
        lines += [f"def {rng.choice(WORDS)}_{seed}_{f}({args}):",
                  f"    {rng.choice(WORDS)} = {rng.choice(WORDS)} + {rng.randint(0, 999)} * {rng.choice(WORDS)}",
                  f"    return [{rng.choice(WORDS)} for {rng.choice(WORDS)} in range({rng.randint(1, 99)})]", ""]
    return "\n".join(lines) + "\n"


@pytest.fixture
def site(tmp_path) -> Path:
    """A site-packages of 12 packages of 4 modules each, one large package, and the files to drop."""
    root = tmp_path / "site-packages"
    seed = 0
    for p in range(12):
        for m in range(4):
            seed += 1
            path = root / f"pkg{p}" / f"mod{m}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_module(seed))
    for m in range(20):  # a package larger than MAX_HELD_OUT_PACKAGE of the corpus
        (root / "bigpkg").mkdir(exist_ok=True)
        (root / "bigpkg" / f"mod{m}.py").write_text(_module(1000 + m, functions=30))
    (root / "single_module.py").write_text(_module(500))
    (root / "pkg0" / "messages_pb2.py").write_text(_module(600))
    (root / "pkg1" / "tables.py").write_text("TABLE = [" + ", ".join(str(i) for i in range(400)) + "]\n")
    (root / "pkg2" / "stubs.py").write_text("# This file is auto-generated. Do not edit.\n" + _module(700))
    vendored = _module(3).replace("return", "return  ", 1)  # pkg0/mod2.py, copied with one change
    (root / "pkg5" / "vendored_copy.py").write_text(vendored)
    (root / "pkg6-1.0.dist-info").mkdir()
    (root / "pkg6-1.0.dist-info" / "not_code.py").write_text(_module(800))
    return root


def test_generated_files_and_near_copies_are_dropped_and_say_why(site):
    plan = code_corpus.plan_corpus(site, validation_share=0.1, test_share=0.1)
    assert plan["dropped"]["pkg0/messages_pb2.py"] == "protobuf module"
    assert plan["dropped"]["pkg1/tables.py"] == f"a line over {code_corpus.MAX_LINE} characters"
    assert plan["dropped"]["pkg2/stubs.py"] == "says it is generated"
    assert plan["dropped"]["pkg5/vendored_copy.py"] == "near-copy of pkg0/mod2.py"
    assert len(plan["dropped"]) == 4  # distinct modules all stay
    every = [name for names in plan["splits"].values() for name in names]
    assert len(every) == 12 * 4 + 20 + 1 and not any("dist-info" in name for name in every)


def test_held_out_splits_are_whole_packages_and_the_largest_package_trains(site):
    plan = code_corpus.plan_corpus(site, validation_share=0.1, test_share=0.1)
    where = {}
    for split, names in plan["splits"].items():
        for name in names:
            package = name.split("/")[0] if "/" in name else Path(name).stem
            where.setdefault(package, set()).add(split)
    assert all(len(splits) == 1 for splits in where.values()), where
    assert plan["packages"]["bigpkg"] == "train"
    assert plan["splits"]["validation"] and plan["splits"]["test"]
    # Another seed holds out other packages.
    other = code_corpus.plan_corpus(site, validation_share=0.1, test_share=0.1, seed=1)
    assert other["packages"] != plan["packages"]


def test_minhash_estimates_the_jaccard_similarity_of_8gram_sets():
    hasher = code_corpus.MinHasher(permutations=256)
    a = hasher.ngrams(_module(1, functions=40))
    b = hasher.ngrams(_module(1, functions=40)[: len(_module(1, functions=40)) // 2] + _module(2, functions=20))
    exact = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    estimate = (hasher.signature(a) == hasher.signature(b)).mean()
    assert abs(estimate - exact) < 0.1, (estimate, exact)
    assert (hasher.signature(a) == hasher.signature(hasher.ngrams(_module(9, functions=40)))).mean() < 0.1


def test_the_corpus_is_built_and_its_summary_printed(site, tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, "-m", "falcon_h1.data.code_corpus", "--root", str(site), "--output",
                           str(out), "--vocab-size", "400", "--validation-share", "0.1", "--test-share", "0.1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "corpus.json").read_text())
    for split in ("train", "validation", "test"):
        assert (out / f"{split}.bin").is_file() and manifest["tokens"][split] > 0
        assert f"{split} " in proc.stdout
    assert manifest["dropped_by_reason"] == {"protobuf module": 1, f"a line over {code_corpus.MAX_LINE} characters": 1,
                                             "says it is generated": 1, "near-copy": 1}
    assert "dropped: 1 a line over" in proc.stdout


def test_a_root_without_code_is_one_line_error(tmp_path):
    for root, message in ((tmp_path / "missing", "not a directory"), (tmp_path, "no .py files there")):
        proc = subprocess.run([sys.executable, "-m", "falcon_h1.data.code_corpus", "--root", str(root),
                               "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr
