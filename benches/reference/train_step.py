"""The COTS training step in plain PyTorch, for benches/train_step.sh (issue #23).

Reads the spec our side prints (`step_profile spec --size S`: the model
config, batch shapes, queue, optimizer and objective settings, and our
parameter count), builds the same two-stream model and runs the same step on
random inputs:

  forward: online ViT (pre-LN, CLS, final LN) and BERT (post-LN, CLS) with
           dropout where the config has it, linear projections, L2
           normalisation, the learnable temperature clamped to [0.001, 0.5];
           the momentum towers (eval mode, no grad) give the keys;
  losses:  ITC over the lockstep queues, rows with the queue slots of the
           same image id as extra positives (soft-target cross-entropy:
           lse(logits) - mean of the positive logits), both directions;
           symmetric KL between the i2t and t2i distributions over
           [own key, queue]; total = itc_i2t + itc_t2i + kl;
  update:  backward, clip_grad_norm_ (global, max 5), torch.optim.AdamW
           (decay / no-decay groups by our naming rule), EMA of every online
           parameter into the momentum towers, enqueue of the keys and ids.

Differences from ours, none of which changes the amount of model work:
- the logits [B, 1 + K] are computed once per direction and shared by ITC
  and KL (autograd reuses them); ours runs two fused ops (ITC, KL) that each
  recompute them, which is the cheaper choice at large K only;
- the patch embedding is nn.Conv2d with stride = patch (ours: patchify +
  matmul, the same FLOPs); attention is written out (matmul, softmax,
  matmul) like ours, or F.scaled_dot_product_attention with --sdpa;
- the learning-rate schedule is constant (ours: warm-up then cosine; one
  scalar per step);
- inputs are random (pixels ~ N(0, 1), token ids below 64, the same share of
  padding as our synthetic batches, which differ in length), ours are
  synthetic scenes.

Prints one JSON line: median ms per step after warm-up and peak RSS (MiB).
Threads: COTS_THREADS (torch.set_num_threads), default all cores.
"""
import argparse
import json
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMP_MIN, TEMP_MAX = 0.001, 0.5


class Attention(nn.Module):
    def __init__(self, d, heads, p_attn, sdpa):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads, self.hd, self.p, self.sdpa = heads, d // heads, p_attn, sdpa

    def forward(self, x, bias=None):
        b, l, d = x.shape
        split = lambda t: t.view(b, l, self.heads, self.hd).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.p if self.training else 0.0)
        else:
            scores = (q * (1.0 / math.sqrt(self.hd))) @ k.transpose(-1, -2)
            if bias is not None:
                scores = scores + bias
            probs = F.dropout(scores.softmax(-1), self.p, self.training)
            ctx = probs @ v
        return ctx.transpose(1, 2).reshape(b, l, d)


class Mlp(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.intermediate, self.output = nn.Linear(d, inner), nn.Linear(inner, d)

    def forward(self, x):
        return self.output(F.gelu(self.intermediate(x)))


class VitLayer(nn.Module):
    """Pre-LN block, as crates/cots-encoders/src/vit.rs."""

    def __init__(self, c, sdpa):
        super().__init__()
        d = c["hidden_size"]
        self.ln1 = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.attn = Attention(d, c["num_attention_heads"], c["attention_probs_dropout_prob"], sdpa)
        self.attn_out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.mlp = Mlp(d, c["intermediate_size"])
        self.p = c["hidden_dropout_prob"]

    def forward(self, x):
        x = x + F.dropout(self.attn_out(self.attn(self.ln1(x))), self.p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), self.p, self.training)


class Vit(nn.Module):
    def __init__(self, c, sdpa):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        n = (c["image_size"] // p) ** 2
        self.patch = nn.Conv2d(c["num_channels"], d, p, stride=p)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        # Unused by the contrastive step (masked vision modeling only), kept
        # so that the parameter count matches ours; it gets no gradient.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.layers = nn.ModuleList(VitLayer(c, sdpa) for _ in range(c["num_hidden_layers"]))
        self.ln = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.p = c["hidden_dropout_prob"]

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = F.dropout(x, self.p, self.training)
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)[:, 0]


class BertLayer(nn.Module):
    """Post-LN block, as crates/cots-encoders/src/bert.rs."""

    def __init__(self, c, sdpa):
        super().__init__()
        d = c["hidden_size"]
        self.attn = Attention(d, c["num_attention_heads"], c["attention_probs_dropout_prob"], sdpa)
        self.attn_out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.mlp = Mlp(d, c["intermediate_size"])
        self.ln2 = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.p = c["hidden_dropout_prob"]

    def forward(self, x, bias):
        x = self.ln1(x + F.dropout(self.attn_out(self.attn(x, bias)), self.p, self.training))
        return self.ln2(x + F.dropout(self.mlp(x), self.p, self.training))


class Bert(nn.Module):
    def __init__(self, c, sdpa):
        super().__init__()
        d = c["hidden_size"]
        self.word = nn.Embedding(c["vocab_size"], d)
        self.position = nn.Embedding(c["max_position_embeddings"], d)
        self.token_type = nn.Embedding(c["type_vocab_size"], d)
        self.ln = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.layers = nn.ModuleList(BertLayer(c, sdpa) for _ in range(c["num_hidden_layers"]))
        self.p = c["hidden_dropout_prob"]

    def forward(self, ids, mask):
        b, l = ids.shape
        pos = torch.arange(l)
        x = self.word(ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(ids))
        x = F.dropout(self.ln(x), self.p, self.training)
        bias = ((1.0 - mask[:, None, None, :].float()) * -10000.0)
        for layer in self.layers:
            x = layer(x, bias)
        return x[:, 0]


