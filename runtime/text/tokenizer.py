"""Text <-> token ids for every checkpoint the runtime loads, plus chat templates.

All tokenization runs in the Hugging Face `tokenizers` library or in Google's
`sentencepiece` library; this module only chooses and wires up their parts:

- `tokenizer.json` (HF fast tokenizer) is loaded as is.
- `vocab.json` + `merges.txt` (GPT-2 / OPT) or GPT-2's original `encoder.json`
  + `vocab.bpe` become a byte-level BPE (Radford et al. 2019, "Language Models
  are Unsupervised Multitask Learners", section 2.2: BPE over UTF-8 bytes).
- `tokenizer.model` (Llama 2) runs in sentencepiece (Kudo & Richardson 2018).
- A GGUF file's embedded vocabulary (GGUF spec, `tokenizer.ggml.*` keys in
  ggml's docs/gguf.md) becomes a `tokenizers.Tokenizer`:
  'gpt2' vocabularies a byte-level BPE; 'llama' (SentencePiece pieces with
  scores) the equivalent BPE with byte fallback. SentencePiece's BPE merges,
  at each step, the adjacent pair whose joined piece has the highest score
  (Sennrich et al. 2016 with SentencePiece's scoring), so every split of a
  piece into two in-vocabulary pieces is a merge ranked by that piece's score.

`StreamDecoder` turns a growing id sequence into text pieces that never split
a UTF-8 character, by decoding a short tail window and emitting only the part
that is new and complete (the method of HF text-generation-inference's
`decode_token`). Chat templates are Jinja2, rendered in a bounded sandbox by
runtime/text/chat_template.py (imported only for a chat prompt; sentencepiece
and gguf, likewise, only for the files that need them).
"""

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from runtime.checkpoints.atomic import write_text
from runtime.checkpoints.checkpoint import read_json
from runtime.errors import UserError
from runtime.checkpoints.safetensors_io import require_regular_file

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_BYTE = 6

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence

# Special tokens that end a turn; llama.cpp treats these as end-of-generation too.
END_OF_GENERATION_TOKENS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
    "<end_of_turn>", "<|end_of_text|>",
})

# GGUF `tokenizer.ggml.pre` names whose pre-tokenizer is GPT-2's regex alone.
GPT2_PRE_NAMES = frozenset({"default", "gpt2", "gpt-2"})

# Text used to check that a SentencePiece model converts to tokenizer.json exactly.
SPM_PROBE_TEXT = "Hello  world\n\tÄpfel ½ ﬁ Ｈ 1314 🚀 我想在 нещо ' era"


