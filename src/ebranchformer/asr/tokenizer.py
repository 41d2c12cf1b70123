"""Tokenizers: text <-> token ids over an ESPnet-style token list.

Every tokenizer owns a token list laid out the way ESPnet recipes write ``tokens.txt``::

    <blank>      id 0, the CTC blank (always 0)
    <unk>        id 1 in lists built here
    ...          the real tokens (characters or sentencepiece pieces)
    <sos/eos>    last

and maps text to ids in two steps, exactly like ESPnet's ``AbsTokenizer`` + ``TokenIDConverter``:
text -> token strings (``text_to_tokens``) -> ids (unknown strings become ``unk_id``).

Three kinds:

* :class:`CharTokenizer` -- one token per character, a space becomes ``<space>`` (ESPnet ``token_type=char``);
  :meth:`CharTokenizer.train` builds the list from texts, most frequent character first.
* :class:`SentencePieceTokenizer` -- a sentencepiece model (bpe or unigram); the token list is ``<blank>``,
  ``<unk>``, the model's pieces without its own unknown/control pieces (``<unk>``, ``<s>``, ``</s>``),
  ``<sos/eos>`` -- the list ESPnet's ``asr.sh`` writes for ``token_type=bpe``.
  :meth:`SentencePieceTokenizer.train` trains one deterministically.
* :class:`TokenListTokenizer` -- any existing ESPnet ``token_list`` (list or ``tokens.txt``) plus how text
  maps to tokens: ``text_kind="char"`` or ``text_kind="bpe"`` with a sentencepiece model file.

Text normalisation (case, punctuation) is the caller's job: ``encode`` tokenizes the string as given.
``decode`` drops ``<blank>`` and ``<sos/eos>``, then joins the token strings back into text: ``<space>``
(char) and the sentencepiece word marker ``▁`` (bpe) become spaces (as ESPnet's ``tokens2text``); ``transcript``
also collapses and strips the whitespace, for what recognizers print. ``<unk>`` stays visible: as ``<unk>``
for char, as sentencepiece's unknown surface `` ⁇ `` for bpe (what ESPnet's ``tokens2text`` gives).

``save(directory)`` writes ``tokens.txt`` (plus the sentencepiece model, if any) and a small
``tokenizer.json`` naming the kind and the files; :func:`load_tokenizer` (= ``Tokenizer.load``) reads back
whichever kind was saved.

Example:
    >>> tok = CharTokenizer.train(["ab ba", "abc"])
    >>> tok.tokens
    ['<blank>', '<unk>', 'a', 'b', '<space>', 'c', '<sos/eos>']
    >>> tok.encode("cab")
    [5, 2, 3]
    >>> tok.decode([0, 2, 4, 3])
    'a b'
"""

from __future__ import annotations

import abc
import io
import json
import operator
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "BLANK",
    "SOS_EOS",
    "SPACE",
    "UNK",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "TokenListTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "read_token_list",
    "write_token_list",
]

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
SPACE = "<space>"

CONFIG_NAME = "tokenizer.json"
TOKENS_NAME = "tokens.txt"
MODEL_NAME = "bpe.model"
_FORMAT = "ebranchformer-tokenizer"
_VERSION = 1
_TEXT_KINDS = ("char", "bpe")


# ----------------------------------------------------------------------------------------------- token lists


def _token_problem(token: Any) -> str | None:
    """Why ``token`` cannot be a line of ``tokens.txt`` (None when it can)."""
    if not isinstance(token, str):
        return f"must be a str, got {type(token).__name__}"
    if not token:
        return "is empty"
    if "\n" in token or "\r" in token:
        return "contains a line break"
    # ESPnet reads a line as line[0] + line[1:].rstrip(): trailing whitespace after the first char is lost.
    if token[0] + token[1:].rstrip() != token:
        return "ends with whitespace (would not survive a tokens.txt round trip)"
    return None


def _check_token_list(tokens: Sequence[str], name: str = "tokens") -> list[str]:
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{name} must be a sequence of str, got {type(tokens).__name__}")
    tokens = list(tokens)
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        problem = _token_problem(t)
        if problem is not None:
            raise ValueError(f"{name}[{i}]={t!r} {problem}")
        if t in seen:
            raise ValueError(f"{name}[{i}]={t!r} duplicates {name}[{seen[t]}]")
        seen[t] = i
    if not tokens or tokens[0] != BLANK:
        first = tokens[0] if tokens else None
        raise ValueError(f"{name}[0] must be the CTC blank {BLANK!r}, got {first!r}")
    if UNK not in seen:
        raise ValueError(f"{name} must contain the unknown symbol {UNK!r}")
    return tokens


