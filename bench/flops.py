"""This CPU's measured fp32 matmul peak, and the FLOPs a training step of a model does per token.

Achieved FLOP/s of training = 6 * N * tokens / train seconds, with N the weights that take part in a matrix
multiply for every token: all `nn.Linear` weights, the LM head included even when it is tied to the input
embeddings (the embedding lookup itself is no matmul). A forward pass costs 2N per token (a multiply and an
add per weight), the backward pass 4N (gradients of the activations and of the weights): 6N for a full
fine-tune. The attention products (QK^T, AV) are left out: at the <=160-token sequences benchmarked here they
add about 3% on SmolLM2-135M and 1% on the tiny model, so utilisation is slightly understated.
"""

import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 7) -> dict:
    """Median FLOP/s of square fp32 matmuls (2 n^3 FLOPs each) at torch's default threads; the best size is
    the peak. Into a preallocated output, so the timing is the kernel and not the allocator."""
    by_size = {}
    for n in sizes:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.matmul(a, b, out=out)  # warm-up: the first call pages the buffers in
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds.append(time.perf_counter() - start)
        by_size[n] = 2 * n**3 / statistics.median(seconds)
    return {"flops_by_size": by_size, "peak_flops": max(by_size.values()), "threads": torch.get_num_threads(),
            "dtype": "float32", "repeats": repeats}


def matmul_params(model_path: str, reward_model: bool) -> int:
    """N above, counted on an empty (meta-device) copy of the model: no weights are loaded."""
    config = AutoConfig.from_pretrained(model_path)
    if reward_model:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def training_flops_per_token(model_path: str, reward_model: bool) -> int:
    return 6 * matmul_params(model_path, reward_model)
