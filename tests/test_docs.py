"""Docs are tests: every shell command and Python block in README.md and docs/*.md runs in CI as
written, or says in the doc which check covers it.

The convention (enforced by test_every_runnable_block_has_one_status_and_an_existing_check):

- Every code block is fenced and names its language: ```bash (shell commands), ```python (a
  script), ```text (output, directory trees, formulas: never run). Indented code blocks and fences
  without a language are refused.
- A bash or python block is run by test_doc_block_runs_as_written unless the line right above its
  fence is a marker naming another status and the check that covers it:

      <!-- doc-test: gpu-only; covered by tests/gpu/test_gpu_recipes.py -->
      <!-- doc-test: cluster-only; covered by tests/gpu/run.sh (test_gpu_recipes.py) -->
      <!-- doc-test: ci; covered by tests/test_main_job.py, Makefile (make test is what CI runs) -->

  gpu-only: needs GPUs; cluster-only: needs several nodes or Slurm; ci: runs on CPU in CI, through
  the named check (so this test does not run it again). A check is `PATH` or `PATH::NAME` (a test
  function, or a Makefile target); every one named must exist. Parenthesised text is a note.
- Run blocks of one doc run in document order in one scratch working directory, on the CPU, with
  this Python's bin directory (falcon-h1, python, torchrun) first on PATH: a later block may use what
  an earlier one wrote, as a reader following the doc would. A bash block stops at its first failing
  command and names it; a python block runs as a plain script (`python FILE`).
- The working directory holds what the docs name as the reader's own files, made by the test
  (FIXTURES below), and nothing else; a fixture is laid out only for docs whose run blocks name it.
"""

import shutil

import pytest

from tests.conftest import REPO
from tests.doc_blocks import (STATUSES, block_environment, build_checkpoint, build_code_dir, build_hf_dir,
                              build_parquet_dir, build_sft_jsonl, build_tokenizer, build_web_jsonl, parse_doc,
                              run_block, status_problems)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# The only substitutions: what the docs name as the reader's own files -> what CI puts there.
FIXTURES = {
    # path in the working directory: (where a doc names it, and as what; the builder, tests/doc_blocks.py)
    "tok/": ("README.md, docs/recipes.md: your data's tokenizer", build_tokenizer),  # the bundled corpus's
    "web.jsonl": ("README.md, docs/recipes.md: your text, one {\"text\": ...} per line",
                  build_web_jsonl),  # paragraphs of Python's help topics
    "code/": ("README.md, docs/training.md: a directory of your source files", build_code_dir),  # stdlib json, email, http
    "parquet/": ("docs/training.md: your web text as Parquet files", build_parquet_dir),  # help topics, 3 files
    "sft.jsonl": ("README.md, docs/recipes.md: your prompt/response pairs", build_sft_jsonl),  # 256 made-up pairs
    "hf/falcon-h1-1.5b": ("docs/conversion.md: a Hugging Face Falcon-H1 directory, e.g. a download",
                          build_hf_dir),  # the tiny preset saved by transformers, random weights
    "runs/tiny/checkpoints/step=0000300": ("README.md, docs/conversion.md: the checkpoint `make run` writes",
                                           build_checkpoint),  # the main job, 4 steps instead of 300
}


def all_blocks():
    blocks, problems = [], []
    for doc in DOCS:
        found, wrong = parse_doc(doc, REPO)
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, PROBLEMS = all_blocks()
RUN_BLOCKS = [b for b in BLOCKS if b.runnable and b.status == "run"]