def read_token_list(path: str | os.PathLike) -> list[str]:
    """Read an ESPnet ``tokens.txt`` (one token per line, UTF-8), the way ESPnet's ``TokenIDConverter`` does.

    Each line keeps its first character and loses trailing whitespace after it. Raises FileNotFoundError
    naming the path when it is missing, ValueError when the list is not a valid token list (see
    :class:`Tokenizer`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token list file not found: {str(path)!r}")
    with path.open("r", encoding="utf-8") as f:
        tokens = [line[0] + line[1:].rstrip() for line in f]
    return _check_token_list(tokens, name=f"{path.name} line")


def write_token_list(path: str | os.PathLike, tokens: Sequence[str]) -> None:
    """Write ``tokens`` one per line (UTF-8, ``\\n``), readable by ESPnet and :func:`read_token_list`."""
    tokens = _check_token_list(tokens)
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.write("".join(t + "\n" for t in tokens))


# ----------------------------------------------------------------------------------------------- base class


class Tokenizer(abc.ABC):
    """Common interface: a token list (``<blank>`` at id 0, an ``<unk>``) and a text <-> tokens mapping.

    Args:
        tokens: the token list. Every token is a non-empty str without line breaks or trailing whitespace,
            no duplicates, ``tokens[0] == "<blank>"``, and ``"<unk>"`` somewhere in it.

    Subclasses implement :meth:`text_to_tokens`, :meth:`tokens_to_text` and the save/load hooks.
    """

    kind: ClassVar[str]

    def __init__(self, tokens: Sequence[str]):
        self._tokens = _check_token_list(tokens)
        self._token2id = {t: i for i, t in enumerate(self._tokens)}
        self._unk_id = self._token2id[UNK]
        self._sos_eos_id = self._token2id.get(SOS_EOS)

    # -- token list ------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        """The token list (a copy); ``tokens[i]`` is the string of id ``i``."""
        return list(self._tokens)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, blank and specials included (the CTC output size V)."""
        return len(self._tokens)

    @property
    def blank_id(self) -> int:
        """The CTC blank id: always 0."""
        return 0

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>``; text tokens missing from the list encode to it."""
        return self._unk_id

    @property
    def sos_eos_id(self) -> int | None:
        """Id of ``<sos/eos>``, or None when the list has none."""
        return self._sos_eos_id

    def __len__(self) -> int:
        return len(self._tokens)

    # -- text <-> tokens ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def text_to_tokens(self, text: str) -> list[str]:
        """Split ``text`` into token strings (not yet checked against the token list)."""

    @abc.abstractmethod
    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        """Join token strings back into text."""

    # -- ids ------------------------------------------------------------------------------------------------
    def tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Map token strings to ids; strings missing from the list become :attr:`unk_id`."""
        return [self._token2id.get(t, self._unk_id) for t in tokens]

    def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Map ids (ints in ``[0, vocab_size)``; a 1-D tensor/array works too) to token strings."""
        return [self._tokens[i] for i in self._check_ids(ids)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no blank, no ``<sos/eos>`` added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokens_to_ids(self.text_to_tokens(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: drops ``<blank>`` and ``<sos/eos>``, then :meth:`tokens_to_text`."""
        drop = {self.blank_id, self._sos_eos_id}
        return self.tokens_to_text([self._tokens[i] for i in self._check_ids(ids) if i not in drop])

    def transcript(self, ids: Iterable[int]) -> str:
        """What a recognizer reports for ``ids``: :meth:`decode` with runs of whitespace made one space and none
        at either end (a CTC output can start or end on ``<space>``, or give two in a row around a blank).

        Example:
            >>> tok = CharTokenizer.train(["ab ba"])
            >>> space = tok.encode(" ")[0]
            >>> tok.transcript([space, *tok.encode("a"), space, 0, space, *tok.encode("b"), space])
            'a b'
        """
        return " ".join(self.decode(ids).split())

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # torch.Tensor / np.ndarray
            if ids.ndim != 1:
                raise ValueError(f"ids must be 1-D, got {ids.ndim} dimensions")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an iterable of int, got {type(ids).__name__}")
        out = []
        for i in ids:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)  # int, numpy / torch integer scalars
            except TypeError:
                raise TypeError(f"ids must hold ints, got {i!r} ({type(i).__name__})") from None
            if not 0 <= i < len(self._tokens):
                raise ValueError(f"ids must lie in [0, {len(self._tokens)}), got {i}")
            out.append(i)
        return out

    # -- save / load ----------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokens.txt``, any model file and ``tokenizer.json`` into ``directory`` (created if missing).

        Returns the path of ``tokenizer.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_token_list(directory / TOKENS_NAME, self._tokens)
        config = {"format": _FORMAT, "version": _VERSION, "kind": self.kind, "tokens": TOKENS_NAME}
        config.update(self._save_files(directory))
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write this kind's extra files into ``directory``; return the extra ``tokenizer.json`` fields."""

    @classmethod
    @abc.abstractmethod
    def _from_config(cls, directory: Path, config: dict[str, Any], tokens: list[str]) -> Tokenizer:
        """Rebuild from a saved ``tokenizer.json`` (``config``) and its ``tokens.txt`` (``tokens``)."""

    @staticmethod
    def load(directory: str | os.PathLike) -> Tokenizer:
        """Read back a tokenizer written by :meth:`save`, whatever its kind. See :func:`load_tokenizer`."""
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in tokenizer directory {str(directory)!r}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
        fmt = config.get("format") if isinstance(config, dict) else None
        if fmt != _FORMAT:
            raise ValueError(f"{str(path)!r} is not an {_FORMAT} file (a JSON object with format={fmt!r})")
        if config.get("version") != _VERSION:
            raise ValueError(
                f"{str(path)!r}: unsupported version {config.get('version')!r}, expected {_VERSION}"
            )
        kind = config.get("kind")
        classes = {c.kind: c for c in (CharTokenizer, SentencePieceTokenizer, TokenListTokenizer)}
        if kind not in classes:
            raise ValueError(
                f"{str(path)!r}: unknown tokenizer kind {kind!r}, expected one of {sorted(classes)}"
            )
        tokens = read_token_list(_config_file(directory, config, "tokens"))
        return classes[kind]._from_config(directory, config, tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read back a tokenizer saved with :meth:`Tokenizer.save` (char, sentencepiece or token_list kind).

    Raises FileNotFoundError when ``tokenizer.json`` or a file it names is missing, ValueError when the
    description is malformed or names an unknown kind.
    """
    return Tokenizer.load(directory)


def _config_file(directory: Path, config: dict[str, Any], key: str) -> Path:
    name = config.get(key)
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{CONFIG_NAME} field {key!r} must be a plain file name, got {name!r}")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} names {key} file {name!r}, missing in {str(directory)!r}")
    return path


def _check_texts(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be an iterable of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def _load_sentencepiece(model: str | os.PathLike | bytes, name: str = "model"):
    """(processor, serialized bytes) of a sentencepiece model file (or its bytes)."""
    import sentencepiece as spm

    if isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece {name} file not found: {str(path)!r}")
        data = path.read_bytes()
    else:
        raise TypeError(f"{name} must be a path to a sentencepiece .model file, got {type(model).__name__}")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{name} is not a valid sentencepiece model: {e}") from e
    return sp, data


# ----------------------------------------------------------------------------------------------- kinds


class TokenListTokenizer(Tokenizer):
    """An existing ESPnet ``token_list`` plus the rule that splits text into its tokens.

    Ids equal ESPnet's ``TokenIDConverter(token_list)`` applied to ESPnet's char / sentencepiece tokenizer.

    Args:
        token_list: list of token strings, or a path to ``tokens.txt`` (one token per line).
        text_kind: ``"char"`` (one token per character, ``" "`` -> ``space_symbol``) or ``"bpe"``
            (sentencepiece pieces from ``bpemodel``). Default ``"char"``.
        bpemodel: path to the sentencepiece ``.model``; required for ``"bpe"``, must be None for ``"char"``.
        space_symbol: the char-kind token for a space. Default ``"<space>"``.

    Example:
        >>> tok = TokenListTokenizer(["<blank>", "<unk>", "h", "i", "<space>", "<sos/eos>"], text_kind="char")
        >>> tok.encode("hi hi!")
        [2, 3, 4, 2, 3, 1]
    """

    kind = "token_list"

    def __init__(
        self,
        token_list: Sequence[str] | str | os.PathLike,
        text_kind: str = "char",
        bpemodel: str | os.PathLike | bytes | None = None,
        space_symbol: str = SPACE,
    ):
        if isinstance(token_list, (str, os.PathLike)):
            token_list = read_token_list(token_list)
        super().__init__(token_list)
        if text_kind not in _TEXT_KINDS:
            raise ValueError(f"text_kind must be one of {_TEXT_KINDS}, got {text_kind!r}")
        if not isinstance(space_symbol, str) or _token_problem(space_symbol) is not None:
            raise ValueError(f"space_symbol must be a non-empty token string, got {space_symbol!r}")
        self._text_kind = text_kind
        self._space = space_symbol
        self._sp = None
        self._sp_bytes: bytes | None = None
        if text_kind == "bpe":
            if bpemodel is None:
                raise ValueError("bpemodel (a sentencepiece .model path) is required for text_kind='bpe'")
            self._sp, self._sp_bytes = _load_sentencepiece(bpemodel, name="bpemodel")
        elif bpemodel is not None:
            raise ValueError("bpemodel must be None for text_kind='char'")

    @property
    def text_kind(self) -> str:
        """How text maps to tokens: ``"char"`` or ``"bpe"``."""
        return self._text_kind

    @property
    def space_symbol(self) -> str:
        """The char-kind token standing for a space."""
        return self._space

    def text_to_tokens(self, text: str) -> list[str]:
        """Char: each character, spaces as ``space_symbol``. Bpe: the sentencepiece pieces of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._sp is not None:
            return self._sp.encode_as_pieces(text)
        return [self._space if c == " " else c for c in text]

    def tokens_to_text(self, tokens: Sequence[str]) -> str:
        """Char: concatenation with ``space_symbol`` -> ``" "``. Bpe: sentencepiece ``decode_pieces``."""
        tokens = list(tokens)
        if self._sp is not None:
            return self._sp.decode_pieces(tokens)
        return "".join(" " if t == self._space else t for t in tokens)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        fields: dict[str, Any] = {"text_kind": self._text_kind, "space_symbol": self._space}
        if self._sp_bytes is not None:
            (directory / MODEL_NAME).write_bytes(self._sp_bytes)
            fields["model"] = MODEL_NAME
        return fields

    @classmethod
    def _from_config(cls, directory: Path, config: dict[str, Any], tokens: list[str]) -> Tokenizer:
        text_kind = config.get("text_kind")
        model = _config_file(directory, config, "model") if text_kind == "bpe" else None
        return cls(
            tokens, text_kind=text_kind, bpemodel=model, space_symbol=config.get("space_symbol", SPACE)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, text_kind={self._text_kind!r})"


class CharTokenizer(TokenListTokenizer):
    """Character tokens as ESPnet's ``CharTokenizer`` (``space_symbol="<space>"``) makes them.

    Args:
        tokens: the token list (see :class:`Tokenizer`); build one from texts with :meth:`train`.
        space_symbol: the token for a space. Default ``"<space>"``.

    Example:
        >>> tok = CharTokenizer.train(["aab", "b a"])
        >>> tok.tokens, tok.decode(tok.encode("ab ba"))
        (['<blank>', '<unk>', 'a', 'b', '<space>', '<sos/eos>'], 'ab ba')
    """

    kind = "char"

    def __init__(self, tokens: Sequence[str] | str | os.PathLike, space_symbol: str = SPACE):
        super().__init__(tokens, text_kind="char", space_symbol=space_symbol)

    @classmethod
    def train(cls, texts: Iterable[str], space_symbol: str = SPACE, cutoff: int = 0) -> CharTokenizer:
        """Token list from ``texts`` as ESPnet's ``tokenize_text --write_vocabulary`` builds it.

        Characters counted over all texts, kept when seen more than ``cutoff`` times, most frequent first
        (ties in order of first appearance), then ``<blank>`` prepended at 0, ``<unk>`` at 1 and
        ``<sos/eos>`` appended last.
        """
        texts = _check_texts(texts)
        if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 0:
            raise ValueError(f"cutoff must be an int >= 0, got {cutoff!r}")
        counts: Counter[str] = Counter()
        for i, text in enumerate(texts):
            if "\n" in text or "\r" in text:
                raise ValueError(f"texts[{i}] contains a line break; pass one sentence per text")
            counts.update(space_symbol if c == " " else c for c in text)
        chars = [c for c, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n > cutoff]
        return cls([BLANK, UNK, *chars, SOS_EOS], space_symbol=space_symbol)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"space_symbol": self._space}

    @classmethod
    def _from_config(cls, directory: Path, config: dict[str, Any], tokens: list[str]) -> Tokenizer:
        return cls(tokens, space_symbol=config.get("space_symbol", SPACE))


