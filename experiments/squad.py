"""SQuAD v1.1 for BERT: WordPiece tokenisation, sliding-window features, span decoding, EM and F1.

Everything is read from the user's directory (nothing is downloaded): ``train-v1.1.json``,
``dev-v1.1.json`` and the WordPiece vocabulary of the BERT checkpoint to fine-tune
(``vocab.txt``, e.g. from ``bert-base-uncased``). The features follow BERT's original
``run_squad.py`` recipe: ``[CLS] question [SEP] context window [SEP]`` with the question cut
to 64 tokens, windows of at most 384 tokens every 128 context tokens, and the answer's first
and last context tokens as labels (``[CLS]``, position 0, when the window misses the answer).

A feature is one row of ``x [N, 2, L]`` (token ids and token-type ids, see
:class:`experiments.models.BertForSpans`) with labels ``y [N, 2]``. :func:`evaluate` turns the
model's start/end logits into answer texts (the best span of at most 30 tokens over all
windows of an example) and scores them with the official exact-match and F1.

References:
  Rajpurkar, Zhang, Lopyrev, Liang. SQuAD: 100,000+ Questions for Machine Comprehension of
  Text. EMNLP 2016.
  Devlin, Chang, Lee, Toutanova. BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding. NAACL 2019.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_SEQ_LEN, DOC_STRIDE, MAX_QUERY_LEN, MAX_ANSWER_LEN = 384, 128, 64, 30


class WordPiece:
  """BERT's tokeniser: basic splitting (whitespace, punctuation, CJK, optional lower-casing and
  accent stripping), then greedy longest-match-first WordPiece over ``vocab``.

  Args:
    vocab: token → id (the lines of ``vocab.txt`` in order).
    lower: lower-case and strip accents (the ``uncased`` checkpoints).
  """

  def __init__(self, vocab: dict[str, int], lower: bool = True, max_chars: int = 100):
    for special in ('[UNK]', '[CLS]', '[SEP]', '[PAD]'):
      if special not in vocab:
        raise ValueError(f'The vocabulary lacks {special}; pass the vocab.txt of a BERT checkpoint.')
    self.vocab, self.lower, self.max_chars = vocab, lower, max_chars

  @classmethod
  def from_file(cls, path: str | Path, lower: bool = True) -> WordPiece:
    """Reads ``vocab.txt``: one token per line, ids in line order."""
    with open(path, encoding='utf-8') as f:
      return cls({line.rstrip('\n'): i for i, line in enumerate(f)}, lower)

  def basic(self, text: str) -> list[str]:
    """Whitespace and punctuation splitting (and lower-casing without accents when ``lower``)."""
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch) in ('Cc', 'Cf') and ch not in '\t\n\r'):
        continue
      if _is_cjk(cp):
        chars += [' ', ch, ' ']
      else:
        chars.append(' ' if ch.isspace() else ch)
    out = []
    for word in ''.join(chars).split():
      if self.lower:
        word = ''.join(
          c for c in unicodedata.normalize('NFD', word.lower()) if unicodedata.category(c) != 'Mn'
        )
      piece = ''
      for ch in word:
        if _is_punctuation(ch):
          if piece:
            out.append(piece)
          out.append(ch)
          piece = ''
        else:
          piece += ch
      if piece:
        out.append(piece)
    return out

  def wordpiece(self, word: str) -> list[str]:
    """Greedy longest-match-first pieces of one word (``[UNK]`` when it cannot be covered)."""
    if len(word) > self.max_chars:
      return ['[UNK]']
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else '##' + word[start:end]
        if piece in self.vocab:
          break
        end -= 1
      if end == start:
        return ['[UNK]']
      pieces.append(piece)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    return [p for w in self.basic(text) for p in self.wordpiece(w)]

  def ids(self, tokens: Sequence[str]) -> list[int]:
    return [self.vocab.get(t, self.vocab['[UNK]']) for t in tokens]


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # BERT counts every non-alphanumeric ASCII character as punctuation, e.g. '$' and '^'.
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith('P')


def _is_cjk(cp: int) -> bool:
  ranges = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
  )
  return any(lo <= cp <= hi for lo, hi in ranges)


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: the context split on whitespace, and the reference answers."""

  qid: str
  question: str
  words: tuple[str, ...]
  char_to_word: tuple[int, ...]
  answers: tuple[str, ...]
  answer_start: int  # character offset of the first answer in the context


def read_examples(path: str | Path) -> list[Example]:
  """The questions of a SQuAD v1.1 JSON file, in file order."""
  with open(path, encoding='utf-8') as f:
    articles = json.load(f)['data']
  out = []
  for article in articles:
    for para in article['paragraphs']:
      context = para['context']
      words: list[str] = []
      char_to_word = []
      new_word = True
      for ch in context:
        if ch.isspace() or ord(ch) == 0x202F:
          new_word = True
        else:
          if new_word:
            words.append(ch)
          else:
            words[-1] += ch
          new_word = False
        char_to_word.append(max(len(words) - 1, 0))
      for qa in para['qas']:
        answers = tuple(a['text'] for a in qa['answers'])
        start = qa['answers'][0]['answer_start'] if qa['answers'] else -1
        out.append(Example(qa['id'], qa['question'], tuple(words), tuple(char_to_word), answers, start))
  return out


