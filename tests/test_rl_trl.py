"""gkl.rl.grpo: TRL's GRPOTrainer with its KL term swapped for gkl's, on a tiny random GPT-2.

The model is built from a GPT2Config (no downloaded weights) and saved to a temporary folder,
the tokenizer is an in-memory word-level one. Skipped unless trl and transformers import.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from gkl.rl import kl_loss  # noqa: E402
from gkl.rl.grpo import GKLGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4, "d": 5}
BETA = 0.3


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    cfg = transformers.GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )
    return str(path), tokenizer


def _trainer(tiny_gpt2, tmp_path, cls=GKLGRPOTrainer, **kwargs):
    path, tokenizer = tiny_gpt2
    gkl_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("kl_")}
    config = {
        "output_dir": str(tmp_path), "beta": BETA, "per_device_train_batch_size": 4,
        "num_generations": 2, "max_completion_length": 5, "report_to": "none", "use_cpu": True,
        "max_steps": 1, "bf16": False, "save_strategy": "no", "logging_steps": 1,
    }  # fmt: skip
    args = trl.GRPOConfig(**{**config, **kwargs})
    ds = datasets.Dataset.from_dict({"prompt": ["a b", "c d", "b a", "d c"]})
    return cls(
        model=path,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        **gkl_kwargs,
    )


def _inputs(model):
    """A hand-made GRPO micro-batch: padded completions, off-policy old and ref log-probs."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.tensor([[2, 3], [4, 5], [3, 2], [5, 4]])
    completion_ids = torch.randint(2, 6, (4, 5), generator=g)
    completion_mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    )
    with torch.no_grad():
        logps = _logps(model, prompt_ids, completion_ids, completion_mask)
    noise = lambda s: s * torch.randn(4, 5, generator=g)  # noqa: E731
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8]),
        "ref_per_token_logps": (logps + noise(0.7)).clamp(max=0.0),
        "old_per_token_logps": (logps + noise(0.3)).clamp(max=0.0),
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _logps(model, prompt_ids, completion_ids, completion_mask):
    """log pi(completion token | prefix), computed here from the model's logits."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, prompt_ids.shape[1] - 1 : -1]
    return F.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None])[..., 0]


def _loss_and_grads(trainer, inputs, stock: bool = False):
    trainer.model.zero_grad()
    fn = trl.GRPOTrainer._compute_loss if stock else type(trainer)._compute_loss
    loss = fn(trainer, trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return loss.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gkl_k3_reproduces_trl_own_kl_term(tiny_gpt2, tmp_path, loss_type):
    """k3 with no ratio is TRL's plain KL; k3 with a differentiable ratio is bias correction."""
    for bias_correction, is_mode in ((False, "none"), (True, "differentiable")):
        trainer = _trainer(
            tiny_gpt2, tmp_path, loss_type=loss_type, use_bias_correction_kl=bias_correction,
            kl_placement="loss", kl_estimator="k3", kl_is_mode=is_mode,
        )  # fmt: skip
        assert trainer.kl_is_trl_term
        inputs = _inputs(trainer.model)
        # vLLM's sampling log-probs do not enter TRL's KL ratio (old log-probs do)
        inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - 0.1
        _assert_same(_loss_and_grads(trainer, inputs), _loss_and_grads(trainer, inputs, True))


