"""Shared fixtures: tiny random models saved to a temp dir, an isolated cache, fixed seeds."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

# Tests never touch a hub: huggingface_hub reads this once, at import, so set it before any import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from irmprobe.prompts import load_prompts  # noqa: E402

# Words the tiny tokenizer learns as whole tokens, so that lexicon tokens occur in its samples.
LEXICON_WORDS = (
    "good great love happy nice best wonderful excellent fun beautiful joy win glad "
    "bad terrible hate sad awful worst ugly pain angry fear lose horrible poor"
).split()


def _build_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = load_prompts() + [" ".join(LEXICON_WORDS)] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def _build_sentencepiece_tokenizer(directory):
    """A SentencePiece-style BPE tokenizer (Llama-2, Gemma): word starts marked by ``▁``, not a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    corpus = load_prompts() + [" ".join(LEXICON_WORDS)] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="</s>", add_bos_token=True, legacy=False)
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_sp_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp_tokenizer")
    _build_sentencepiece_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    _build_tokenizer(d)
    return d


def _save_model(model, tokenizer_dir, directory):
    from transformers import AutoTokenizer

    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return _save_model(LlamaForCausalLM(cfg), tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


def perturbed_llama_pair(model_dir):
    """``(pair, base, tuned)``: the tiny Llama at ``model_dir`` and a copy whose block 1 is perturbed and whose
    logits are sharpened, so that conditions changing its computation sample differently."""
    import copy

    from irmprobe.models.loading import load_pair

    pair = load_pair(str(model_dir), None)
    tuned = copy.deepcopy(pair.base)
    with torch.no_grad():
        for p in tuned.model.layers[1].parameters():
            p.add_(0.2 * torch.randn_like(p))
        tuned.lm_head.weight *= 20.0
    return pair, pair.base, tuned


@pytest.fixture(scope="session")
def tiny_neox_dir(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, rotary_pct=0.25)
    return _save_model(GPTNeoXForCausalLM(cfg), tiny_tokenizer_dir, tmp_path_factory.mktemp("neox"))


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path, monkeypatch):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    monkeypatch.setenv("IRMPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")


class _ChatHandler(BaseHTTPRequestHandler):
    """An OpenAI-style chat endpoint on loopback answering from ``replies``: a payload (status 200) or a
    (status, payload) pair, a payload being a dict (sent as JSON) or raw text; 500 once the list is empty."""

    replies: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = type(self).replies.pop(0) if type(self).replies else (500, {"error": "no reply left"})
        status, payload = reply if isinstance(reply, tuple) else (200, reply)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_endpoint():
    """(port, handler class) of a chat endpoint on 127.0.0.1; set ``handler.replies``, read ``handler.seen``."""
    _ChatHandler.replies, _ChatHandler.seen = [], []
    httpd = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port, _ChatHandler
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def planted_llama(tiny_tokenizer_dir):
    """A builder of a random 4-block Llama base whose unembedding gives ``words`` one direction u.

    ``planted_llama(words)`` returns (tokenizer, base, u, planted token ids): biases zeroed (so a bias
    added later writes exactly what it says), logits sharpened, the words' unembedding rows mostly u.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(words):
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        ids = sorted({t[0] for w in words if len(t := tok(" " + w, add_special_tokens=False)["input_ids"]) == 1})
        assert len(ids) >= 3
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, mlp_bias=True)
        base = LlamaForCausalLM(cfg).eval()
        u = torch.randn(32)
        u /= u.norm()
        with torch.no_grad():
            for module in base.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            base.lm_head.weight *= 30.0  # a random tiny model's logits are near-uniform: sharpen them
            base.lm_head.weight[ids] = 3.0 * u + 0.1 * base.lm_head.weight[ids]
        return tok, base, u, ids

    return build


# The words a trained classifier RM rewards (+) and punishes (-); every other word is worth nothing to it.
CLASSIFIER_PLANTED = {"good": 1.0, "great": 1.0, "love": 1.0, "happy": 1.0, "wonderful": 1.0,
                      "bad": -1.0, "terrible": -1.0, "hate": -1.0, "sad": -1.0, "awful": -1.0}


def train_classifier_rm(tokenizer_dir, weights: dict, directory, *, n_texts: int = 3000, steps: int = 400):
    """A tiny Llama sequence classifier (one regression logit) trained to score a text by the sum of ``weights``
    of the words it holds: a neural RM whose answer is known. Saved (with the tokenizer) to ``directory``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(0)
    prompts = [p.split() for p in load_prompts()]
    planted = list(weights)
    texts, targets = [], []
    for _ in range(n_texts):
        words = list(prompts[rng.integers(len(prompts))])
        inserted = rng.choice(planted, size=min(len(planted), int(rng.integers(0, 3))), replace=False)
        for w in inserted:
            words.insert(int(rng.integers(len(words) + 1)), str(w))
        texts.append(" ".join(words))
        targets.append(sum(weights[str(w)] for w in inserted))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      num_labels=1, problem_type="regression")
    model = LlamaForSequenceClassification(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    y = torch.tensor(targets, dtype=torch.float32)
    model.train()
    for _ in range(steps):
        idx = rng.integers(len(texts), size=64)
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=64)
        loss = torch.nn.functional.mse_loss(model(**enc).logits[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def classifier_rm_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A classifier RM trained to score a text by the planted words it holds, ``CLASSIFIER_PLANTED``."""
    return train_classifier_rm(tiny_tokenizer_dir, CLASSIFIER_PLANTED, tmp_path_factory.mktemp("classifier_rm"))