@dataclasses.dataclass(frozen=True)
class Features:
  """The windows of a list of examples.

  Attributes:
    x: int32 ``[N, 2, max_len]``: token ids and token-type ids (0 = question, 1 = context).
    y: int32 ``[N, 2]``: the answer's first and last token in the window (0, 0 when outside).
    example: int ``[N]``: the example each window belongs to.
    word: int ``[N, max_len]``: the context word of each token, -1 outside the context.
    examples: the examples.
  """

  x: np.ndarray
  y: np.ndarray
  example: np.ndarray
  word: np.ndarray
  examples: list[Example]


def featurize(
  examples: list[Example],
  tok: WordPiece,
  max_len: int = MAX_SEQ_LEN,
  stride: int = DOC_STRIDE,
  max_query: int = MAX_QUERY_LEN,
) -> Features:
  """Sliding-window features of ``examples`` (see the module docstring)."""
  xs, ys, ex_ids, words = [], [], [], []
  cls, sep = tok.vocab['[CLS]'], tok.vocab['[SEP]']
  for e_id, ex in enumerate(examples):
    query = tok.ids(tok.tokenize(ex.question))[:max_query]
    doc, doc_word, first_token = [], [], []
    for w, word in enumerate(ex.words):
      first_token.append(len(doc))
      pieces = tok.ids(tok.tokenize(word))
      doc += pieces
      doc_word += [w] * len(pieces)
    answer = None
    if ex.answer_start >= 0:
      w0 = ex.char_to_word[ex.answer_start]
      w1 = ex.char_to_word[min(ex.answer_start + len(ex.answers[0]) - 1, len(ex.char_to_word) - 1)]
      answer = (first_token[w0], (first_token[w1 + 1] if w1 + 1 < len(first_token) else len(doc)) - 1)
    room = max_len - len(query) - 3
    start = 0
    while True:
      length = min(len(doc) - start, room)
      ids = [cls, *query, sep, *doc[start : start + length], sep]
      types = [0] * (len(query) + 2) + [1] * (length + 1)
      word = [-1] * (len(query) + 2) + doc_word[start : start + length] + [-1]
      label = (0, 0)
      if answer is not None and start <= answer[0] and answer[1] < start + length:
        label = (answer[0] - start + len(query) + 2, answer[1] - start + len(query) + 2)
      pad = max_len - len(ids)
      xs.append(np.array([ids + [0] * pad, types + [0] * pad], np.int32))
      ys.append(label)
      ex_ids.append(e_id)
      words.append(word + [-1] * pad)
      if start + length >= len(doc):
        break
      start += min(length, stride)
  return Features(
    np.stack(xs) if xs else np.zeros((0, 2, max_len), np.int32),
    np.asarray(ys, np.int32).reshape(-1, 2),
    np.asarray(ex_ids, np.int64),
    np.asarray(words, np.int64).reshape(-1, max_len),
    examples,
  )


def normalize_answer(s: str) -> str:
  """The official normalisation: lower case, no punctuation, no articles, single spaces."""
  s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', s).split())


def f1_score(prediction: str, truth: str) -> float:
  pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
  common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def best_answers(feats: Features, logits: np.ndarray, max_answer: int = MAX_ANSWER_LEN) -> list[str]:
  """Each example's answer: the span (start ≤ end, inside the context, at most ``max_answer``
  tokens) with the highest start + end logit over all its windows.

  Args:
    feats: the features the logits were computed on.
    logits: ``[N, max_len, 2]`` start and end logits.

  Returns:
    The answer text of every example (its context words joined by spaces).
  """
  best: dict[int, tuple[float, str]] = {}
  for f in range(len(feats.y)):
    word = feats.word[f]
    inside = word >= 0
    s = np.where(inside, logits[f, :, 0], -np.inf)
    e = np.where(inside, logits[f, :, 1], -np.inf)
    # score[i, j] = s[i] + e[j] for i ≤ j < i + max_answer
    score = s[:, None] + e[None, :]
    i, j = np.indices(score.shape)
    score = np.where((j >= i) & (j < i + max_answer), score, -np.inf)
    k = int(np.argmax(score))
    top = float(score.flat[k])
    if not np.isfinite(top):
      continue
    a, b = divmod(k, score.shape[1])
    ex = feats.examples[feats.example[f]]
    text = ' '.join(ex.words[word[a] : word[b] + 1])
    e_id = int(feats.example[f])
    if e_id not in best or top > best[e_id][0]:
      best[e_id] = (top, text)
  return [best.get(i, (0.0, ''))[1] for i in range(len(feats.examples))]


def evaluate(
  apply: Callable[[Any, np.ndarray], Any], variables: Any, feats: Features, batch: int = 64
) -> dict:
  """Exact match and F1 (in %) of a span model over the examples of ``feats``."""
  logits = np.concatenate(
    [np.asarray(apply(variables, feats.x[i : i + batch]), np.float32) for i in range(0, len(feats.x), batch)]
  )
  answers = best_answers(feats, logits)
  em = f1 = 0.0
  for ex, pred in zip(feats.examples, answers):
    em += max(float(normalize_answer(pred) == normalize_answer(t)) for t in ex.answers)
    f1 += max(f1_score(pred, t) for t in ex.answers)
  n = max(len(feats.examples), 1)
  return {'exact_match': 100 * em / n, 'f1': 100 * f1 / n}
