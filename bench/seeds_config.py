"""The five seed tutorials' experiments, as they wrote them: everything `bench.seeds` needs, kept in the repository.

The seeds are five public KV-caching tutorials (notebooks and blog posts) the project started from; the team
keeps copies under the file names below. Each entry names its tutorial and quotes, with line numbers in that
copy, the lines each setting and reported number comes from. Prompt token counts are exact: GPT-2's BPE
(`kvkernels.tokenizer`), checked by tests/test_bench.py; `001`'s own printout confirms its 9 + 500 = 509.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Seed:
    file: str                  # the team's copy of the tutorial
    title: str                 # the tutorial's own title and kind
    model: str                 # Hub name; the shape comes from bench.models.GPT2_SHAPES
    prompt: str
    prompt_tokens: int         # GPT-2 BPE tokens of `prompt`
    new_tokens: int
    repeats: int
    loop: str                  # "generate": model.generate; "manual": the seed's own forward + sampling loop
    reported: dict             # what the seed printed, in seconds
    reported_note: str
    quotes: tuple              # (line number in `file`, the line) for every setting and number above
    sampling: dict = field(default_factory=dict)   # empty: greedy


SEEDS = (
    Seed("000_1c26905cc51473b9.txt", "'LLM KV Caching', a Google Colab notebook", "distilgpt2",
         "Once upon a time, in a land far away", 10, 50, 1, "generate",
         {"no_cache_s": 4.21, "cache_s": 1.46},
         "one run each, no warm-up; a Colab notebook (GPU not named, `model.to('cuda')` if available)",
         ((23, 'MODEL_NAME = "distilgpt2"'), (66, 'PROMPT = "Once upon a time, in a land far away"'),
          (69, "MAX_NEW_TOKENS = 50"), (120, "Time: 4.21 seconds"),
          (181, "Time: 1.46 seconds"))),
    Seed("001_7e3bb900a5ad3f87.txt", "'KV Cache', a Jupyter notebook with its own sampling loop", "gpt2",
         "The quick brown fox jumps over the lazy dog", 9, 500, 1, "manual",
         {"no_cache_s": 13.410, "cache_s": 4.752},
         "one run each after one warm-up forward; 'Device: cuda' (GPU not named); 37.3 vs 105.2 tokens/s",
         ((9, 'MODEL_NAME = "gpt2"'), (10, 'PROMPT     = "The quick brown fox jumps over the lazy dog"'),
          (11, "NUM_TOKENS = 500"), (13, "TEMPERATURE = 0.7"), (14, "TOP_K = 50"), (15, "TOP_P = 0.9"),
          (16, "REPETITION_PENALTY = 1.2"), (151, "Time taken: 4.752 s"),
          (160, "Time taken: 13.410 s")),
         {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.2}),
    Seed("002_abbfe1c15e9d0f8a.txt", "a blog post on KV caching ('Why LLMs Have Terrible Short-Term Memory')",
         "gpt2-medium", "Explain KV caching in transformers.", 9, 1000, 5, "generate",
         {"no_cache_s": 107.4, "cache_s": 21.7}, "mean of 5 runs 'on a typical GPU'",
         ((30, 'model_name = "gpt2-medium"'), (33, 'prompt = "Explain KV caching in transformers."'),
          (38, "for _ in range(5):"), (44, "max_new_tokens=1000"), (53, "- with KV caching: 21.7 seconds"),
          (54, "- without KV caching: 107.4 seconds"))),
    Seed("003_bf0e7c9b24d8eaab.txt", "'KV Caching: Key-Value caching inference optimization for LLMs', a Quarto "
         "notebook", "gpt2", "What is KV caching?", 6, 1000, 10, "generate",
         {"no_cache_s": None, "cache_s": 108.446, "cache_std_s": 10.526},
         "T4 GPU, mean ± std of 10 runs; the file cuts off before the no-cache result",
         ((215, "We benchmarked the code above with/without kv caching on a T4 GPU"),
          (224, 'tokenizer = AutoTokenizer.from_pretrained("gpt2")'), (229, "for _ in range(10):"),
          (231, 'model.generate(**tokenizer("What is KV caching?", return_tensors="pt").to(device), '
                'use_cache=use_cache, max_new_tokens=1000)'),
          (262, "with KV caching: 108.446 +- 10.526 seconds"))),
    Seed("004_61c353e2bfd0d447.txt", "'Optimizing Token Generation with KV Caching', a blog post", "gpt2-medium",
         "Explain KV caching in transformers.", 9, 1000, 5, "generate",
         {"no_cache_s": 107, "cache_s": 21.7}, "'from over 107 seconds ... to around 21.7 seconds', 5 runs; device "
         "not stated",
         ((28, 'model_name = "gpt2-medium"'), (32, 'prompt = "Explain KV caching in transformers."'),
          (38, "for _ in range(5):"), (43, "max_new_tokens=1000"),
          (52, "from over 107 seconds without caching to around 21.7 seconds with caching"))),
)