@pytest.mark.parametrize(
    ("loss_type", "placement", "estimator"),
    [("grpo", "loss", "k2"), ("dr_grpo", "loss", "k2"), ("dapo", "reward", "k1"),
     ("luspo", "reward", "k1")],
)  # fmt: skip
def test_swapped_kl_term_is_what_gkl_computes(tiny_gpt2, tmp_path, loss_type, placement, estimator):
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "replaces TRL's KL term" notice
        trainer = _trainer(
            tiny_gpt2, tmp_path, loss_type=loss_type, kl_placement=placement,
            kl_estimator=estimator, kl_is_mode="cumulative", **extra,
        )  # fmt: skip
    inputs = _inputs(trainer.model)
    swapped = _loss_and_grads(trainer, inputs)
    trainer.beta = 0.0
    no_kl = _loss_and_grads(trainer, inputs, stock=True)
    trainer.beta = BETA
    # gkl's term on log-probs computed here, normalised as TRL normalises loss_type
    m = inputs["completion_mask"]
    trainer.model.zero_grad()
    logps = _logps(trainer.model, inputs["prompt_ids"], inputs["completion_ids"], m)
    agg = {
        "grpo": {"loss_agg_mode": "seq-mean-token-mean", "empty_rows": "include"},
        "dr_grpo": {"loss_agg_mode": "dr_grpo", "loss_scale_factor": 5},  # max_completion_length
        "dapo": {"loss_agg_mode": "token-mean", "batch_num_tokens": m.sum().float()},
        "luspo": {"loss_agg_mode": "seq-mean-token-sum", "empty_rows": "include"},
    }[loss_type]
    term = kl_loss(
        logps, inputs["ref_per_token_logps"], estimator=estimator, mask=m,
        old_logprobs=inputs["old_per_token_logps"], is_mode="cumulative", placement=placement,
        **agg,
    )  # fmt: skip
    term.backward()
    term_grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    expected = (
        no_kl[0] + BETA * term.detach(),
        [a + BETA * b for a, b in zip(no_kl[1], term_grads, strict=True)],
    )
    _assert_same(swapped, expected)
    assert (BETA * term).abs() > 1e-3  # the KL term is not negligible in this comparison


def test_k1_in_reward_trains_three_steps_in_training_mode(tiny_gpt2, tmp_path):
    """The default term (k1 in the reward, reward-to-go, cumulative weights) through TRL's real
    train(): three optimiser steps, the KL term computed with the model in training mode, the
    parameters moved, and the logged metrics named for what they hold."""
    seen = []

    class Recording(GKLGRPOTrainer):
        def gkl_kl_term(self, per_token_logps, inputs):
            term = super().gkl_kl_term(per_token_logps, inputs)
            seen.append((self.model.training, term.detach()))
            return term

    with pytest.warns(UserWarning, match=r"replaces TRL's KL term beta \* k3 as a loss"):
        trainer = _trainer(
            tiny_gpt2, tmp_path, cls=Recording, loss_type="dapo", max_steps=3, num_iterations=2,
            learning_rate=1e-2,
        )  # fmt: skip
    assert (trainer.kl_placement, trainer.kl_estimator, trainer.kl_is_mode) == (
        "reward", "k1", "cumulative"
    )  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train()
    assert trainer.state.global_step == 3
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert len(seen) >= 3 and all(training for training, _ in seen)
    assert all(torch.isfinite(term) for _, term in seen)
    after = list(trainer.model.parameters())
    assert any(not torch.equal(p.detach(), q) for p, q in zip(after, before, strict=True))
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"gkl/kl_term", "gkl/k1_token_mean", "gkl/seq_k1_mean"} <= logged
    assert "kl" not in logged  # TRL's name is kept for TRL's own term only


