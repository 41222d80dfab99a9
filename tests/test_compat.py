"""falcon_h1/compat: the only place that patches third-party code, each patch guarded by version,
and each still needed: the third-party behaviour it works around is checked here, in a fresh
process that has not imported falcon_h1's patches."""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = ("torch", "megatron", "mamba_ssm", "lightning", "pytorch_lightning", "lightning_fabric",
               "transformers", "nemo_run", "triton")


def _patches_in(path: Path) -> list[str]:
    """Assignments to an attribute of a third-party module (or of a class it holds), setattr on
    one, and entries written into sys.modules, in one source file."""
    tree = ast.parse(path.read_text())
    imported = {}  # local name -> the module or object it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[(alias.asname or alias.name).split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def third_party(expr) -> bool:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and imported.get(expr.id, "").split(".")[0] in THIRD_PARTY

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and third_party(target.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)} = ...")
            if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "sys.modules":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)} = ...")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and third_party(node.args[0]):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_compat_package_patches_third_party_modules():
    compat = ROOT / "falcon_h1" / "compat"
    sources = [p for folder in ("falcon_h1", "recipes") for p in (ROOT / folder).rglob("*.py")
               if compat not in p.parents]
    found = [line for path in sources for line in _patches_in(path)]
    assert found == [], "patch third-party code in falcon_h1/compat only:\n" + "\n".join(found)
    # The check sees the patches that are there.
    assert any("clip_grads.l2_norm_impl" in line for line in _patches_in(compat / "megatron.py"))
    assert any("sys.modules['mamba_ssm']" in line for line in _patches_in(compat / "mamba_ssm_triton.py"))
    assert any("torch.cuda.current_device" in line for line in _patches_in(compat / "cpu.py"))


def test_a_patch_stops_on_an_untested_version_unless_allowed(monkeypatch):
    from falcon_h1 import compat

    compat.require_tested("megatron-core", "any")  # the installed version is the tested one
    monkeypatch.setitem(compat.TESTED, "megatron-core", "0.18.0")
    with pytest.raises(compat.UntestedVersion, match=r"megatron-core 0\.19\.2 is installed, but falcon_h1's patch "
                                                     r"'any' \(falcon_h1/compat\) was tested with megatron-core 0\.18"
                                                     r"\.0: install megatron-core==0\.18\.0"):
        compat.require_tested("megatron-core", "any")
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")
    compat.require_tested("megatron-core", "any")


def _fresh(code: str) -> dict:
    """Run `code` in a new interpreter (nothing of falcon_h1 imported) and return what it prints as JSON."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU debug mode does nothing where CUDA is")
def test_still_needed_megatron_reaches_for_cuda_that_the_cpu_lacks():
    result = _fresh("""
import json, torch
from megatron.core.tensor_parallel import random
errors = {}
for name, call in (("current_device", torch.cuda.current_device), ("Tensor.cuda", lambda: torch.zeros(1).cuda()),
                   ("cuda rng state", random._get_cuda_rng_state)):
    try:
        call()
        errors[name] = None
    except Exception as error:
        errors[name] = type(error).__name__
print(json.dumps(errors))
""")
    assert all(result.values()), result


def test_still_needed_megatron_clips_with_a_host_sync_per_tensor_without_apex():
    result = _fresh("""
import json
from megatron.core import utils
from megatron.core.optimizer import clip_grads, optimizer
print(json.dumps([clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm,
                  clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale,
                  optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale]))
""")
    assert result == [True, True, True]


def test_still_needed_megatron_refuses_the_weight_gradient_fusion_without_apex():
    result = _fresh("""
import json
from megatron.core.tensor_parallel import layers
print(json.dumps([layers._grad_accum_fusion_available, hasattr(layers, "fused_weight_gradient_mlp_cuda")]))
""")
    assert result == [False, False]


def test_still_needed_megatrons_checkpoint_results_queue_is_made_in_a_spawned_process():
    result = _fresh("""
