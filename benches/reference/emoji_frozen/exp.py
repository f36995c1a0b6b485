import os
"""Frozen EfficientNet-Lite0 + MiniLM features -> trained heads, symmetric InfoNCE. Features cached by feats.py / text.py."""
import json, sys, time, copy, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
ROOT = os.environ.get('EMOJI_DIR', 'data/emoji') + '/'; X = os.environ.get('OUT', 'runs/reference-emoji') + '/'
rows = [json.loads(l) for l in open(ROOT + 'manifest.jsonl')]
caps = json.load(open(X + 'caps.json')); cidx = {c: i for i, c in enumerate(caps)}
TXT = torch.from_numpy(np.load(X + 'txt.npy'))
path2row = {r['image']: i for i, r in enumerate(rows)}
tr = [i for i, r in enumerate(rows) if r['split'] == 'train']
tr_caps = [[cidx[c] for c in rows[i]['captions']] for i in tr]
tr_ids = torch.tensor([rows[i]['id'] for i in tr])
TR_ALL = list(tr)

def gallery(split_file=None, split=None):
    g = [json.loads(l) for l in open(ROOT + split_file)] if split_file else [r for r in rows if r['split'] == split and 'google/' in r['image']]
    im = [path2row[r['image']] for r in g]
    cap, owner = [], []
    for j, r in enumerate(g):
        for c in r['captions']: cap.append(cidx[c]); owner.append(j)
    return im, cap, torch.tensor(owner)
TEST = gallery('test-google.jsonl'); VAL = gallery(split='val')

def recalls(zi, zt, owner):
    S = zi @ zt.T  # images x captions
    n = zi.shape[0]; out = []
    rank_t = S.argsort(1, descending=True)  # i2t
    for K in (1, 5, 10):
        out.append((owner[rank_t[:, :K]] == torch.arange(n)[:, None]).any(1).float().mean().item() * 100)
    rank_i = S.T.argsort(1, descending=True)
    for K in (1, 5, 10):
        out.append((rank_i[:, :K] == owner[:, None]).any(1).float().mean().item() * 100)
    return out + [sum(out) / 6]

class Head(nn.Module):
    def __init__(s, d, out=256, mlp=False, hid=1024, drop=0.0):
        super().__init__(); s.mlp = mlp
        s.lin = nn.Linear(d, out); s.drop = nn.Dropout(drop)
        if mlp: s.f = nn.Sequential(nn.Linear(d, hid), nn.GELU(), nn.Linear(hid, out))
    def forward(s, x):
        x = s.drop(x); y = s.lin(x)
        if s.mlp: y = y + s.f(x)
        return F.normalize(y, dim=-1)

