import time, torch
from transformers import ViTConfig, ViTModel, BertConfig, BertModel
torch.set_num_threads(2)
def bench(f, n):
    f(); t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n
with torch.no_grad():
    vit = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    px = torch.randn(8,3,224,224)
    s = bench(lambda: vit(pixel_values=px), 5); print(f"torch vit-b/16 batch 8: {s:.3f} s/iter, {8/s:.2f} images/s")
    bert = BertModel(BertConfig(), add_pooling_layer=False).eval()
    ids = torch.randint(0,30522,(32,32)); m = torch.ones(32,32,dtype=torch.long)
    s = bench(lambda: bert(input_ids=ids, attention_mask=m), 10); print(f"torch bert-base 32x32: {s:.3f} s/iter, {32/s:.2f} texts/s")