import inspect, json
from megatron.core.dist_checkpointing.strategies import filesystem_async
print(json.dumps([inspect.signature(filesystem_async.get_write_results_queue).parameters["mp_mode"].default,
                  filesystem_async._results_queue is None]))
""")
    assert result == ["spawn", True]


def test_still_needed_megatrons_checkpoint_writer_opens_shards_by_the_name_open():
    """The checksums hook replaces that name; were the writer to open shards otherwise, the hook
    would do nothing (the manifest would still hash the files, after they are written)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    source = Path(filesystem_async.__file__).read_text()
    assert "open_file = open\n" in source


def test_still_needed_the_distributed_optimizer_load_wants_a_step_the_checkpoint_lacks(single_rank):
    """Megatron's loader asks for every state tensor of torch's Adam, `step` included, among a
    parameter's checkpoint tensors, where the fully-reshardable format has none."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    module = torch.nn.Linear(4, 3)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                        bucket_size=0), module)
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    for param in module.parameters():
        param.main_grad.normal_()
    optimizer.step()
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    group, order = inner.model_param_group_index_map[module.weight]
    main = inner.optimizer.param_groups[group]["params"][order]
    tensors = {name: torch.zeros_like(main) for name in ("param", "exp_avg", "exp_avg_sq")}
    with torch.no_grad():  # as in Megatron's load
        with pytest.raises(KeyError, match="step"):
            DistributedOptimizer._set_main_param_and_optimizer_states(inner, module.weight, tensors)
        inner._set_main_param_and_optimizer_states(module.weight, tensors)  # the patched one
    assert torch.equal(main, tensors["param"])


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm is not installed")
def test_still_needed_mamba_ssm_does_not_import_without_its_cuda_extensions():
    result = _fresh("""
import json
try:
    import mamba_ssm
    print(json.dumps(None))
except ImportError as error:
    print(json.dumps(str(error)))
""")
    if result is None:
        pytest.skip("this mamba_ssm was built with its CUDA extensions: the patch is not used here")
    assert result


def test_still_needed_the_distributed_optimizer_saves_states_past_a_padded_bucket_at_wrong_offsets(single_rank):
    """Four parameters of 99 elements in buckets of 150: each bucket's end is padded to 128. Megatron's
    fully-reshardable save gives the parameters after the first bucket their neighbours' states;
    the patched save (build_optimizer applies it) gives each its own."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer import TransformerConfig

    from falcon_h1.training.optim import build_optimizer, falcon_h1_optimizer_config

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, calculate_per_token_loss=True)
    module = torch.nn.Sequential(*[torch.nn.Linear(11, 9) for _ in range(4)])
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=True, bucket_size=150), module)
    optimizer = build_optimizer(falcon_h1_optimizer_config(lr=1e-2), [ddp], config)
    for param in module.parameters():
        param.main_grad.normal_()
    optimizer.step()
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    assert len(inner.buffers[0].buckets) == 4
    model_state = {name: ShardedTensor.from_rank_offsets(name, param) for name, param in ddp.module.named_parameters()}

    def saved_main_weights_match(save) -> list[bool]:
        state = save(model_state)
        matches = []
        for index, param in enumerate(inner.buffers[0].param_index_map):  # the save's order
            group, order = inner.model_param_group_index_map[param]
            main = inner.optimizer.param_groups[group]["params"][order]
            matches.append(torch.equal(state[index]["param"].data.flatten(), main.flatten()))
        return matches

    unpatched = saved_main_weights_match(lambda state: DistributedOptimizer.sharded_param_state_fully_reshardable(
        inner, state, metadata={}))
    assert unpatched[:2] == [True, True] and not any(unpatched[2:])  # the first bucket's two are right
    assert saved_main_weights_match(lambda state: inner.sharded_param_state_fully_reshardable(state, metadata={}))\
        == [True] * 8