class Tokenizer:
    """A model's tokenizer: encode, decode, stream, chat template, save.

    Attributes: `bos_id` (None when the model has none), `eos_ids` (every id
    that ends generation; `eos_ids[0]` is the model's own EOS), `vocab_size`,
    `chat_template` (Jinja source or None), `add_bos` (the default of encode).
    """

    def __init__(self, backend, bos_id, eos_ids, add_bos, chat_template):
        self._backend = backend  # tokenizers.Tokenizer | sentencepiece.SentencePieceProcessor
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template

    # ---- loading ----

    @classmethod
    def load(cls, path):
        """Load from a directory of tokenizer files, a `.gguf` file or a `.model` file."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            require_regular_file(path)
            if path.suffix == ".gguf":
                return cls._from_gguf(path)
            if path.suffix == ".model":
                return cls._from_sentencepiece(path, path.parent)
            if path.name == "tokenizer.json":
                return cls._from_tokenizer_json(path.parent)
            raise UserError(f"{path}: not a tokenizer file; give a .gguf, a tokenizer.model, or a tokenizer directory")
        if not path.is_dir():
            raise UserError(f"{path}: no such file or directory; give the model directory or its .gguf file")
        if (path / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(path)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab_name).is_file() and (path / merges_name).is_file():
                return cls._from_byte_level_files(path / vocab_name, path / merges_name)
        if (path / "tokenizer.model").is_file():
            return cls._from_sentencepiece(path / "tokenizer.model", path)
        raise UserError(
            f"{path}: no tokenizer found; expected tokenizer.json, vocab.json + merges.txt, "
            "encoder.json + vocab.bpe, or tokenizer.model")

    @classmethod
    def _from_tokenizer_json(cls, directory):
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception on bad JSON
            raise UserError(f"{directory / 'tokenizer.json'}: cannot be read ({e}); restore the file") from e
        return cls._with_hf_settings(backend, directory, default_add_bos=None)

    @classmethod
    def _from_byte_level_files(cls, vocab_path, merges_path):
        directory = vocab_path.parent
        vocab = _read_json(vocab_path)
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
            raise UserError(
                f"{directory}: {vocab_path.name} / {merges_path.name} are not a BPE vocabulary and merge list")
        backend = _byte_level_bpe(vocab, merges, digits_first=False)
        config = _read_json(directory / "config.json")
        by_id = {i: t for t, i in vocab.items()}
        special = {"<|endoftext|>"} | {
            _token_text(_hf_setting(directory, key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        special |= {by_id.get(config.get(key)) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        backend.add_special_tokens([_special(text) for text in sorted(special - {None}) if text in vocab])
        # OPT's tokenizer prepends </s>; GPT-2's adds nothing.
        default_add_bos = config.get("model_type") == "opt"
        return cls._with_hf_settings(backend, directory, default_add_bos)

    @classmethod
    def _with_hf_settings(cls, backend, directory, default_add_bos):
        """Finish a tokenizers backend with the special tokens of an HF model directory.

        `default_add_bos` applies when the directory has no add_bos_token
        setting; None: add BOS when the backend's post-processor does.
        """
        config = _read_json(directory / "config.json")
        bos_token = _token_text(_hf_setting(directory, "bos_token"))
        eos_token = _token_text(_hf_setting(directory, "eos_token"))
        bos_id = backend.token_to_id(bos_token) if bos_token else config.get("bos_token_id")
        eos_ids = [backend.token_to_id(eos_token)] if eos_token else []
        for source in (config, _read_json(directory / "generation_config.json")):
            ids = source.get("eos_token_id")
            eos_ids += ids if isinstance(ids, list) else [ids]
        if bos_id is None and not any(i is not None for i in eos_ids):
            bos_id = backend.token_to_id("<|endoftext|>")  # GPT-2's defaults: BOS = EOS = <|endoftext|>
            eos_ids = [bos_id]
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        eos_ids += [backend.token_to_id(t) for t in sorted(specials & END_OF_GENERATION_TOKENS)]
        add_bos = _hf_setting(directory, "add_bos_token")
        if add_bos is None and default_add_bos is None:
            add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        elif add_bos is None:
            add_bos = default_add_bos
        return cls(backend, bos_id, _unique_ids(eos_ids), bool(add_bos), _hf_chat_template(directory))

    @classmethod
    def _from_sentencepiece(cls, model_path, directory):
        import sentencepiece  # only for tokenizer.model files

        backend = sentencepiece.SentencePieceProcessor()
        try:
            backend.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e}); restore tokenizer.model") from e
        bos_id = backend.bos_id() if backend.bos_id() >= 0 else None
        eos_ids = [backend.eos_id()] if backend.eos_id() >= 0 else []
        for text in sorted(END_OF_GENERATION_TOKENS):
            piece_id = backend.piece_to_id(text)
            if backend.id_to_piece(piece_id) == text and backend.is_control(piece_id):
                eos_ids.append(piece_id)
        add_bos = _hf_setting(directory, "add_bos_token")
        return cls(backend, bos_id, _unique_ids(eos_ids), bos_id is not None if add_bos is None else bool(add_bos),
                   _hf_chat_template(directory))

    @classmethod
    def _from_gguf(cls, path):
        from gguf import GGUFReader  # the gguf package (and the sentencepiece it imports) only for GGUF files

        from runtime.checkpoints.gguf_io import metadata_value

        require_regular_file(path)
        try:
            reader = GGUFReader(path)
        except Exception as e:  # the reader fails in many ways on a damaged file; all mean the same to the user
            raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None

        def field(key, kind, default=None):
            return metadata_value(reader, key, default, kind)

        kind = field("tokenizer.ggml.model", "str")
        tokens = field("tokenizer.ggml.tokens", "strs")
        if not tokens:
            raise UserError(
                f"{path}: this GGUF has no embedded vocabulary; give the model's tokenizer directory instead")
        types = field("tokenizer.ggml.token_type", "ints", [TOKEN_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                            "tokens; the file is damaged: re-download or re-convert it")
        if kind == "gpt2":
            pre = field("tokenizer.ggml.pre", "str", "default")
            if pre not in GPT2_PRE_NAMES | {"smollm"}:
                raise UserError(f"{path}: GGUF pre-tokenizer '{pre}' is not supported (supported: gpt2, smollm); "
                                "use the model's tokenizer.json instead")
            vocab = {t: i for i, t in enumerate(tokens)}
            merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges", "strs", [])]
            bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab), None)
            if bad is not None:
                raise UserError(f"{path}: tokenizer.ggml.merges holds {' '.join(bad)!r}, not two tokens of the "
                                "vocabulary; the file is damaged: re-download or re-convert it")
            backend = _byte_level_bpe(vocab, merges, digits_first=pre == "smollm")
            _add_gguf_special_tokens(backend, tokens, types)
            add_bos = field("tokenizer.ggml.add_bos_token", "bool", False)
        elif kind == "llama":
            scores = field("tokenizer.ggml.scores", "floats")
            if scores is None or len(scores) != len(tokens):
                raise UserError(f"{path}: GGUF 'llama' vocabulary lacks one tokenizer.ggml.scores entry per "
                                "token; re-convert the model")
            backend = _sentencepiece_bpe(tokens, scores, types, field("tokenizer.ggml.add_space_prefix", "bool", True))
            add_bos = field("tokenizer.ggml.add_bos_token", "bool", True)
        else:
            raise UserError(f"{path}: GGUF tokenizer model '{kind}' is not supported (supported: gpt2, llama)")
        ids = {name: field(f"tokenizer.ggml.{name}_token_id", "int") for name in ("bos", "eos", "eot", "eom")}
        outside = next((name for name, i in ids.items() if i is not None and not 0 <= i < len(tokens)), None)
        if outside is not None:
            raise UserError(f"{path}: tokenizer.ggml.{outside}_token_id is {ids[outside]}, outside the vocabulary "
                            f"of {len(tokens)} tokens; the file is damaged: re-download or re-convert it")
        eos_ids = [ids["eos"], ids["eot"], ids["eom"]]
        eos_ids += [i for i, (t, k) in enumerate(zip(tokens, types))
                    if k == TOKEN_CONTROL and t in END_OF_GENERATION_TOKENS]
        return cls(backend, ids["bos"], _unique_ids(eos_ids), bool(add_bos),
                   field("tokenizer.chat_template", "str"))

    # ---- encoding and decoding ----

    @property
    def _is_sentencepiece(self) -> bool:
        """Whether the backend is a SentencePieceProcessor (a tokenizer.model file) rather than `tokenizers`."""
        return not isinstance(self._backend, tokenizers.Tokenizer)

    @property
    def vocab_size(self):
        if self._is_sentencepiece:
            return self._backend.get_piece_size()
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_bos=None):
        """Token ids of `text`; BOS first when `add_bos` (None: the model's default). Never adds EOS."""
        if not isinstance(text, str):
            raise UserError(f"encode takes a str, got {type(text).__name__}; decode bytes to text first")
        if self._is_sentencepiece:
            ids = self._backend.encode(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token; encode with add_bos=False")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        """Text of `ids`, special tokens (BOS, EOS, ...) left out."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self._is_sentencepiece:
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=True)

    def stream(self):
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self)

    def token_to_id(self, text):
        """Id of the vocabulary entry `text`, or None."""
        if self._is_sentencepiece:
            piece_id = self._backend.piece_to_id(text)
            return piece_id if self._backend.id_to_piece(piece_id) == text else None
        return self._backend.token_to_id(text)

    def id_to_token(self, token_id):
        """Vocabulary entry of `token_id` (raw form: 'Ġ' / '▁' for spaces)."""
        if self._is_sentencepiece:
            return self._backend.id_to_piece(token_id)
        return self._backend.id_to_token(token_id)

    # ---- chat ----

    def apply_chat_template(self, prompt, system=None):
        """The model's chat template rendered for one user message, ready for the assistant's reply."""
        if self.chat_template is None:
            raise UserError("this model has no chat template; send the prompt as plain text instead")
        from runtime.text.chat_template import render  # Jinja2 only for chat

        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        names = {"bos_token": self.bos_id, "eos_token": self.eos_ids[0] if self.eos_ids else None}
        specials = {k: self.id_to_token(v) if v is not None else "" for k, v in names.items()}
        return render(self.chat_template, messages, specials)

    # ---- saving ----

    def save(self, directory):
        """Write tokenizer.json + tokenizer_config.json that `Tokenizer.load` reads back to the same ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._is_sentencepiece:
            backend = _convert_sentencepiece(self._backend)
        else:
            backend = tokenizers.Tokenizer.from_str(self._backend.to_str())  # a copy to set the post-processor on
        # HF libraries add BOS through the post-processor: make it match add_bos.
        backend.post_processor = None
        if self.add_bos and self.bos_id is not None:
            bos = self.id_to_token(self.bos_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)])
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.id_to_token(self.eos_ids[0]) if self.eos_ids else None,
            "add_bos_token": self.add_bos,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text(directory / "tokenizer.json", backend.to_str(pretty=True))
        write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get back the text that became final.

    It decodes the window ids[start:] and compares with ids[start:done], the
    part already emitted: the difference is new text, held back while it ends
    in an incomplete UTF-8 character (U+FFFD). Decoding a window that begins
    at an emitted token, rather than single tokens, keeps SentencePiece's
    leading-space rule and multi-token characters right.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids = []
        self._start = 0  # first id of the context window
        self._done = 0   # ids before this one have been emitted

    def push(self, token_id):
        """Add one id; return the newly final text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        emitted, text = self._window_texts()
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(emitted):]

    def flush(self):
        """Return whatever text is still held back (at the end of generation)."""
        emitted, text = self._window_texts()
        self._start = self._done = len(self._ids)
        return text[len(emitted):]

    def _window_texts(self):
        decode = self._tokenizer.decode
        return decode(self._ids[self._start:self._done]), decode(self._ids[self._start:])