class TwoStream(nn.Module):
    def __init__(self, m, sdpa):
        super().__init__()
        self.vision = Vit(m["vision"], sdpa)
        self.text = Bert(m["text"], sdpa)
        self.vision_proj = nn.Linear(m["vision"]["hidden_size"], m["embed_dim"])
        self.text_proj = nn.Linear(m["text"]["hidden_size"], m["embed_dim"])
        self.temp = nn.Parameter(torch.tensor(float(m["temp_init"])))

    def forward(self, pixels, ids, mask):
        f = F.normalize(self.vision_proj(self.vision(pixels)), dim=-1)
        t = F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)
        return f, t, self.temp.clamp(TEMP_MIN, TEMP_MAX)


def no_decay(name):
    """crates/cots-train/src/optim.rs `no_decay`, on this module's names:
    biases, the temperature, LayerNorm weights, learned tokens, positions."""
    parts = name.split(".")
    return (parts[-1] in ("bias", "temp") or any(p.startswith("ln") for p in parts)
            or parts[-1].endswith("_token") or name in ("vision.pos", "text.position.weight"))


def contrastive_logits(q, k, queue, tau):
    """[q . k, q . queue] / tau, [B, 1 + K]."""
    return torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / tau


def itc_rows(logits, pos_mask):
    """Soft-target cross-entropy: lse over all columns minus the mean of the positives."""
    return logits.logsumexp(1) - (logits * pos_mask).sum(1) / pos_mask.sum(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON from `step_profile spec --size S`")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sdpa", action="store_true", help="F.scaled_dot_product_attention")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    threads = int(os.environ.get("COTS_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    spec = json.load(open(args.spec))
    m, optim, obj = spec["model"], spec["optim"], spec["objectives"]
    kinds = {o["kind"]: o for o in obj["objectives"]}
    assert set(kinds) == {"itc", "kl"}, f"only ITC + KL are written here, not {sorted(kinds)}"
    itc, kl = kinds["itc"], kinds["kl"]
    assert itc["keys"] == "momentum" and itc["queue_negatives"] and not itc["in_batch_negatives"]
    assert kl["direction"] == "symmetric" and not kl["stop_grad_target"]
    assert not obj["amf"]["enabled"] and optim["accumulation"] == 1
    assert m.get("projection", {}).get("mlp_hidden") is None
    assert m.get("text_pooling", "cls") == "cls" and m.get("temporal") is None

    model = TwoStream(m, args.sdpa)
    model_m = TwoStream(m, args.sdpa)
    model_m.load_state_dict(model.state_dict())
    model_m.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != spec["params"]:
        print(f"warning: {n_params} parameters here, {spec['params']} in ours")

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": optim["weight_decay"]},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=optim["lr"], betas=(optim["beta1"], optim["beta2"]),
                            eps=optim["eps"])
    pairs = list(zip(model.parameters(), model_m.parameters()))
    momentum = spec["momentum"]

    B, K, E = spec["batch"], obj["queue"]["size"], m["embed_dim"]
    v = m["vision"]
    queue_i = F.normalize(torch.randn(K, E), dim=1)
    queue_t = F.normalize(torch.randn(K, E), dim=1)
    queue_ids = torch.full((K,), -1, dtype=torch.long)
    ptr = 0
    # Our batches' lengths and padding (the loader pads to the longest caption).
    batches = []
    for L, pad_fraction in zip(spec["text_lens"], spec["pad_fractions"]):
        mask = torch.ones(B * L, dtype=torch.long)
        mask[torch.randperm(B * L)[:int(round(pad_fraction * B * L))]] = 0
        mask = mask.view(B, L)
        mask[:, 0] = 1
        batches.append((
            torch.randn(B, v["num_channels"], v["image_size"], v["image_size"]),
            torch.randint(0, min(64, m["text"]["vocab_size"]), (B, L)),
            mask,
            torch.randint(0, 512, (B,)),
        ))
    model.train()

    def step(i):
        nonlocal ptr
        pixels, ids, mask, image_ids = batches[i % len(batches)]
        f, t, tau = model(pixels, ids, mask)
        with torch.no_grad():
            f_m, t_m, _ = model_m(pixels, ids, mask)
        i2t = contrastive_logits(f, t_m, queue_t, tau)
        t2i = contrastive_logits(t, f_m, queue_i, tau)
        same = (image_ids[:, None] == queue_ids[None, :]).float() if itc["use_ids"] \
            else torch.zeros(B, K)
        pos = torch.cat([torch.ones(B, 1), same], 1)
        loss_itc = itc["weight"] * (itc_rows(i2t, pos).mean() + itc_rows(t2i, pos).mean())
        log_p, log_q = i2t.log_softmax(1), t2i.log_softmax(1)
        sym = 0.5 * ((log_p.exp() * (log_p - log_q)).sum(1) + (log_q.exp() * (log_q - log_p)).sum(1))
        loss = loss_itc + kl["weight"] * sym.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"])
        opt.step()
        with torch.no_grad():
            for p, p_m in pairs:
                p_m.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
            queue_i[ptr:ptr + B] = f_m
            queue_t[ptr:ptr + B] = t_m
            queue_ids[ptr:ptr + B] = image_ids
            ptr = (ptr + B) % K
        return loss.item()

    for i in range(args.warmup):
        step(i)
    ms = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(args.warmup + i)
        ms.append((time.perf_counter() - t0) * 1e3)
        assert math.isfinite(loss), f"loss {loss}"
    ms.sort()
    n = len(ms)
    median = ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])
    print(json.dumps({
        "impl": "torch" + ("-sdpa" if args.sdpa else ""),
        "torch": torch.__version__,
        "size": spec["size"],
        "what": "step",
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        "ms_median": median,
        "ms_min": ms[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": n_params,
    }))


if __name__ == "__main__":
    main()