class SentencePieceTokenizer(TokenListTokenizer):
    """A sentencepiece model (bpe or unigram) with the ESPnet ``token_type=bpe`` token list.

    The token list is ``<blank>``, ``<unk>``, the model's pieces in id order without its unknown and control
    pieces (by default ``<unk>``, ``<s>``, ``</s>``: the first three lines of the ``.vocab`` file that ESPnet's
    ``asr.sh`` drops), then ``<sos/eos>``; so ``vocab_size`` equals the sentencepiece vocabulary size.

    Args:
        model: path to an existing sentencepiece ``.model`` file (or its bytes).

    Example:
        >>> tok = SentencePieceTokenizer.train(["hello world"] * 8, "exp/bpe", vocab_size=12)  # doctest: +SKIP
        >>> tok.decode(tok.encode("hello world"))  # doctest: +SKIP
        'hello world'
    """

    kind = "sentencepiece"

    def __init__(self, model: str | os.PathLike | bytes):
        sp, data = _load_sentencepiece(model)
        super().__init__(self.token_list_of(sp), text_kind="bpe", bpemodel=data)

    @staticmethod
    def token_list_of(sp: Any) -> list[str]:
        """The ESPnet bpe token list of a loaded ``sentencepiece.SentencePieceProcessor``."""
        pieces = [
            sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
            if not (sp.is_unknown(i) or sp.is_control(i))
        ]
        return [BLANK, UNK, *pieces, SOS_EOS]

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        directory: str | os.PathLike,
        vocab_size: int,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        user_defined_symbols: Sequence[str] = (),
        seed: int = 0,
    ) -> SentencePieceTokenizer:
        """Train a sentencepiece model on ``texts`` (one sentence each) and save the tokenizer to ``directory``.

        Deterministic (single thread, fixed ``seed``). Writes ``bpe.model``, ``tokens.txt`` and
        ``tokenizer.json``. ``vocab_size`` is the sentencepiece vocabulary size, equal to the final token list
        size; sentencepiece rejects values too large for the text. ``model_type`` is ``"bpe"`` or
        ``"unigram"``; ``character_coverage`` default 1.0 as in ESPnet recipes.
        """
        import sentencepiece as spm

        texts = _check_texts(texts)
        if not any(t.strip() for t in texts):
            raise ValueError("texts must hold at least one non-blank sentence")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
            raise ValueError(f"vocab_size must be an int >= 4, got {vocab_size!r}")
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage must lie in (0, 1], got {character_coverage!r}")
        if isinstance(user_defined_symbols, str):
            raise TypeError("user_defined_symbols must be a sequence of str, not a single str")
        buf = io.BytesIO()
        spm.set_random_generator_seed(seed)
        kwargs: dict[str, Any] = {
            "sentence_iterator": iter(texts),
            "model_writer": buf,
            "vocab_size": vocab_size,
            "model_type": model_type,
            "character_coverage": character_coverage,
            "input_sentence_size": 100_000_000,
            "num_threads": 1,
            "minloglevel": 2,
        }
        if user_defined_symbols:
            kwargs["user_defined_symbols"] = list(user_defined_symbols)
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from e
        tok = cls(buf.getvalue())
        tok.save(directory)
        return tok

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"model": super()._save_files(directory)["model"]}

    @classmethod
    def _from_config(cls, directory: Path, config: dict[str, Any], tokens: list[str]) -> Tokenizer:
        tok = cls(_config_file(directory, config, "model"))
        if tok.tokens != tokens:
            raise ValueError(
                f"{TOKENS_NAME} in {str(directory)!r} does not match the token list of its model"
            )
        return tok
