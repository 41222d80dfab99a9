"""The docs-as-tests harness: find the code blocks of a Markdown file, read their doc-test markers,
check the covering checks named exist, and run a block in a working directory.

The convention it enforces is described in tests/test_docs.py. Parsing is CommonMark
(markdown-it-py, which rich brings with nemo-run), so a fence inside a list item is found and an
indented code block is told apart from a list item's continuation lines.
"""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

from tests.conftest import run_session

LANGUAGES = ("bash", "python", "text")  # text: output, listings, formulas (never run)
RUNNABLE = ("bash", "python")
STATUSES = {
    "run": "run by tests/test_docs.py as written, on the CPU",
    "gpu-only": "needs GPUs; the named check runs it (or its equivalent) on a GPU machine",
    "cluster-only": "needs several GPU nodes or a Slurm cluster; the named check covers it",
    "ci": "runs on the CPU in CI through the named check instead (e.g. `make test` is CI itself)",
}
MARKER = re.compile(r"<!--\s*doc-test:\s*(?P<status>[\w-]+)\s*;\s*covered by\s+(?P<checks>.+?)\s*-->\s*$", re.S)
CHECK = re.compile(r"^(?P<path>[\w./-]+)(::(?P<name>[\w-]+))?$")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    status: str  # one of STATUSES for bash/python blocks, "" for text
    covered_by: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE


def parse_doc(path: Path, root: Path) -> tuple[list[Block], list[str]]:
    """(the code blocks of the Markdown file `path`, the convention's violations as 'doc:line: what')."""
    doc = str(path.relative_to(root))
    blocks, problems, markers = [], [], {}
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        line = token.map[0] + 1 if token.map else 0
        if token.type == "html_block" and "doc-test" in token.content:
            markers[token.map[1]] = (line, token.content.strip())
        elif token.type == "code_block":
            problems.append(f"{doc}:{line}: indented code block; fence it with a language ({', '.join(LANGUAGES)})")
        elif token.type == "fence":
            lang = token.info.strip().split(" ")[0]
            if lang not in LANGUAGES:
                problems.append(f"{doc}:{line}: fence language {lang!r}; use one of {', '.join(LANGUAGES)}")
                continue
            marker = markers.pop(token.map[0], None)
            status, checks = "run" if lang in RUNNABLE else "", ()
            if marker:
                found = MARKER.match(marker[1])
                if lang not in RUNNABLE:
                    problems.append(f"{doc}:{marker[0]}: doc-test marker before a {lang} block (only bash and python run)")
                elif not found:
                    problems.append(f"{doc}:{marker[0]}: malformed marker {marker[1]!r}; write "
                                    "<!-- doc-test: STATUS; covered by PATH[::TEST][, ...] [(note)] -->")
                else:
                    status = found["status"]
                    checks = tuple(c.strip() for c in re.sub(r"\([^)]*\)", "", found["checks"]).split(",") if c.strip())
            blocks.append(Block(doc, line, lang, token.content, status, checks))
    problems += [f"{doc}:{line}: doc-test marker not directly above a fence" for line, _ in markers.values()]
    return blocks, problems


def status_problems(block: Block, root: Path) -> list[str]:
    """Why `block`'s status is not acceptable: an unknown status, a non-run status without a covering
    check, or a covering check (PATH or PATH::NAME) that does not exist in the repository."""
    if block.status not in STATUSES:
        return [f"{block.id}: status {block.status!r}; use one of {', '.join(STATUSES)}"]
    if block.status == "run":
        return []
    if not block.covered_by:
        return [f"{block.id}: {block.status} block names no covering check"]
    problems = []
    for check in block.covered_by:
        found = CHECK.match(check)
        file = root / found["path"] if found else None
        if not found or not file.is_file():
            problems.append(f"{block.id}: covering check {check!r} is not a file of the repository")
        elif found["name"] and not re.search(rf"(def |^){re.escape(found['name'])}\b", file.read_text(), re.M):
            problems.append(f"{block.id}: {found['path']} has no {found['name']!r}")
    return problems


