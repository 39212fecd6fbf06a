"""Next-token selection on the device, with Hugging Face generate's semantics and no host sync.

Same order and rules as HF's logits processors: repetition penalty (divide positive, multiply negative logits
of tokens already present), then, when sampling, temperature, top-k, top-p. The draw is an exponential race
(argmax of p / E with E ~ Exp(1)), which samples exactly from p but, unlike torch.multinomial, never checks
its input on the host, so it can be captured in a CUDA graph (the default generator's philox state advances
on every replay). `generation_settings` resolves unset arguments the way model.generate does.
"""
import functools
import inspect
import numbers
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=None)
def hf_penalises_left_padding() -> bool:
    """Whether the installed transformers' repetition penalty counts left-padding tokens of the prompt.

    Up to 5.17 `generate` builds RepetitionPenaltyLogitsProcessor(penalty) over every prompt column, padding
    included; later versions pass prompt_ignore_length = each row's first real column. Read from the source of
    the method that builds the processors, so it follows the version actually installed; without sources, from
    whether the processor takes per-row ignore lengths (added in the same change).
    """
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    from transformers.generation.utils import GenerationMixin

    try:
        return "prompt_ignore_length" not in inspect.getsource(GenerationMixin._get_logits_processor)
    except (OSError, TypeError):
        try:
            RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.zeros(1, dtype=torch.long))
        except ValueError:
            return True
        return False


# generation_config settings that select logits processors or modes this loop does not implement.
UNSUPPORTED_SETTINGS = ("min_length", "min_new_tokens", "num_beams", "num_return_sequences", "no_repeat_ngram_size",
                         "bad_words_ids", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "suppress_tokens",
                         "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                         "exponential_decay_length_penalty", "renormalize_logits", "remove_invalid_values",
                         "guidance_scale", "watermarking_config", "encoder_repetition_penalty")


def generation_settings(model, prompt_width, **given):
    """kvkernels.generate's settings (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
    each argument given, else model.generation_config's, else HF's global default, as in model.generate.
    prompt_width: P of the (padded) input_ids. Raises for generation_config settings it does not implement."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig()
    defaults = GenerationConfig._get_default_generation_params()

    def setting(name):
        value = getattr(config, name, None)
        return defaults.get(name) if value is None else value

    unsupported = [f"{name}={setting(name)!r}" for name in UNSUPPORTED_SETTINGS if setting(name) != defaults.get(name)]
    if unsupported:
        raise NotImplementedError(f"kvkernels.generate does not implement {', '.join(unsupported)} from the model's "
                                  "generation_config; use model.generate (kvkernels.patch) for those")
    settings = {name: setting(name) if value is None else value for name, value in given.items()}
    if settings["max_new_tokens"] is None:
        if config.max_length is not None:           # a configured max_length counts the (padded) prompt
            settings["max_new_tokens"] = config.max_length - prompt_width
        else:                                       # HF's default: 20 new tokens, capped at the positions
            settings["max_new_tokens"] = min(defaults["max_length"] + prompt_width,
                                             model.config.max_position_embeddings) - prompt_width
    return settings


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        if not self.do_sample:   # greedy ignores the sampling settings, as HF's generate does (it warns): one
            for name in ("temperature", "top_k", "top_p"):     # greedy session (and graph) whatever they say
                object.__setattr__(self, name, type(self).__dataclass_fields__[name].default)
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


def process_logits(logits, params: SamplingParams, seen=None):
    """logits: float32 [B, V]; seen: bool [B, V], tokens present so far (needed with a repetition penalty).

    Returns the scores HF's processors would produce (-inf for filtered tokens), a new tensor.
    """
    scores = logits
    if params.uses_penalty:
        penalised = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if not params.do_sample:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[..., -1:]                          # [B, 1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1:] = False                                                      # keep at least one
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def select_tokens(scores, params: SamplingParams):
    """int64 [B]: argmax of scores [B, V], or a draw from softmax(scores) when sampling."""
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)
