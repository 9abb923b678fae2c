"""Feature distillers: one float64 SGD step of DistillationTask against references written here.

The references transcribe mdistiller's distillers (mdistiller/distillers/<Name>.py, settings of
engine/cfg.py and configs/cifar100/<name>.yaml) and its CIFAR ResNet's feature outputs
(models/cifar/resnet.py: ``feats``, ``preact_feats``, ``pooled_feat``); the SGD step is written out
(first step of momentum SGD: ``p - lr * (g + wd * p)``).
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkl.data.datasets import ImageTensorDataset
from gkl.data.instance_sample import EpochKeySampler, InstanceSampleDataset
from gkl.distillers import (
    AT,
    BASELINES,
    CRD,
    KDSVD,
    NST,
    OFD,
    PKT,
    RKD,
    SP,
    VID,
    FitNet,
    LossSum,
    ReviewKD,
)
from gkl.losses import GKLLoss, KDLoss
from gkl.models import create_model
from gkl.models.features import feature_shapes, forward_with_features
from gkl.models.wrappers import CIFAR100_MEAN, CIFAR100_STD, FrozenTeacher, Normalized
from gkl.tasks import DistillationTask
from gkl.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WD, BATCH = 0.05, 5e-4, 8

# ----------------------------------------------------------------- mdistiller's ResNet features


def ref_block(block, x):
    """mdistiller BasicBlock.forward with is_last: (relu(out), preact)."""
    out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    residual = x if block.downsample is None else block.downsample(x)
    preact = out + residual
    return F.relu(preact), preact


def ref_resnet(normalized, x):
    """mdistiller ResNet.forward: (logits, {"feats", "preact_feats", "pooled_feat"})."""
    net = normalized.model
    x = (x - normalized.mean) / normalized.std
    x = torch.relu(net.bn1(net.conv1(x)))
    feats, pre = [x], [x]
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            x, p = ref_block(block, x)
        feats.append(x)
        pre.append(p)
    avg = F.avg_pool2d(x, 8).reshape(x.size(0), -1)
    return net.fc(avg), {"feats": feats, "preact_feats": pre, "pooled_feat": avg}


# ----------------------------------------------------------------- mdistiller's losses


def ref_pool(f_s, f_t):
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def ref_fitnet(mods, fs, ft):
    return 100.0 * F.mse_loss(mods.conv_reg(fs["feats"][2]), ft["feats"][2])


def ref_at(mods, fs, ft):
    def at(f):
        return F.normalize(f.pow(2).mean(1).reshape(f.size(0), -1))

    total = 0
    for f_s, f_t in zip(fs["feats"][1:], ft["feats"][1:], strict=False):
        f_s, f_t = ref_pool(f_s, f_t)
        total = total + (at(f_s) - at(f_t)).pow(2).mean()
    return 1000.0 * total


def ref_sp(mods, fs, ft):
    f_s, f_t = fs["feats"][-1], ft["feats"][-1]
    b = f_s.shape[0]
    g_s = F.normalize(torch.mm(f_s.view(b, -1), f_s.view(b, -1).t()))
    g_t = F.normalize(torch.mm(f_t.view(b, -1), f_t.view(b, -1).t()))
    d = g_t - g_s
    return 3000.0 * (d * d).view(-1, 1).sum(0)[0] / (b * b)


def ref_pkt(mods, fs, ft, eps=1e-7):
    f_s, f_t = fs["pooled_feat"], ft["pooled_feat"]
    f_s = f_s / (torch.sqrt(torch.sum(f_s**2, dim=1, keepdim=True)) + eps)
    f_t = f_t / (torch.sqrt(torch.sum(f_t**2, dim=1, keepdim=True)) + eps)
    ms = (torch.mm(f_s, f_s.t()) + 1.0) / 2.0
    ts = (torch.mm(f_t, f_t.t()) + 1.0) / 2.0
    ms = ms / ms.sum(dim=1, keepdim=True)
    ts = ts / ts.sum(dim=1, keepdim=True)
    return 30000.0 * torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


def ref_pdist(e, eps=1e-12):
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def ref_rkd(mods, fs, ft):
    stu, tea = fs["pooled_feat"], ft["pooled_feat"]
    t_d = ref_pdist(tea)
    t_d = t_d / t_d[t_d > 0].mean()
    d = ref_pdist(stu)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = F.normalize(tea.unsqueeze(0) - tea.unsqueeze(1), p=2, dim=2)
    sd = F.normalize(stu.unsqueeze(0) - stu.unsqueeze(1), p=2, dim=2)
    loss_a = F.smooth_l1_loss(
        torch.bmm(sd, sd.transpose(1, 2)).view(-1), torch.bmm(td, td.transpose(1, 2)).view(-1)
    )
    return 25 * loss_d + 50 * loss_a


def ref_nst(mods, fs, ft):
    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    total = 0
    for f_s, f_t in zip(fs["feats"][1:], ft["feats"][1:], strict=False):
        f_s, f_t = ref_pool(f_s, f_t)
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        total = total + poly(f_t, f_t).mean() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()
    return 50.0 * total


def ref_svd(feat, n):
    b, c, h, w = feat.shape
    u, s, v = torch.svd(feat.view(b, c * h, w))
    fin = lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # noqa: E731
    return F.normalize(fin(s)[:, :n], dim=1), F.normalize(fin(v)[:, :, :n], dim=1)


def ref_kdsvd(mods, fs, ft, k=1):
    losses, v_sb, v_tb = [], None, None
    for i, (f_s, f_t) in enumerate(zip(fs["feats"][1:], ft["feats"][1:], strict=False)):
        s_t, v_t = ref_svd(f_t, k)
        _, v_s = ref_svd(f_s, k + 3)
        cos = torch.matmul(v_s.transpose(-2, -1), v_t)
        mx, _ = torch.max(torch.abs(cos), 1, keepdim=True)
        mask = torch.where(torch.eq(mx, torch.abs(cos)), torch.sign(cos), torch.zeros_like(cos))
        v_s = torch.matmul(v_s, mask)
        s_t = s_t.unsqueeze(1)
        v_t, v_s = v_t * s_t, v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2 = (s_rbf - t_rbf.detach()).pow(2)
            losses.append(torch.where(torch.isfinite(l2), l2, torch.zeros_like(l2)).sum())
        v_tb, v_sb = v_t, v_s
    return sum(x / BATCH for x in losses)


def ref_vid(mods, fs, ft, eps=1e-5):
    total = 0
    for i, (f_s, f_t) in enumerate(zip(fs["feats"][1:], ft["feats"][1:], strict=False)):
        f_s, f_t = ref_pool(f_s, f_t)
        mean = mods.regressors[i](f_s)
        var = (torch.log(1.0 + torch.exp(mods.log_scales[i])) + eps).view(1, -1, 1, 1)
        total = total + torch.mean(0.5 * ((mean - f_t) ** 2 / var + torch.log(var)))
    return total


def ref_ofd(mods, fs, ft, teacher):
    from statistics import NormalDist

    bns = [layer[-1].bn2 for layer in (teacher.layer1, teacher.layer2, teacher.layer3)]
    total, n = 0, 3
    for i, (f_s, f_t, bn) in enumerate(
        zip(fs["preact_feats"][1:], ft["preact_feats"][1:], bns, strict=False)
    ):
        margin = []
        for s, m in zip(bn.weight.tolist(), bn.bias.tolist(), strict=False):
            s = abs(s)
            cdf = NormalDist().cdf(-m / s)
            if cdf > 0.001:
                margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m)
            else:
                margin.append(-3 * s)
        margin = torch.tensor(margin, dtype=f_s.dtype).view(1, -1, 1, 1)
        src = mods.connectors[i](f_s)
        tgt = F.adaptive_avg_pool2d(f_t, src.shape[-2:])
        loss = (
            (src - margin) ** 2 * ((src > margin) & (tgt <= margin)).double()
            + (src - tgt) ** 2 * ((src > tgt) & (tgt > margin) & (tgt <= 0)).double()
            + (src - tgt) ** 2 * (tgt > 0).double()
        )
        total = total + torch.abs(loss).mean(dim=0).sum() / 2 ** (n - i - 1)
    return 0.001 * total


def ref_abf(abf, x, y, shape, out_shape):
    n, _, h, w = x.shape
    x = abf.conv1(x)
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = abf.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return abf.conv2(x), x


def ref_hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=False):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in [4, 2, 1]:
            if size >= h:
                continue
            cnt /= 2.0
            pooled = F.adaptive_avg_pool2d
            loss += F.mse_loss(pooled(fs, (size, size)), pooled(ft, (size, size))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


# resnet8 student (16-16-32-64), resnet8x4 teacher: ReviewKD's SHAPES / OUT_SHAPES [1, 8, 16, 32]
REVIEW_SHAPES = [1, 8, 16, 32]


def ref_reviewkd_fused(mods, fs):
    x = (fs["feats"][1:] + [fs["pooled_feat"].unsqueeze(-1).unsqueeze(-1)])[::-1]
    out, res = ref_abf(mods.abfs[0], x[0], None, None, REVIEW_SHAPES[0])
    results = [out]
    for f, abf, shape in zip(x[1:], mods.abfs[1:], REVIEW_SHAPES[1:], strict=False):
        out, res = ref_abf(abf, f, res, shape, shape)
        results.insert(0, out)
    return results


def ref_reviewkd(mods, fs, ft, epoch=1, warmup=20):
    targets = ft["preact_feats"][1:] + [ft["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
    return 5.0 * min(epoch / warmup, 1.0) * ref_hcl(ref_reviewkd_fused(mods, fs), targets)


METHODS = {
    "fitnet": (FitNet, ref_fitnet),
    "at": (AT, ref_at),
    "sp": (SP, ref_sp),
    "pkt": (PKT, ref_pkt),
    "rkd": (RKD, ref_rkd),
    "nst": (NST, ref_nst),
    "kdsvd": (KDSVD, ref_kdsvd),
    "vid": (VID, ref_vid),
    "ofd": (OFD, ref_ofd),
    "reviewkd": (ReviewKD, ref_reviewkd),
}

# ----------------------------------------------------------------- the pair


def randomize_bn(net: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics (an untrained net has 1/0)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=generator, dtype=torch.float64)
            m.bias.data = 0.5 * torch.randn(c, generator=generator, dtype=torch.float64)
            m.running_mean = 0.1 * torch.randn(c, generator=generator, dtype=torch.float64)
            m.running_var = 0.5 + torch.rand(c, generator=generator, dtype=torch.float64)


def make_pair():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    teacher = Normalized(create_model("resnet8x4", 100), CIFAR100_MEAN, CIFAR100_STD).double()
    student = Normalized(create_model("resnet8", 100), CIFAR100_MEAN, CIFAR100_STD).double()
    randomize_bn(teacher, g)
    x = torch.rand(BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 100, (BATCH,), generator=g)
    return student, FrozenTeacher(teacher), x, y


def make_task(student, teacher, loss, warmup=0):
    sgd = partial(torch.optim.SGD, lr=LR, momentum=0.9, weight_decay=WD)
    return DistillationTask(student, teacher, loss, 100, sgd, warmup_epochs=warmup)


def sgd_reference(params, loss):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [
        p.detach() - LR * (g + WD * p.detach()) if g is not None else p.detach()
        for p, g in zip(params, grads, strict=False)
    ]


@pytest.mark.parametrize("name", list(METHODS))
def test_one_float64_step_equals_mdistiller_reference(name):
    """loss to 1e-12, student and extra-module weights after one SGD step to 1e-10."""
    cls, reference = METHODS[name]
    student, teacher, x, y = make_pair()
    warmup = 20 if name == "reviewkd" else 0
    task = make_task(student, teacher, cls(), warmup)
    task.train()
    # the reference: copies taken before the step, mdistiller's forward and loss
    ref_student, ref_mods = copy.deepcopy(task.model), copy.deepcopy(task.distill_loss)
    ref_student.train(), ref_mods.train()
    with torch.no_grad():
        _, ft = ref_resnet(teacher.model, x)
    logits, fs = ref_resnet(ref_student, x)
    extra = (teacher.model.model,) if name == "ofd" else ()
    feat = reference(ref_mods, fs, ft, *extra)
    feat_grads = torch.autograd.grad(
        feat, list(ref_student.parameters()), retain_graph=True, allow_unused=True
    )
    # the distillation term moves the student
    assert max(g.abs().max().item() for g in feat_grads if g is not None) > 0
    ref_loss = F.cross_entropy(logits, y) + feat
    ref_params = [*ref_student.parameters(), *ref_mods.parameters()]
    expected = sgd_reference(ref_params, ref_loss)

    optimizer = task.configure_optimizers()
    loss, _, _ = task.compute_loss(x, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    n_extra = len(list(task.distill_loss.parameters()))
    print(f"{name}: loss {loss.item():.6f} |diff| {abs(loss.item() - ref_loss.item()):.1e}")
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * max(1.0, abs(ref_loss.item()))
    params = [*task.model.parameters(), *task.distill_loss.parameters()]
    assert len(params) == len(expected) and len(params) == len(task.trainable_parameters())
    worst = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected, strict=False))
    print(f"{name}: {n_extra} extra tensors, max |w - w_ref| after the step {worst:.1e}")
    assert worst <= 1e-10


# ----------------------------------------------------------------- feature access


@pytest.mark.parametrize(
    "name, shapes",
    [
        ("resnet8x4", [(32, 32), (64, 32), (128, 16), (256, 8)]),
        ("wrn_16_2", [(16, 32), (32, 32), (64, 16), (128, 8)]),
        ("vgg8", [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)]),
        ("fmnist_cnn", [(32, 14), (64, 7), (128, 3)]),
        ("timm:resnet18", [(64, 32), (64, 16), (128, 8), (256, 4), (512, 2)]),  # mdistiller's
    ],  # ImageNet layout (stem before the max-pool), here on 64x64 inputs
)
def test_features_keep_the_logits_and_have_mdistillers_shapes(name, shapes):
    channels, size = (1, 28) if name.startswith("fmnist") else (3, 64 if "timm" in name else 32)
    if name.startswith("timm:"):
        import timm

        network = timm.create_model(name[5:], num_classes=10)
    else:
        network = create_model(name, 10, in_channels=channels)
    net = Normalized(network, [0.5] * channels, [0.25] * channels).eval()
    keys = list(net.state_dict())
    x = torch.rand(2, channels, size, size)
    logits, features = forward_with_features(net, x)
    torch.testing.assert_close(logits, net(x), rtol=0, atol=0)
    assert [(s[1], s[2]) for s in feature_shapes(net, (channels, size, size))] == shapes
    flat = 9 if name.startswith("fmnist") else 1  # SmallCNN: the flattened 3x3 maps
    assert features.pooled_feat.shape == (2, shapes[-1][0] * flat)
    if not name.startswith("wrn"):  # WRN's pre-activations are the next BN's outputs
        pairs = zip(features.preact_feats[1:], features.feats[1:], strict=True)
        assert all(F.relu(p).equal(f) for p, f in pairs)
    assert list(net.state_dict()) == keys


def test_unsupported_network_and_teacher_cache_are_refused():
    student, teacher, _, _ = make_pair()
    with pytest.raises(ValueError, match="no feature access"):
        forward_with_features(nn.Linear(4, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no feature access"):
        FitNet().setup(nn.Linear(4, 4), teacher)
    sgd = partial(torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="cache_teacher_outputs=false"):
        DistillationTask(student, teacher, AT(), 100, sgd, cache_teacher_outputs=True)


def test_gkl_plus_reviewkd_is_the_sum_and_modules_stay_out_of_the_export():
    student, teacher, x, y = make_pair()
    gkl, review = GKLLoss(beta=8.0, gamma=1.0), ReviewKD()
    task = make_task(student, teacher, LossSum([gkl, review]))
    task.train()
    loss, logits, parts = task.compute_loss(x, y)
    _, fs = forward_with_features(task.model, x)
    t_logits, ft = forward_with_features(teacher, x)
    expected = gkl(logits, t_logits, y) + review(
        logits, t_logits, y, student_features=fs, teacher_features=ft
    )
    torch.testing.assert_close(parts["distill"], expected, rtol=1e-12, atol=0)
    keys = set(task.state_dict())
    assert any(k.startswith("distill_loss.terms.1.abfs.") for k in keys)
    student2, teacher2, _, _ = make_pair()  # a resumed run rebuilds the same modules
    make_task(student2, teacher2, LossSum([GKLLoss(), ReviewKD()])).load_state_dict(
        task.state_dict(), strict=True
    )
    assert not any("abfs" in k for k in task.export_model.state_dict())
    assert KDLoss().forward.__code__.co_argcount == 5  # logit losses keep their signature


# ----------------------------------------------------------------- CRD


def ref_crd(embed_s, embed_t, memory_v1, memory_v2, fs, ft, idx, contrast_idx, num_data):
    """mdistiller CRD.crd_loss (Embed, ContrastMemory, ContrastLoss) with K, T, momentum of
    engine/cfg.py; returns (0.8 * loss, updated memory_v1, updated memory_v2)."""

    def embed(module, f):
        v = module.linear(f.reshape(f.shape[0], -1))
        return v.div(v.pow(2).sum(1, keepdim=True).pow(0.5))

    def contrast_loss(x):
        eps, bsz, m = 1e-7, x.shape[0], x.size(1) - 1
        pn = 1 / float(num_data)
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz

    v1, v2 = embed(embed_s, fs["pooled_feat"]), embed(embed_t, ft["pooled_feat"])
    b, k1, d, t, momentum = v1.size(0), contrast_idx.shape[1], v1.shape[1], 0.07, 0.5
    w1 = torch.index_select(memory_v1, 0, contrast_idx.view(-1)).detach().view(b, k1, d)
    out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(b, d, 1)), t))
    w2 = torch.index_select(memory_v2, 0, contrast_idx.view(-1)).detach().view(b, k1, d)
    out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(b, d, 1)), t))
    z_v1 = (out_v1.mean() * num_data).item()
    z_v2 = (out_v2.mean() * num_data).item()
    out_v1, out_v2 = torch.div(out_v1, z_v1), torch.div(out_v2, z_v2)
    new = []
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            pos = torch.index_select(memory, 0, idx.view(-1)).mul(momentum).add(v * (1 - momentum))
            memory = memory.clone()
            memory.index_copy_(0, idx, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
            new.append(memory)
    loss = contrast_loss(out_v1) + contrast_loss(out_v2)
    return 0.8 * loss[0], new[0], new[1]


def test_crd_step_and_memory_update_equal_mdistiller_reference():
    student, teacher, x, y = make_pair()
    num_data, k = 40, 16
    task = make_task(student, teacher, CRD(k=k))
    task.distill_loss.set_num_data(num_data)
    task.train()
    g = torch.Generator().manual_seed(2)
    index = torch.randperm(num_data, generator=g)[:BATCH]
    negatives = torch.randint(0, num_data, (BATCH, k), generator=g)
    sample_index = torch.cat([index[:, None], negatives], dim=1)
    ref_student, ref_mods = copy.deepcopy(task.model), copy.deepcopy(task.distill_loss)
    with torch.no_grad():
        _, ft = ref_resnet(teacher.model, x)
    logits, fs = ref_resnet(ref_student, x)
    crd, memory_s, memory_t = ref_crd(
        ref_mods.embed_s, ref_mods.embed_t, ref_mods.memory_s, ref_mods.memory_t,
        fs, ft, index, sample_index, num_data,
    )  # fmt: skip
    ref_loss = F.cross_entropy(logits, y) + crd
    expected = sgd_reference([*ref_student.parameters(), *ref_mods.parameters()], ref_loss)

    optimizer = task.configure_optimizers()
    loss, _, _ = task.compute_loss(x, y, index=index, sample_index=sample_index)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"crd: loss {loss.item():.6f} |diff| {abs(loss.item() - ref_loss.item()):.1e}")
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * max(1.0, abs(ref_loss.item()))
    params = [*task.model.parameters(), *task.distill_loss.parameters()]
    worst = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected, strict=True))
    memory = max(
        (task.distill_loss.memory_s - memory_s).abs().max().item(),
        (task.distill_loss.memory_t - memory_t).abs().max().item(),
    )
    print(f"crd: max |w - w_ref| {worst:.1e}, max |memory - memory_ref| {memory:.1e}")
    assert worst <= 1e-10 and memory <= 1e-12
    assert not task.distill_loss.memory_s[index].equal(ref_mods.memory_s[index])  # rows moved
    assert "distill_loss.memory_s" in task.state_dict()


def test_instance_sampling_follows_mdistiller_and_resumes_mid_epoch():
    labels = torch.arange(30) % 3  # 10 items per class: 20 negatives each
    images = torch.zeros(30, 1, 2, 2, dtype=torch.uint8)
    data = InstanceSampleDataset(ImageTensorDataset(images, labels), labels, k=8, seed=5)
    x, y, i, sample = data[(0, 7)]
    assert i.item() == 7 and sample[0].item() == 7 and len(sample) == 9
    assert (labels[sample[1:]] != y).all() and len(set(sample[1:].tolist())) == 8  # no repeats
    assert sample.equal(data[(0, 7)][3]) and not sample.equal(data[(1, 7)][3])  # (seed, epoch, i)
    relax = InstanceSampleDataset(ImageTensorDataset(images, labels), labels, 25, "relax")
    _, _, _, sample = relax[(0, 7)]
    assert labels[sample[0]] == labels[7] and (labels[sample[1:]] != labels[7]).all()
    assert len(sample) == 26  # k > 20 negatives: drawn with replacement
    full = list(EpochKeySampler(30, seed=1))
    sampler = EpochKeySampler(30, seed=1)
    sampler.resume(0, 12)
    assert list(sampler) == full[12:] and all(e == 0 for e, _ in full)
    with pytest.raises(ValueError, match="instance_sample_mode"):
        InstanceSampleDataset(data.dataset, labels, 4, "hard")


def test_crd_baseline_runs_through_train_with_instance_sampling(compose_cfg, tmp_path):
    """+baseline=crd end to end: the data module serves (x, y, index, sample_index), the task
    sizes the memory banks by the training set."""
    cfg = compose_cfg(
        tmp_path,
        [
            "+experiment=cifar100_kd_res56_res20",
            "+baseline=crd",
            "model.name=resnet8",
            "teacher.name=resnet8x4",
            "data.synthetic=true",
            "trainer.fast_dev_run=true",
            "data.batch_size=4",
            "++data.synthetic_sizes=[8,4,4]",
            "data.num_workers=0",
        ],
    )
    assert cfg.loss.k == 16384 and cfg.data.instance_sample_k == 16384
    metrics = run(cfg)
    assert math.isfinite(metrics["test/loss"])


def test_gkl_reviewkd_config_lists_both_losses_and_feeds_the_class_prior(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(tmp_path, ["+experiment=cifar100_kd", "loss=gkl_reviewkd"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, LossSum) and [type(t) for t in loss.terms] == [GKLLoss, ReviewKD]
    assert loss.use_class_prior and loss.temperature2 == 4.0 and loss.needs_features
    student, teacher, _, _ = make_pair()
    task = make_task(student, teacher, loss)
    assert task.class_prior is not None and task.class_prior.temperature == 4.0


def test_every_command_in_the_distillers_doc_composes(compose_cfg, tmp_path):
    """The training commands of docs/distillers.md compose (their runs take GPU days) and choose
    the documented distiller; the smoke runs' outputs are shown beside them there."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "distillers.md").read_text()
    commands = re.findall(r"^ {4}python train\.py ([^#\n]+)", doc, flags=re.M)
    assert len(commands) >= 4
    for command in commands:
        cfg = compose_cfg(tmp_path, command.split())
        baseline = re.search(r"\+baseline=(\S+)", command)
        if baseline:
            cls = BASELINES[baseline.group(1)]
            assert cfg.loss._target_ == f"gkl.distillers.{cls.__name__}", command
        else:
            assert cfg.loss._target_ == "gkl.distillers.LossSum", command


