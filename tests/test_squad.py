"""SQuAD for BERT: the tokeniser, the features, the answer decoding and metrics, the weight import."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, models, squad
from tests.fakes import FAKE_SQUAD_CONTEXT, write_fake_squad


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  root = tmp_path_factory.mktemp('squad')
  write_fake_squad(root)
  files = data.squad(root)
  return files, squad.tokenizer(files.vocab)


def test_wordpiece(fake, tmp_path):
  """Lower-casing, accent stripping, punctuation splitting, greedy pieces, [UNK]."""
  _, tok = fake

  def tokens(text):
    return tok.encode(text, add_special_tokens=False).tokens

  assert tokens('Thé BRONCOS, in 2016!') == ['the', 'bro', '##ncos', ',', 'in', '2016', '[UNK]']
  assert tokens("Levi's\tstadium") == ['levi', "'", 's', 'stadium']
  assert tokens('broncosx') == ['[UNK]']  # no piece covers the tail
  (tmp_path / 'vocab.txt').write_text('[UNK]\nthe\n')
  with pytest.raises(ValueError, match=r'lacks \[CLS\]'):
    squad.tokenizer(tmp_path / 'vocab.txt')


def test_features_equal_the_hand_written_tokeniser(fake):
  """The features equal those of the WordPiece tokeniser and windowing this module wrote by hand
  before it used `tokenizers` (its output on the fake SQuAD, kept in tests/data), at BERT's
  384/128 and at short windows that cut words and answers."""
  files, tok = fake
  examples = squad.read_examples(files.dev)
  want = np.load(pathlib.Path(__file__).parent / 'data' / 'squad_features_handwritten.npz')
  for max_len, stride in ((384, 128), (16, 3), (24, 5)):
    feats = squad.featurize(examples, tok, max_len=max_len, stride=stride)
    for key in ('x', 'y', 'example', 'word'):
      np.testing.assert_array_equal(getattr(feats, key), want[f'{key}_{max_len}_{stride}'], err_msg=key)


def test_features_label_the_answer_in_every_window_that_holds_it(fake):
  """Labels point at the answer's tokens (checked by decoding them), in one window or in many
  overlapping short ones; windows without the answer point at [CLS]."""
  files, tok = fake
  examples = squad.read_examples(files.dev)
  assert [e.qid for e in examples] == ['q1', 'q2', 'q3'] and examples[0].words[1] == 'Broncos'
  for max_len, stride in ((384, 128), (16, 3)):
    feats = squad.featurize(examples, tok, max_len=max_len, stride=stride)
    assert feats.x.shape == (len(feats.y), 2, max_len)
    found = set()
    for f, (a, b) in enumerate(feats.y):
      ex = examples[feats.example[f]]
      ids, types = feats.x[f]
      assert ids[0] == tok.token_to_id('[CLS]') and types[0] == 0
      if (a, b) == (0, 0):
        continue
      assert types[a] == 1 and a <= b
      text = ' '.join(ex.words[feats.word[f, a] : feats.word[f, b] + 1])
      assert squad.normalize_answer(text) == squad.normalize_answer(ex.answers[0])
      found.add(ex.qid)
    assert found == {'q1', 'q2', 'q3'}
  short = squad.featurize(examples, tok, max_len=16, stride=3)
  assert len(short.y) > 3 * len(examples) / 2  # the context does not fit one 16-token window


def test_evaluate_exact_and_partial_answers(fake):
  """The labelled spans score 100 EM / F1; a span one token short scores the official F1."""
  files, tok = fake
  feats = squad.featurize(squad.read_examples(files.dev), tok)
  logits = np.full((len(feats.y), feats.x.shape[-1], 2), -5.0, np.float32)
  for f, (a, b) in enumerate(feats.y):
    logits[f, a, 0] = logits[f, b, 1] = 5.0
  batches = iter([logits])
  assert squad.evaluate(lambda v, x: next(batches), None, feats) == {'exact_match': 100.0, 'f1': 100.0}
  # q2 ("Levi's Stadium", or "at Levi's Stadium"): predict "Levi's" only.
  q2 = int(np.flatnonzero(feats.example == 1)[0])
  a, b = feats.y[q2]
  logits[q2, b, 1], logits[q2, b - 1, 1] = -5.0, 5.0
  assert squad.best_answers(feats, logits)[1] == "Levi's"
  batches = iter([logits])
  got = squad.evaluate(lambda v, x: next(batches), None, feats)
  assert got['exact_match'] == pytest.approx(200 / 3)
  assert got['f1'] == pytest.approx(100 * (2 + 2 * 1 * 0.5 / 1.5) / 3)
  assert squad.normalize_answer('The  Broncos!') == 'broncos'
  assert FAKE_SQUAD_CONTEXT.startswith('The Broncos')


def test_load_hf_bert_maps_every_tensor(tmp_path):
  """Hugging Face names land on our parameters (linear weights transposed); wrong shapes and
  files without BERT are clear errors; the inputs are not modified."""
  from safetensors.numpy import save_file

  model = models.BertForSpans(
    encoder=dict(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16, max_position=12)
  )
  x = jnp.zeros((1, 2, 6), jnp.int32)
  variables = model.init(jax.random.key(0), x)
  before = jax.tree.map(np.array, variables)
  rng = np.random.default_rng(0)
  r = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  hf = {
    'bert.embeddings.word_embeddings.weight': r(20, 8),
    'bert.embeddings.position_embeddings.weight': r(12, 8),
    'bert.embeddings.token_type_embeddings.weight': r(2, 8),
    'bert.embeddings.LayerNorm.weight': r(8),
    'bert.embeddings.LayerNorm.bias': r(8),
    'bert.pooler.dense.weight': r(8, 8),
    'cls.predictions.bias': r(20),
    'qa_outputs.weight': r(2, 8),
    'qa_outputs.bias': r(2),
  }
  p = 'bert.encoder.layer.0.'
  for name, (out, inp) in {
    'attention.self.query': (8, 8),
    'attention.self.key': (8, 8),
    'attention.self.value': (8, 8),
    'attention.output.dense': (8, 8),
    'intermediate.dense': (16, 8),
    'output.dense': (8, 16),
  }.items():
    hf[p + name + '.weight'], hf[p + name + '.bias'] = r(out, inp), r(out)
  for name in ('attention.output.LayerNorm', 'output.LayerNorm'):
    hf[p + name + '.weight'], hf[p + name + '.bias'] = r(8), r(8)
  path = str(tmp_path / 'model.safetensors')
  save_file(hf, path)
  got = models.load_hf_bert(path, variables)['params']['bert']
  np.testing.assert_array_equal(
    got['word_embeddings']['embedding'], hf['bert.embeddings.word_embeddings.weight']
  )
  np.testing.assert_array_equal(got['embeddings_norm']['scale'], hf['bert.embeddings.LayerNorm.weight'])
  layer = got['layer_0']
  np.testing.assert_array_equal(
    layer['attention']['query']['kernel'], hf[p + 'attention.self.query.weight'].T
  )
  np.testing.assert_array_equal(layer['attention']['output']['bias'], hf[p + 'attention.output.dense.bias'])
  np.testing.assert_array_equal(layer['attention_norm']['bias'], hf[p + 'attention.output.LayerNorm.bias'])
  np.testing.assert_array_equal(layer['mlp_in']['kernel'], hf[p + 'intermediate.dense.weight'].T)
  np.testing.assert_array_equal(layer['mlp_out']['kernel'], hf[p + 'output.dense.weight'].T)
  np.testing.assert_array_equal(layer['mlp_norm']['scale'], hf[p + 'output.LayerNorm.weight'])
  np.testing.assert_array_equal(got['head']['kernel'], hf['qa_outputs.weight'].T)
  jax.tree.map(np.testing.assert_array_equal, variables, before)  # untouched
  save_file({**hf, 'bert.embeddings.word_embeddings.weight': r(21, 8)}, path)
  with pytest.raises(ValueError, match=r'\(21, 8\).*\(20, 8\)'):
    models.load_hf_bert(path, variables)
  save_file({'cls.predictions.bias': r(20)}, path)
  with pytest.raises(ValueError, match='no BERT encoder tensor'):
    models.load_hf_bert(path, variables)
