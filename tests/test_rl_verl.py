"""gkl.rl against verl: its call sites, its agg_loss / kl_penalty, and the worker-side patch.

verl itself cannot be imported here: ``verl==0.9.1`` pins transformers<5.11 (gkl pins 5.23.0),
and with ``--no-deps`` its modules fail to import (``verl/__init__`` imports ray, tensordict,
...). The tests therefore use verl's own source, copied verbatim into tests/fixtures/verl/
(attribution in each file): ``agg_loss`` / ``kl_penalty`` / ``kl_penalty_forward`` of
github volcengine/verl @ b178a3c and of the PyPI wheel 0.9.1, and the import and call
statements of ``verl/workers/actor/dp_actor.py``, ``verl/workers/actor/megatron_actor.py`` and
``verl/workers/utils/losses.py`` (b178a3c), parsed here with ``ast`` and run as verl runs them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gkl.rl import agg_loss, kl_penalty

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "verl"
VERSIONS = ("b178a3c", "v0_9_1")
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _load(version: str):
    spec = importlib.util.spec_from_file_location(
        f"verl_core_algos_{version}", FIXTURES / f"core_algos_{version}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_sites() -> dict[str, list[str]]:
    """file -> the verbatim statements (import first) from the fixture, in order."""
    source = (FIXTURES / "callsites_b178a3c.py").read_text()
    sites: dict[str, list[str]] = {}
    current = None
    for line in source.splitlines():
        if line.startswith("# verl/"):
            current = line[2:].split(":")[0]
        elif current and line.strip():
            sites.setdefault(current, []).append(line)
            current = None
    return sites


SITES = _call_sites()


def _kl_body(statements: list[str]) -> str:
    """A function running one file's kl_penalty call and the agg_loss call on its result."""
    kl_call = next(s for s in statements if s.startswith("kl_penalty("))
    agg_call = next(s for s in statements if s.startswith("agg_loss(") and "loss_mat=kld" in s)
    return (
        "def kl_loss(self, config, log_prob, ref_log_prob, response_mask, loss_agg_mode):\n"
        f"    kld = {kl_call}\n"
        f"    return {agg_call}\n"
    )


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    log_prob = -torch.rand(5, 7, generator=g) * 3
    ref_log_prob = -torch.rand(5, 7, generator=g) * 3
    response_mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    response_mask[:, 0] = 1.0
    response_mask[4] = 0.0  # an all-padding row
    return log_prob.to(dtype), ref_log_prob.to(dtype), response_mask


def _configs(mode: str, kl_loss_type: str):
    info = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 12, "loss_scale_factor": 9}
    config = SimpleNamespace(kl_loss_type=kl_loss_type, loss_agg_mode=mode, global_batch_info=info)
    return SimpleNamespace(config=config), config


def test_the_three_call_sites_are_in_the_fixture():
    assert set(SITES) == {
        "verl/workers/actor/dp_actor.py",
        "verl/workers/actor/megatron_actor.py",
        "verl/workers/utils/losses.py",
    }
    for statements in SITES.values():
        assert any("loss_mat=kld, loss_mask=response_mask" in s for s in statements)
        ast.parse("\n".join(statements))


@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize("mode", MODES)
def test_verl_call_sites_give_verls_value_with_gkls_functions(site, mode):
    """Each site's statements, run with gkl's kl_penalty / agg_loss and with verl's (b178a3c),
    by keyword exactly as verl writes them: equal values and gradients."""
    verl = _load("b178a3c")
    body = _kl_body(SITES[site])
    results = []
    for fns in ({"kl_penalty": kl_penalty, "agg_loss": agg_loss}, vars(verl)):
        namespace = {"kl_penalty": fns["kl_penalty"], "agg_loss": fns["agg_loss"]}
        exec(compile(body, site, "exec"), namespace)  # verl's statements, verbatim
        for kl_type in ("kl", "mse", "low_var_kl", "abs"):
            log_prob, ref, mask = _inputs()
            log_prob.requires_grad_(True)
            self_, config = _configs(mode, kl_type)
            value = namespace["kl_loss"](self_, config, log_prob, ref, mask, mode)
            (grad,) = torch.autograd.grad(value, log_prob)
            results.append((value.detach(), grad))
    half = len(results) // 2
    for (v_gkl, g_gkl), (v_verl, g_verl) in zip(results[:half], results[half:], strict=True):
        torch.testing.assert_close(v_gkl, v_verl, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_gkl, g_verl, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", [*MODES, "token-sum"])
def test_agg_loss_keyword_call_equals_verl_with_every_normaliser(mode):
    verl = _load("b178a3c")
    if mode == "token-sum":
        verl = _load("v0_9_1")  # not in b178a3c
    loss_mat, _, mask = _inputs()
    for extra in ({}, {"dp_size": 4, "batch_num_tokens": 57, "global_batch_size": 16}):
        if mode == "seq-mean-token-sum-norm":
            extra = {k: v for k, v in extra.items() if k != "global_batch_size"}
        kw = {"loss_mat": loss_mat, "loss_mask": mask, "loss_agg_mode": mode, **extra}
        torch.testing.assert_close(agg_loss(**kw), verl.agg_loss(**kw), rtol=1e-6, atol=0)


def test_agg_loss_keeps_gkls_earlier_signature():
    loss_mat, _, mask = _inputs(torch.float64)
    expected = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode="token-mean")
    assert agg_loss(loss_mat, mask, "token-mean") == expected
    assert agg_loss(loss_mat, mask=mask, loss_agg_mode="token-mean") == expected
    assert agg_loss(loss_mat, mask, "token-mean", 2, batch_num_tokens=10) == 2 * (
        (loss_mat * mask).sum() / 10
    )
    with pytest.raises(ValueError, match=r"both loss_mask and mask"):
        agg_loss(loss_mat, loss_mask=mask, mask=mask)
    with pytest.raises(ValueError, match=r"loss_mask must be bool or contain only 0 and 1"):
        agg_loss(loss_mat=loss_mat, loss_mask=mask * 2, loss_agg_mode="token-mean")