@dataclass
class BlockRun:
    returncode: int
    output: str
    seconds: float  # wall-clock
    cpu_seconds: float  # user + system time of the block's processes

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def block_environment(nemorun_home: Path) -> dict[str, str]:
    """The user's environment with this Python's bin directory first on PATH (where `pip install -e .`
    put `falcon-h1`, `python`, `torchrun`) and nemo-run's home outside the working directory."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "falcon-h1").exists():
        raise RuntimeError(f"{bin_dir}/falcon-h1 missing: install the package (`pip install -e .`) into this Python")
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", NEMORUN_HOME=str(nemorun_home))


def run_block(block: Block, cwd: Path, script_dir: Path, env: dict[str, str], timeout: float = 600) -> BlockRun:
    """Run `block` as written with `cwd` as the working directory: bash stops at the first failing
    command and names it; python runs as a plain script (`python FILE`). The block's whole process
    group is killed at the end (a trainer can leave checkpoint-writer processes behind)."""
    script_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"\W", "_", block.id)
    if block.lang == "bash":
        script = script_dir / f"{name}.sh"
        script.write_text("set -eo pipefail\n"
                          "trap 'echo \"doc-test: this command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n"
                          + block.code)
        command = ["bash", str(script)]
    else:
        script = script_dir / f"{name}.py"
        script.write_text(block.code)
        command = ["python", str(script)]
    start, cpu_start = time.monotonic(), children_cpu_seconds()
    code, output = run_session(command, cwd, env, timeout)
    if code is None:
        code, output = -signal.SIGKILL, output + f"\ndoc-test: timed out after {timeout:.0f} s\n"
    return BlockRun(code, output, time.monotonic() - start, children_cpu_seconds() - cpu_start)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# The reader's files that the docs name (tests/test_docs.py: FIXTURES). Each builder writes its
# fixture at `path` and returns it.

def build_tokenizer(path: Path) -> Path:
    """The bundled corpus's tokenizer (a Hugging Face tokenizer directory)."""
    import shutil

    from falcon_h1.data.default_corpus import default_corpus

    return Path(shutil.copytree(default_corpus().tokenizer_dir, path))


def build_web_jsonl(path: Path) -> Path:
    """Prose, one {"text": ...} document per line: the paragraphs of Python's help topics."""
    import json

    from pydoc_data.topics import topics

    paragraphs = [p.strip() for topic in topics.values() for p in topic.split("\n\n") if len(p.strip()) > 200]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def build_parquet_dir(path: Path) -> Path:
    """A Parquet dataset as web corpora come (FineWeb's layout): files of rows with a "text" column
    and others beside it; the paragraphs of Python's help topics, over three files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for topic in topics.values() for p in topic.split("\n\n") if len(p.strip()) > 200]
    path.mkdir(parents=True)
    for part in range(3):
        rows = paragraphs[part::3]
        table = pa.table({"id": [f"{part}-{i}" for i in range(len(rows))], "text": rows,
                          "language": ["en"] * len(rows)})
        pq.write_table(table, path / f"train-{part:05d}-of-00003.parquet")
    return path


def build_code_dir(path: Path) -> Path:
    """Source files: the standard library's json, email and http packages."""
    import shutil

    stdlib = Path(os.__file__).parent
    for package in ("json", "email", "http"):
        shutil.copytree(stdlib / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return path


def build_sft_jsonl(path: Path) -> Path:
    """Prompt/response pairs a model can learn: print a number times a small factor."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"n = {i}\n", "response": f"print(n * {i % 4})"}) + "\n"
                            for i in range(256)))
    return path


def build_hf_dir(path: Path) -> Path:
    """A Hugging Face Falcon-H1 directory: the tiny preset written by transformers (random weights)
    with the bundled corpus's tokenizer."""
    import shutil

    import torch

    from falcon_h1.data.default_corpus import default_corpus
    from falcon_h1.model.config import config_to_hf
    from falcon_h1.model.presets import preset_config
    from falcon_h1.convert.hf_modeling import hf_falcon_h1

    transformers = hf_falcon_h1()
    torch.manual_seed(0)
    model = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**config_to_hf(preset_config("tiny"))))
    model.save_pretrained(path)
    for file in Path(default_corpus().tokenizer_dir).iterdir():
        if file.is_file():
            shutil.copy(file, path / file.name)
    return path


def build_checkpoint(path: Path) -> Path:
    """A checkpoint of the main job (`python -m falcon_h1.train`, what `make run` runs), 4 steps."""
    run = path.parent / f"{path.name}_run"
    done = subprocess.run([sys.executable, "-m", "falcon_h1.train", "--log-dir", str(run), "--max-steps", "4",
                           "--val-batches", "1", "--checkpoint-every", "4"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the main job failed to make the checkpoint fixture:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return run / "checkpoints" / "step=0000004"
