"""SQuAD v1.1 for BERT: sliding-window features, span decoding, EM and F1.

Tokenisation is BERT's WordPiece from the ``tokenizers`` library (windows by its overflow,
words by its character offsets). Everything is read from the user's directory (nothing is
downloaded): ``train-v1.1.json``, ``dev-v1.1.json`` and the WordPiece vocabulary of the BERT
checkpoint to fine-tune (``vocab.txt``, e.g. from ``bert-base-uncased``). The features follow BERT's original
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MAX_SEQ_LEN, DOC_STRIDE, MAX_QUERY_LEN, MAX_ANSWER_LEN = 384, 128, 64, 30


def tokenizer(vocab: str | Path, lower: bool = True) -> Any:
  """BERT's WordPiece tokeniser (``tokenizers``) from a checkpoint's ``vocab.txt``.

  Basic splitting (whitespace, punctuation, CJK characters, control characters dropped), then
  greedy longest-match-first pieces; ``lower`` lower-cases and strips accents (the ``uncased``
  checkpoints).

  Raises:
    ValueError: the vocabulary lacks one of BERT's special tokens.
  """
  from tokenizers import BertWordPieceTokenizer

  with open(vocab, encoding='utf-8') as f:
    tokens = {line.rstrip('\n') for line in f}
  for special in ('[UNK]', '[CLS]', '[SEP]', '[PAD]'):
    if special not in tokens:
      raise ValueError(f'The vocabulary lacks {special}; pass the vocab.txt of a BERT checkpoint.')
  return BertWordPieceTokenizer(str(vocab), lowercase=lower, strip_accents=lower)


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
  tok: Any,
  max_len: int = MAX_SEQ_LEN,
  stride: int = DOC_STRIDE,
  max_query: int = MAX_QUERY_LEN,
) -> Features:
  """Sliding-window features of ``examples`` (see the module docstring), with ``tok`` from
  :func:`tokenizer`: the question is cut to ``max_query`` tokens, the context is split into
  windows by the tokeniser's overflow (one window every ``stride`` context tokens), and every
  context token is mapped to its whitespace word through its character offsets."""
  xs, ys, ex_ids, words = [], [], [], []
  for e_id, ex in enumerate(examples):
    question = tok.encode(ex.question, add_special_tokens=False)
    q_text = (
      ex.question[: question.offsets[max_query - 1][1]] if len(question.ids) > max_query else ex.question
    )
    n_query = min(len(question.ids), max_query)
    room = max_len - n_query - 3
    # The tokeniser's stride is the overlap between windows; the recipe's is the step.
    tok.enable_truncation(max_len, stride=max(room - stride, 0), strategy='only_second')
    context = ' '.join(ex.words)
    first = tok.encode(q_text, context)
    char_word = np.repeat(np.arange(len(ex.words)), [len(w) + 1 for w in ex.words])
    word_start = np.cumsum([0] + [len(w) + 1 for w in ex.words])
    answer = None
    if ex.answer_start >= 0:
      answer = (
        ex.char_to_word[ex.answer_start],
        ex.char_to_word[min(ex.answer_start + len(ex.answers[0]) - 1, len(ex.char_to_word) - 1)],
      )
    for enc in (first, *first.overflowing):
      seq = enc.sequence_ids
      word = [int(char_word[a]) if s == 1 else -1 for (a, _), s in zip(enc.offsets, seq)]
      label = (0, 0)
      inside = [i for i, w in enumerate(word) if answer is not None and answer[0] <= w <= answer[1]]
      # A label only when the window holds the whole answer: the first token of its first word
      # (it starts where the word starts) to the last of its last word (it ends where it ends).
      if (
        inside
        and enc.offsets[inside[0]][0] == word_start[answer[0]]
        and enc.offsets[inside[-1]][1] == word_start[answer[1]] + len(ex.words[answer[1]])
      ):
        label = (inside[0], inside[-1])
      pad = max_len - len(enc.ids)
      xs.append(np.array([enc.ids + [0] * pad, enc.type_ids + [0] * pad], np.int32))
      ys.append(label)
      ex_ids.append(e_id)
      words.append(word + [-1] * pad)
  tok.no_truncation()
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