def test_trl_defaults_are_trl_and_a_changed_term_is_announced(tiny_gpt2, tmp_path):
    """beta = 0 (TRL's default): no KL term, the loss is TRL's and nothing is announced. With
    beta > 0, gkl's default term is announced at construction; TRL's own term is not."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = _trainer(tiny_gpt2, tmp_path, beta=0.0)
        inputs = _inputs(trainer.model)
        _assert_same(_loss_and_grads(trainer, inputs), _loss_and_grads(trainer, inputs, True))
        trl_term = _trainer(
            tiny_gpt2, tmp_path, kl_placement="loss", kl_estimator="k3"
        )  # use_bias_correction_kl=True (TRL's default) -> rho * k3
    assert trl_term.kl_is_mode == "differentiable" and trl_term.kl_is_trl_term
    with pytest.warns(UserWarning, match=r"use_bias_correction_kl=False.*To keep TRL's term"):
        changed = _trainer(tiny_gpt2, tmp_path, use_bias_correction_kl=False)
    assert not changed.kl_is_trl_term


def test_nan_sampling_logprobs_fall_back_like_trl(tiny_gpt2, tmp_path):
    """vLLM may return NaN sampling log-probs; TRL zeroes their log-ratio (nan_to_num), so the
    token's behaviour log-prob becomes TRL's old log-prob. gkl's term does the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = _trainer(tiny_gpt2, tmp_path)
    inputs = _inputs(trainer.model)
    sampling = inputs["old_per_token_logps"] - 0.2
    sampling[0, 1] = sampling[2, 0] = float("nan")
    filled = sampling.clone()
    old = inputs["old_per_token_logps"]
    filled[0, 1], filled[2, 0] = old[0, 1], old[2, 0]
    with_nan = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": sampling})
    assert torch.isfinite(with_nan[0])
    _assert_same(with_nan, _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": filled}))


def test_bad_options_raise_before_the_model_loads(tiny_gpt2, tmp_path):
    missing = tmp_path / "no_model_here"  # never reached: the options are checked first
    cases = [
        ({"kl_is_mode": "per-token"}, r"is_mode must be one of"),
        ({"kl_estimator": "k5"}, r"estimator must be one of"),
        ({"kl_placement": "advantage"}, r"placement must be one of"),
        ({"kl_placement": "loss", "kl_estimator": "k3+", "kl_is_mode": "differentiable"},
         r"cannot be combined with is_mode='differentiable'"),
        ({"kl_is_mode": "differentiable"}, r"KL penalty in the reward must be one of"),
        ({"kl_is_truncation": -1.0, "kl_placement": "loss", "kl_is_mode": "cumulative"},
         r"is_truncation must be None or a positive number"),
        ({"kl_reward_to_go": "yes"}, r"kl_reward_to_go must be True or False"),
        ({"kl_placement": "loss", "kl_estimator": "k3", "importance_sampling_level": "sequence"},
         r"geometric mean"),
        ({"loss_type": "unknown_loss"}, r"loss_type"),
    ]  # fmt: skip
    path, tokenizer = tiny_gpt2
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            _trainer((str(missing), tokenizer), tmp_path, **kwargs)


def test_transformer_demo_exact_corrections_follow_their_on_policy_runs(monkeypatch):
    """scripts/transformer_kl_demo.py (variable lengths with EOS): with stale rollouts, the
    cumulative weights reproduce the on-policy trajectory for token-sum terms (k1 in the reward,
    k2 as loss) step for step, the full-sequence ratio does for GRPO's token mean, and the
    cumulative weights do not for the token mean."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "transformer_kl_demo.py"
    spec = importlib.util.spec_from_file_location("transformer_kl_demo", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "transformer_kl_demo", demo)  # dataclasses look it up
    spec.loader.exec_module(demo)
    problem = demo.Enumerated(vocab=3, length=3, seed=0)
    assert len(problem.seqs) == 15 and set(problem.mask.sum(-1).tolist()) == {1, 2, 3}
    args = argparse.Namespace(steps=10, lr=2e-2, lag=4, seed=0)
    by_label = {m.label: m for m in demo.METHODS}
    labels = (
        demo.K1R, "k1 in reward, IS cumulative", demo.K2, "k2, IS cumulative", demo.K3,
        "k3 token mean, IS sequence", "k3 token mean, IS cumulative",
    )  # fmt: skip
    final = {label: demo.run(problem, by_label[label], args).final_logp for label in labels}
    assert torch.exp(final[demo.K1R]).sum().item() == pytest.approx(1.0, abs=1e-12)
    for exact, twin in (
        ("k1 in reward, IS cumulative", demo.K1R), ("k2, IS cumulative", demo.K2),
        ("k3 token mean, IS sequence", demo.K3),
    ):  # fmt: skip
        torch.testing.assert_close(final[exact], final[twin], rtol=0, atol=1e-9)
    assert (final["k3 token mean, IS cumulative"] - final[demo.K3]).abs().max() > 1e-6
