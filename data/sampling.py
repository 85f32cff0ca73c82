"""The model side of `make prefs` (data.collect): K sampled replies per prompt from the policy. Apart from the
stage so that an unchanged prefs stage is passed without loading torch and transformers."""

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, set_seed

from common.modeling import generate_replies, load_causal_lm
from common.precision import Compute
from data.collect import CollectConfig


def sample_candidates(config: CollectConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                      compute: Compute) -> list[dict]:
    model = load_causal_lm(config.policy, compute.dtype).to(compute.device)
    set_seed(config.seed)
    k = config.samples_per_prompt
    rows = []
    bar = tqdm(range(0, len(prompts), config.prompts_per_batch), desc="prefs: sampling", unit="batch")
    for start in bar:
        batch = prompts[start:start + config.prompts_per_batch]
        with compute.autocast():
            replies, finished = generate_replies(model, tokenizer, batch, config.max_new_tokens, do_sample=True,
                                                 temperature=config.temperature, num_return_sequences=k,
                                                 what="prefs", backend=config.generation_backend)
        rows.extend({"prompt": prompt, "responses": replies[i * k:(i + 1) * k], "finished": finished[i * k:(i + 1) * k]}
                    for i, prompt in enumerate(batch))
    return rows
