"""gkl.rl.grpo: TRL's GRPOTrainer with its KL term swapped for gkl's, on a tiny random GPT-2.

The model is built from a GPT2Config (no downloaded weights) and saved to a temporary folder,
the tokenizer is an in-memory word-level one. Skipped unless trl and transformers import.
"""

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
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=5, report_to="none", use_cpu=True, max_steps=1, bf16=False,
        save_strategy="no", logging_steps=1, **kwargs,
    )  # fmt: skip
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
            kl_estimator="k3", kl_is_mode=is_mode,
        )  # fmt: skip
        inputs = _inputs(trainer.model)
        _assert_same(_loss_and_grads(trainer, inputs), _loss_and_grads(trainer, inputs, True))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_swapped_kl_term_is_what_gkl_computes(tiny_gpt2, tmp_path, loss_type):
    trainer = _trainer(
        tiny_gpt2, tmp_path, loss_type=loss_type, kl_estimator="k2", kl_is_mode="cumulative"
    )
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
    }[loss_type]
    term = kl_loss(
        logps, inputs["ref_per_token_logps"], estimator="k2", mask=m,
        old_logprobs=inputs["old_per_token_logps"], is_mode="cumulative", **agg,
    )  # fmt: skip
    term.backward()
    term_grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    expected = (
        no_kl[0] + BETA * term.detach(),
        [a + BETA * b for a, b in zip(no_kl[1], term_grads, strict=True)],
    )
    _assert_same(swapped, expected)
    assert (BETA * term).abs() > 1e-3  # the KL term is not negligible in this comparison


def test_one_training_step_runs_and_logs_the_kl(tiny_gpt2, tmp_path):
    trainer = _trainer(tiny_gpt2, tmp_path, loss_type="grpo", kl_estimator="k2")
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any("kl" in entry for entry in trainer.state.log_history)


def test_bad_options_raise(tiny_gpt2, tmp_path):
    with pytest.raises(ValueError, match=r"kl_is_mode must be one of"):
        _trainer(tiny_gpt2, tmp_path, kl_is_mode="per-token")
    with pytest.raises(ValueError, match=r"estimator must be one of"):
        _trainer(tiny_gpt2, tmp_path, kl_estimator="k5")


def test_transformer_demo_cumulative_run_follows_the_on_policy_run(monkeypatch):
    """scripts/transformer_kl_demo.py: with stale rollouts, cumulative IS reproduces the
    on-policy trajectory of k2-as-loss step for step; detached IS drifts away from it."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "transformer_kl_demo.py"
    spec = importlib.util.spec_from_file_location("transformer_kl_demo", path)
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "transformer_kl_demo", demo)  # dataclasses look it up
    spec.loader.exec_module(demo)
    problem = demo.Enumerated(vocab=2, length=3, seed=0)
    args = argparse.Namespace(steps=12, lr=2e-2, lag=4, seed=0)
    by_label = {m.label: m for m in demo.METHODS}
    final = {
        label: demo.run(problem, by_label[label], args).final_logp
        for label in ("k2 as loss", "k2, IS cumulative", "k2, IS detached")
    }
    assert torch.exp(final["k2 as loss"]).sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(final["k2, IS cumulative"], final["k2 as loss"], rtol=0, atol=1e-9)
    assert (final["k2, IS detached"] - final["k2 as loss"]).abs().max() > 1e-6