# ---- building tokenizers backends ----

def _byte_level_bpe(vocab, merges, digits_first):
    """GPT-2 byte-level BPE; `digits_first` splits every digit apart before GPT-2's regex (SmolLM2)."""
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if digits_first:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(pieces, scores, types, add_space_prefix):
    """The `tokenizers` BPE equivalent to a SentencePiece BPE vocabulary with byte fallback."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {TOKEN_NORMAL, TOKEN_USER_DEFINED}
    ranked = []  # (-score of the joined piece, its id, left, right)
    for i, piece in enumerate(pieces):
        if types[i] not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_ids = [i for i, k in enumerate(types) if k == TOKEN_UNKNOWN]
    backend = tokenizers.Tokenizer(models.BPE(
        vocab, [(left, right) for *_, left, right in ranked],
        unk_token=pieces[unk_ids[0]] if unk_ids else None, fuse_unk=True, byte_fallback=True))
    space = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(space + [normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    _add_gguf_special_tokens(backend, pieces, types)
    return backend


def _add_gguf_special_tokens(backend, tokens, types):
    """Control / unknown tokens become special tokens, user-defined ones added tokens.

    Either way text that contains them maps to their single id (llama.cpp's
    parse_special behaviour for control tokens).
    """
    backend.add_special_tokens([_special(t) for t, k in zip(tokens, types) if k in (TOKEN_CONTROL, TOKEN_UNKNOWN)])
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])


def _convert_sentencepiece(processor):
    """A SentencePiece processor as a `tokenizers` BPE; UserError if it would not give the same ids."""
    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    scores = [processor.get_score(i) for i in range(size)]
    types = [TOKEN_UNKNOWN if processor.is_unknown(i) else TOKEN_CONTROL if processor.is_control(i)
             else TOKEN_BYTE if processor.is_byte(i) else TOKEN_NORMAL for i in range(size)]
    add_space_prefix = processor.encode("a", out_type=str)[0].startswith(SPM_SPACE)
    backend = _sentencepiece_bpe(pieces, scores, types, add_space_prefix)
    if backend.encode(SPM_PROBE_TEXT, add_special_tokens=False).ids != processor.encode(SPM_PROBE_TEXT):
        raise UserError("this SentencePiece model normalizes text in a way tokenizer.json cannot reproduce; "
                        "copy its tokenizer.model instead of saving")
    return backend


# ---- small helpers ----

def _special(text):
    return AddedToken(text, special=True, normalized=False)


def _unique_ids(ids):
    """Ids in first-seen order, None dropped."""
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _token_text(value):
    """A special token as HF configs write it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path):
    """The JSON object in `path`, or {} when the file is absent."""
    return read_json(path, "restore the file") if path.is_file() else {}


def _hf_setting(directory, key):
    """`key` from tokenizer_config.json, else from special_tokens_map.json, else None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        value = _read_json(directory / name).get(key)
        if value is not None:
            return value
    return None


def _hf_chat_template(directory):
    """The chat template of an HF directory (tokenizer_config.json or chat_template.jinja), or None."""
    template = _read_json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template