def run(res=128, mlp=False, steps=3000, bs=128, lr=1e-3, wd=1e-4, temp=0.07, queue=0, mom=0.995, kl=0.0,
        idmask=False, trsub=None, txtnorm=False, imgstd=False, drop=0.0, out=256, hid=1024, seed=0, verbose=False):
    global tr, tr_caps, tr_ids
    tr = tr0 = TR_ALL
    if trsub is not None:  # train on a subset of train rows (e.g. those with 224-px features)
        keep = set(np.load(trsub).tolist()); tr = [i for i in tr0 if i in keep]
    tr_caps = [[cidx[c] for c in rows[i]['captions']] for i in tr]; tr_ids = torch.tensor([rows[i]['id'] for i in tr])
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    IMG = torch.from_numpy(np.load(X + f'img{res}.npy'))
    T = F.normalize(TXT, dim=-1) if txtnorm else TXT
    if imgstd:
        mu = IMG[tr].mean(0); sd = IMG[tr].std(0) + 1e-3; IMG = (IMG - mu) / sd
    hi, ht = Head(1280, out, mlp, hid, drop), Head(384, out, mlp, hid, drop)
    logit_scale = nn.Parameter(torch.tensor(np.log(1 / temp), dtype=torch.float32))
    params = list(hi.parameters()) + list(ht.parameters())
    opt = torch.optim.AdamW([{'params': params, 'weight_decay': wd}, {'params': [logit_scale], 'weight_decay': 0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    if queue:
        hi_m, ht_m = copy.deepcopy(hi).eval(), copy.deepcopy(ht).eval()
        for p in list(hi_m.parameters()) + list(ht_m.parameters()): p.requires_grad_(False)
        qi = F.normalize(torch.randn(queue, out), dim=-1); qt = F.normalize(torch.randn(queue, out), dim=-1)
        qid = torch.full((queue,), -1, dtype=torch.long); qptr = 0
    n = len(tr); t0 = time.time()
    for step in range(steps):
        b = torch.randint(0, n, (bs,), generator=g)
        ci = torch.tensor([tr_caps[k][torch.randint(0, len(tr_caps[k]), (1,), generator=g).item()] for k in b.tolist()])
        xi, xt = IMG[[tr[k] for k in b.tolist()]], T[ci]; ids = tr_ids[b]
        zi, zt = hi(xi), ht(xt); s = logit_scale.exp().clamp(max=100)
        if not queue:
            L = s * zi @ zt.T
            tgt = torch.eye(bs)
            if idmask:  # same-concept pairs count as positives (multi-positive soft target)
                tgt = (ids[:, None] == ids[None, :]).float()
            tgt = tgt / tgt.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-tgt * F.log_softmax(L, 1), 1).mean() + torch.sum(-tgt.T * F.log_softmax(L.T, 1), 1).mean())
        else:
            with torch.no_grad():
                for m_, o_ in ((hi_m, hi), (ht_m, ht)):
                    for pm, po in zip(m_.parameters(), o_.parameters()): pm.mul_(mom).add_(po.detach(), alpha=1 - mom)
                mi, mt = hi_m(xi), ht_m(xt)
                all_i = torch.cat([mi, qi]); all_t = torch.cat([mt, qt]); all_id = torch.cat([ids, qid])
            Li = s * zi @ all_t.T; Lt = s * zt @ all_i.T
            tgt = torch.zeros(bs, bs + queue); tgt[torch.arange(bs), torch.arange(bs)] = 1
            if idmask: tgt = (ids[:, None] == all_id[None, :]).float()
            tgt = tgt / tgt.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-tgt * F.log_softmax(Li, 1), 1).mean() + torch.sum(-tgt * F.log_softmax(Lt, 1), 1).mean())
            if kl > 0:  # COTS task-level alignment: KL between i2t and t2i distributions over the queue
                pi = F.log_softmax(s * zi @ qt.clone().T, 1); pt = F.log_softmax(s * zt @ qi.clone().T, 1)
                loss = loss + kl * F.kl_div(pi, pt, log_target=True, reduction='batchmean')
            with torch.no_grad():
                idx = (torch.arange(bs) + qptr) % queue
                qi[idx] = mi; qt[idx] = mt; qid[idx] = ids; qptr = (qptr + bs) % queue
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if verbose and step % 500 == 0: print(step, loss.item(), 1 / s.item(), flush=True)
    ttime = time.time() - t0
    hi.eval(); ht.eval()
    with torch.no_grad():
        res_ = {}
        for nm, (im, cp, ow) in (('test', TEST), ('val', VAL)):
            res_[nm] = recalls(hi(IMG[im]), ht(T[cp]), ow)
    return res_, ttime, 1 / logit_scale.exp().item()

def fmt(name, r, t, tau):
    te, va = r['test'], r['val']
    return f"{name:42s} | " + ' '.join(f'{v:5.1f}' for v in te[:6]) + f" | {te[6]:5.2f} | val {va[6]:5.2f} | {t:5.1f}s tau={tau:.3f}"

if __name__ == '__main__':
    configs = eval(sys.argv[1]) if len(sys.argv) > 1 else [('ref lin 64', dict(res=64)), ('ref lin 128', dict(res=128))]
    for name, kw in configs:
        r, t, tau = run(**kw); print(fmt(name, r, t, tau), flush=True)