@pytest.mark.parametrize(
    "teacher_name, student_name, shape",
    [("fmnist_cnn", "fmnist_cnn_small", (1, 28, 28)), ("vgg13", "vgg8", (3, 32, 32))],
)
def test_every_distiller_builds_and_backpropagates_on_other_families(
    teacher_name, student_name, shape
):
    """Modules sized from the pair: SmallCNN's flattened pooled features, VGG's five feats."""
    teacher = FrozenTeacher(create_model(teacher_name, 10, in_channels=shape[0]))
    student = create_model(student_name, 10, in_channels=shape[0])
    x, y = torch.rand(4, *shape), torch.randint(0, 10, (4,))
    for name, cls in BASELINES.items():
        if name == "crd":  # needs the instance-sampling batches: tested above
            continue
        kwargs = (
            {"input_shape": shape} if "input_shape" in cls.__init__.__code__.co_varnames else {}
        )
        loss = cls(**kwargs)
        loss.setup(student, teacher)
        logits, fs = forward_with_features(student, x)
        t_logits, ft = forward_with_features(teacher, x)
        value = loss(logits, t_logits, y, student_features=fs, teacher_features=ft)
        value.backward()
        assert torch.isfinite(value), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        student.zero_grad()


def test_pairs_a_method_cannot_compare_are_refused_by_name():
    teacher = FrozenTeacher(create_model("wrn_16_2", 10))
    student = create_model("vgg8", 10)  # 4 stages of other sizes than the WRN's 3
    with pytest.raises(ValueError, match="one to one"):
        ReviewKD().setup(student, teacher)
    x = torch.rand(2, 3, 32, 32)
    fs, ft = forward_with_features(student, x)[1], forward_with_features(teacher, x)[1]
    with pytest.raises(ValueError, match="same width"):
        KDSVD().feature_loss(fs, ft, None)
    assert torch.isfinite(AT().feature_loss(fs, ft, None))  # first stages paired, as mdistiller