def test_kl_penalty_matches_both_verl_versions_and_keeps_low_precision():
    for version in VERSIONS:
        verl = _load(version)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            lp, ref, _ = _inputs(dtype)
            for name in ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"):
                ours = kl_penalty(logprob=lp, ref_logprob=ref, kl_penalty=name)
                assert ours.dtype == dtype
                theirs = verl.kl_penalty(logprob=lp, ref_logprob=ref, kl_penalty=name)
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            for bad in ("full", "kl3"):
                with pytest.raises(NotImplementedError):
                    verl.kl_penalty(lp, ref, bad)
                with pytest.raises(NotImplementedError):
                    kl_penalty(lp, ref, bad)


# ----------------------------------------------------------------------- worker-side patch


def _fake_verl(root: Path, version: str) -> None:
    """A verl package tree: core_algos from the fixture, the three modules with verl's import
    statement and their kl_penalty / agg_loss calls."""
    core = (FIXTURES / f"core_algos_{version}.py").read_text()
    core += "\n\ndef get_policy_loss_fn(name):\n    pass\n\n\ndef compute_value_loss():\n    pass\n"
    files = {"verl/trainer/ppo/core_algos.py": core}
    for site, statements in SITES.items():
        files[site] = statements[0] + "\n\n\n" + _kl_body(statements)
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        for parent in target.relative_to(root).parents:
            if str(parent) != ".":
                (root / parent / "__init__.py").touch()


@pytest.fixture
def fake_verl(tmp_path, monkeypatch):
    def make(version):
        _fake_verl(tmp_path, version)
        monkeypatch.syspath_prepend(str(tmp_path))
        return tmp_path

    yield make
    for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:
        del sys.modules[name]


@pytest.mark.parametrize("version", VERSIONS)
def test_external_lib_patches_every_module_that_imported_the_functions(fake_verl, version):
    fake_verl(version)
    core = importlib.import_module("verl.trainer.ppo.core_algos")
    verl_agg, verl_kl = core.agg_loss, core.kl_penalty
    dp = importlib.import_module("verl.workers.actor.dp_actor")  # imported before the patch
    mg = importlib.import_module("verl.workers.actor.megatron_actor")
    assert dp.kl_penalty is verl_kl
    from gkl.rl import verl_integration  # what external_lib=gkl.rl.verl_integration runs

    patched = verl_integration.install()  # idempotent: importing it above installed it too
    assert {
        "verl.trainer.ppo.core_algos.kl_penalty",
        "verl.trainer.ppo.core_algos.agg_loss",
        "verl.workers.actor.dp_actor.kl_penalty",
        "verl.workers.actor.dp_actor.agg_loss",
        "verl.workers.actor.megatron_actor.kl_penalty",
        "verl.workers.actor.megatron_actor.agg_loss",
    } <= set(patched)
    losses = importlib.import_module("verl.workers.utils.losses")  # imported after the patch
    for module in (core, dp, mg, losses):
        assert module.kl_penalty is not verl_kl and module.agg_loss is not verl_agg
    # verl 0.9.1 changed seq-mean-token-sum-norm (divides by the sequence count): kept as verl's
    kept = core.agg_loss.gkl_verl_modes
    assert kept == (() if version == "b178a3c" else ("seq-mean-token-sum-norm",))

    for module in (dp, mg, losses):
        for mode in MODES:
            log_prob, ref, mask = _inputs()
            self_, config = _configs(mode, "low_var_kl")
            if version == "v0_9_1" or module is not losses:
                config.global_batch_info = {}  # dp_size 1, local counts
            got = module.kl_loss(self_, config, log_prob, ref, mask, mode)
            want = verl_agg(
                loss_mat=verl_kl(log_prob, ref, "low_var_kl"), loss_mask=mask,
                loss_agg_mode=mode, **config.global_batch_info,
            )  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        # "k3+" (value of k3, gradient of k2): works after the patch
        log_prob, ref, mask = _inputs()
        log_prob.requires_grad_(True)
        self_, config = _configs("token-mean", "k3+")
        config.global_batch_info = {}
        value = module.kl_loss(self_, config, log_prob, ref, mask, "token-mean")
        (grad,) = torch.autograd.grad(value, log_prob)
        torch.testing.assert_close(grad, (log_prob - ref).detach() * mask / mask.sum())
    if version == "b178a3c":
        with pytest.raises(NotImplementedError):
            verl_kl(log_prob, ref, "k3+")  # what verl does without the patch