def test_every_runnable_block_has_one_status_and_an_existing_check():
    runnable = [b for b in BLOCKS if b.runnable]
    print(f"\n{'block':<24} {'lang':<7} {'status':<13} {'first line':<60} covered by")
    for b in runnable:
        first = next((line for line in b.code.splitlines() if line.strip()), "")
        print(f"{b.id:<24} {b.lang:<7} {b.status:<13} {first[:58]:<60} {', '.join(b.covered_by) or '-'}")
    counts = {status: sum(b.status == status for b in runnable) for status in STATUSES}
    print(f"{len(runnable)} runnable blocks: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    for status, meaning in STATUSES.items():
        print(f"  {status}: {meaning}")
    problems = PROBLEMS + [p for b in runnable for p in status_problems(b, REPO)]
    assert not problems, "\n".join(problems)
    assert RUN_BLOCKS, "no block runs: the harness found nothing to test"


class DocRuns:
    """One scratch working directory per doc, with the fixtures its run blocks name; the run blocks
    of a doc run once each, in document order."""

    def __init__(self, root):
        self.root, self.results, self.built = root, {}, {}
        self.env = block_environment(root / "nemo_run")

    def run(self, block):
        """The result of `block`, after running the run blocks above it in its doc."""
        for earlier in [b for b in RUN_BLOCKS if b.doc == block.doc and b.line <= block.line]:
            if earlier.id not in self.results:
                self.results[earlier.id] = run_block(earlier, self.workdir(earlier.doc), self.root / "blocks", self.env)
        return self.results[block.id]

    def failed_above(self, block):
        return [b.id for b in RUN_BLOCKS if b.doc == block.doc and b.line < block.line and not self.results[b.id].ok]

    def workdir(self, doc):
        path = self.root / "work" / doc.replace("/", "_")
        if not path.exists():
            path.mkdir(parents=True)
            named = "\n".join(b.code for b in RUN_BLOCKS if b.doc == doc)
            for name in FIXTURES:
                if name in named:
                    self.lay_out(name, path / name)
        return path

    def lay_out(self, name, destination):
        """Copy fixture `name` (built once per session) to `destination`."""
        if name not in self.built:
            (self.root / "fixtures").mkdir(exist_ok=True)
            self.built[name] = FIXTURES[name][1](self.root / "fixtures" / name.strip("/").replace("/", "_"))
        destination.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if self.built[name].is_dir() else shutil.copy)(self.built[name], destination)


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory):
    return DocRuns(tmp_path_factory.mktemp("docs"))


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs_as_written(doc_runs, block):
    result = doc_runs.run(block)
    print(f"{block.id}: {result.seconds:.0f} s, {result.cpu_seconds:.0f} CPU s")
    above = doc_runs.failed_above(block)
    assert result.ok, (f"{block.id} failed (exit {result.returncode})"
                       + (f"; blocks above it failed too: {', '.join(above)}" if above else "")
                       + f":\n{block.code}\n--- output:\n{result.output[-6000:]}")


SCRATCH_DOC = """# A scratch doc

```bash
falcon-h1 pretrain --factory no_such_recipe --dryrun
```

```python
from falcon_h1.data.preprocess import mian

mian(["--input", "corpus.jsonl", "--output-prefix", "data", "--train-bpe", "512"])
```

<!-- doc-test: gpu-only; covered by tests/gpu/test_no_such_file.py -->
```bash
falcon-h1 pretrain --factory falcon_h1_7b -y
```

<!-- doc-test: gpu-only; covered by tests/test_docs.py::test_no_such_test -->
```bash
falcon-h1 pretrain --factory falcon_h1_7b -y
```

<!-- doc-test: gpu-only; covered by tests/test_docs.py -->
<!-- doc-test: cluster-only; covered by tests/test_docs.py -->
```bash
falcon-h1 pretrain --factory falcon_h1_34b -y
```

<!-- doc-test: on-a-laptop; covered by tests/test_docs.py -->
```bash
falcon-h1 pretrain --factory tiny -y
```

    falcon-h1 pretrain --factory tiny

```
a fence without a language
```
"""


def test_a_broken_command_in_a_doc_fails_the_harness(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "scratch.md").write_text(SCRATCH_DOC)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_docs.py").write_text("def test_something(): pass\n")
    blocks, problems = parse_doc(tmp_path / "docs" / "scratch.md", tmp_path)

    # Each line of the scratch doc that breaks the convention is named.
    problems += [p for b in blocks for p in status_problems(b, tmp_path)]
    assert sorted(problems, key=lambda p: int(p.split(":")[1])) == [
        "docs/scratch.md:14: covering check 'tests/gpu/test_no_such_file.py' is not a file of the repository",
        "docs/scratch.md:19: tests/test_docs.py has no 'test_no_such_test'",
        "docs/scratch.md:23: doc-test marker not directly above a fence",  # two statuses for one block
        "docs/scratch.md:30: status 'on-a-laptop'; use one of run, gpu-only, cluster-only, ci",
        "docs/scratch.md:34: indented code block; fence it with a language (bash, python, text)",
        "docs/scratch.md:36: fence language ''; use one of bash, python, text",
    ]

    # The two run blocks fail when run, the bash one naming the command that failed.
    bash, python = [b for b in blocks if b.status == "run"]
    env = block_environment(tmp_path / "nemo_run")
    work = tmp_path / "work"
    work.mkdir()
    result = run_block(bash, work, tmp_path / "blocks", env)
    assert not result.ok
    assert "doc-test: this command failed (exit 2): falcon-h1 pretrain --factory no_such_recipe --dryrun" in result.output
    result = run_block(python, work, tmp_path / "blocks", env)
    assert not result.ok and "cannot import name 'mian'" in result.output, result.output[-2000:]
