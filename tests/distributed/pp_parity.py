"""Run under torchrun with 2 ranks: a 2-stage pipeline (first stage: embedding + first half of the
layers; last stage: the rest + final norm + output layer), compared with transformers.

Activations go forward and their gradient back with point-to-point sends, as a pipeline schedule
would; tied embeddings get their gradients summed over the embedding group as Megatron's
finalize_model_grads does. Prints a JSON summary from the last stage.
"""

import argparse
import json
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="{}")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import parallel_state

    from falcon_h1.compat import cpu
    from falcon_h1.convert.mapping import canonical_to_local, hf_to_canonical
    from falcon_h1.model.config import config_from_hf
    from falcon_h1.model.model import FalconH1Model
    from falcon_h1.model.specs import local_layer_spec
    from falcon_h1.parity import make_hf_model, random_tokens, relative_error

    cpu.enable()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    cpu.model_parallel_manual_seed(1234)
    hf = make_hf_model(9, num_hidden_layers=4, **json.loads(args.config))
    config = config_from_hf(hf.config.to_dict(), pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                            use_cpu_initialization=True, kernel_backend="torch")
    first, last = rank == 0, rank == 1
    model = FalconH1Model(config, local_layer_spec(), pre_process=first, post_process=last).eval()
    layers = range(0, 2) if first else range(2, 4)
    model.load_state_dict(canonical_to_local(hf_to_canonical(dict(hf.state_dict()), config), config,
                                             layers=layers, pre_process=first, post_process=last), strict=True)

    tokens = random_tokens(hf.config, 2, 20, seed=4)
    projection = torch.randn(2, 20, hf.config.vocab_size, generator=torch.Generator().manual_seed(5))
    hf_logits = hf(input_ids=tokens).logits
    (hf_logits * projection).sum().backward()

    hidden_shape = (20, 2, config.hidden_size)
    if first:
        hidden = model(tokens)
        dist.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(hidden_shape)
        dist.recv(grad, src=1)
        hidden.backward(grad)
    else:
        received = torch.empty(hidden_shape)
        dist.recv(received, src=0)
        received.requires_grad_()
        model.set_input_tensor(received)
        logits = model(tokens, runtime_gather_output=True)[..., : hf.config.vocab_size]
        (logits * projection).sum().backward()
        dist.send(received.grad.contiguous(), dst=0)
    if config.share_embeddings_and_output_weights:
        shared = model.shared_embedding_or_output_weight()
        dist.all_reduce(shared.grad, group=parallel_state.get_embedding_group())

    hf_grads = hf_to_canonical({n: p.grad for n, p in hf.named_parameters()}, config)
    expected = canonical_to_local(hf_grads, config, layers=layers, pre_process=first, post_process=last)
    if config.share_embeddings_and_output_weights and last:
        expected["output_layer.weight"] = canonical_to_local(hf_grads, config)["embedding.word_embeddings.weight"]
    grad_errors = {n: relative_error(p.grad, expected[n]) for n, p in model.named_parameters()}
    summaries = [None, None]
    dist.all_gather_object(summaries, {"params": len(grad_errors), "grad_error": max(grad_errors.values()),
                                       "worst": max(grad_errors, key=grad_errors.get)})
    if last:
        print(json.dumps({"logits_error": relative_error(logits.detach(), hf_logits.detach()), "stages": summaries}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
