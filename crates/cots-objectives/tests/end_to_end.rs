//! One full training step per objective combination, in the trainer's order:
//! forward (clean, momentum, masked, dVAE codes) -> AMF weights -> losses ->
//! backward -> AdamW step -> EMA update -> after_step (enqueue).
//!
//! Checks: every trainable weight that the combination should train gets a
//! non-zero gradient and changes; the momentum copy gets no gradient and
//! moves only by the EMA rule; the frozen dVAE gets no gradient and does not
//! change; the queue advances once per step.
//!
//! The towers are a small stand-in with the parts that matter here (patch
//! convolution, mask token, embeddings, LayerNorm, projections, temperature),
//! built here so this crate never depends on the encoders at runtime; the
//! dVAE is the real one from `cots_encoders::dvae`.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Embedding, Init, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use cots_encoders::dvae::{self, Dvae};
use cots_objectives::*;

const B: usize = 4;
const L: usize = 6;
const VOCAB: usize = 20;
const MASK_ID: u32 = 1;
const DV: usize = 16;
const DT: usize = 12;
const E: usize = 8;

/// A two-tower stand-in: ViT-like image tower, BERT-like text tower.
struct Towers {
    patch: candle_nn::Conv2d,
    cls: Tensor,
    mask_token: Tensor,
    img_pos: Tensor,
    img_mlp: Linear,
    img_ln: (Tensor, Tensor),
    img_proj: Linear,
    tok: Embedding,
    txt_pos: Tensor,
    txt_mlp: Linear,
    txt_ln: (Tensor, Tensor),
    txt_proj: Linear,
    log_tau: Tensor,
}

fn ln(vb: &VarBuilder, d: usize) -> (Tensor, Tensor) {
    let w = vb
        .get_with_hints(d, "weight", Init::Const(1.0))
        .expect("ln");
    let b = vb.get_with_hints(d, "bias", Init::Const(0.0)).expect("ln");
    (w, b)
}

fn l2(x: &Tensor) -> Tensor {
    x.broadcast_div(
        &x.sqr()
            .and_then(|s| s.sum_keepdim(D::Minus1))
            .and_then(|s| s.sqrt())
            .expect("norm"),
    )
    .expect("normalise")
}

/// Token mixing in place of attention: every token sees the sequence mean,
/// so `[CLS]` depends on every patch and word.
fn mix(x: &Tensor) -> Tensor {
    x.broadcast_add(&x.mean_keepdim(1).expect("mean"))
        .expect("mix")
}

impl Towers {
    fn new(vb: VarBuilder, n_patches: usize, patch: usize) -> Self {
        let conv = candle_nn::Conv2dConfig {
            stride: patch,
            ..Default::default()
        };
        let rnd = Init::Randn {
            mean: 0.0,
            stdev: 0.5,
        };
        Self {
            patch: candle_nn::conv2d(3, DV, patch, conv, vb.pp("patch")).expect("conv"),
            cls: vb.get_with_hints((1, 1, DV), "cls", rnd).expect("cls"),
            mask_token: vb
                .get_with_hints((1, 1, DV), "mask_token", rnd)
                .expect("mask"),
            img_pos: vb
                .get_with_hints((1, 1 + n_patches, DV), "img_pos", rnd)
                .expect("pos"),
            img_mlp: candle_nn::linear(DV, DV, vb.pp("img_mlp")).expect("mlp"),
            img_ln: ln(&vb.pp("img_ln"), DV),
            img_proj: candle_nn::linear(DV, E, vb.pp("img_proj")).expect("proj"),
            tok: candle_nn::embedding(VOCAB, DT, vb.pp("tok")).expect("emb"),
            txt_pos: vb.get_with_hints((1, L, DT), "txt_pos", rnd).expect("pos"),
            txt_mlp: candle_nn::linear(DT, DT, vb.pp("txt_mlp")).expect("mlp"),
            txt_ln: ln(&vb.pp("txt_ln"), DT),
            txt_proj: candle_nn::linear(DT, E, vb.pp("txt_proj")).expect("proj"),
            log_tau: vb
                .get_with_hints((), "log_tau", Init::Const(0.07f64.ln()))
                .expect("tau"),
        }
    }

    /// `(hidden [B, 1+N, DV], embed [B, E])`; `mask` `[B, N]` f32 swaps patches for the mask token.
    fn image(&self, px: &Tensor, mask: Option<&Tensor>) -> (Tensor, Tensor) {
        let p = self
            .patch
            .forward(px)
            .expect("patch")
            .flatten_from(2)
            .expect("f")
            .transpose(1, 2)
            .expect("t");
        let p = match mask {
            Some(m) => {
                let m = m.unsqueeze(2).expect("m");
                let keep = m.affine(-1.0, 1.0).expect("keep");
                (p.broadcast_mul(&keep).expect("k")
                    + m.broadcast_mul(&self.mask_token).expect("mt"))
                .expect("mix")
            }
            None => p,
        };
        let b = px.dim(0).expect("b");
        let x = Tensor::cat(&[self.cls.broadcast_as((b, 1, DV)).expect("c"), p], 1).expect("cat");
        let x = mix(&x.broadcast_add(&self.img_pos).expect("pos"));
        let x = (&x + self.img_mlp.forward(&x).expect("mlp").gelu().expect("g")).expect("res");
        let h = cots_ops::layer_norm(&x, &self.img_ln.0, &self.img_ln.1, 1e-6).expect("ln");
        let e = l2(&self
            .img_proj
            .forward(&h.narrow(1, 0, 1).expect("n").squeeze(1).expect("s"))
            .expect("p"));
        (h, e)
    }

    /// `(hidden [B, L, DT], embed [B, E])`.
    fn text(&self, ids: &Tensor) -> (Tensor, Tensor) {
        let x = mix(&self
            .tok
            .forward(ids)
            .expect("tok")
            .broadcast_add(&self.txt_pos)
            .expect("pos"));
        let x = (&x + self.txt_mlp.forward(&x).expect("mlp").gelu().expect("g")).expect("res");
        let h = cots_ops::layer_norm(&x, &self.txt_ln.0, &self.txt_ln.1, 1e-6).expect("ln");
        let e = l2(&self
            .txt_proj
            .forward(&h.narrow(1, 0, 1).expect("n").squeeze(1).expect("s"))
            .expect("p"));
        (h, e)
    }

    fn temperature(&self) -> Tensor {
        self.log_tau.exp().expect("exp")
    }
}

fn snapshot(vm: &VarMap) -> BTreeMap<String, Vec<f32>> {
    let data = vm.data().lock().expect("lock");
    data.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("vec"),
            )
        })
        .collect()
}

/// One step of `cfg`; `untrained` lists online weights the combination
/// cannot reach (e.g. the mask token without MVM).
fn step(cfg_toml: &str, untrained: &[&str]) {
    let dev = Device::Cpu;
    let dcfg = dvae::Config::tiny();
    let n = dcfg.num_patches();
    let (online_vm, momentum_vm, dvae_vm) = (VarMap::new(), VarMap::new(), VarMap::new());
    let online = Towers::new(
        VarBuilder::from_varmap(&online_vm, DType::F32, &dev),
        n,
        dcfg.patch_size,
    );
    let momentum = Towers::new(
        VarBuilder::from_varmap(&momentum_vm, DType::F32, &dev),
        n,
        dcfg.patch_size,
    );
    // The momentum copy starts equal to the online model, as the EMA module does.
    for (k, v) in momentum_vm.data().lock().expect("lock").iter() {
        v.set(online_vm.data().lock().expect("lock")[k].as_tensor())
            .expect("copy");
    }
    let dv = Dvae::new(&dcfg, VarBuilder::from_varmap(&dvae_vm, DType::F32, &dev)).expect("dvae");
    let cfg: ObjectivesConfig = toml::from_str(cfg_toml).expect("config");
    let dims = Dims {
        embed: E,
        text_hidden: DT,
        vision_hidden: DV,
        vocab: VOCAB,
        codebook: dcfg.codebook_size,
    };
    let mut objs = build(
        &cfg,
        dims,
        VarBuilder::from_varmap(&online_vm, DType::F32, &dev).pp("objectives"),
    )
    .expect("build");
    let needs = objs.needs();

    // Data: images, token ids (two captions of image 0), masks.
    let px = Tensor::randn(0f32, 1.0, (B, 3, dcfg.image_size, dcfg.image_size), &dev).expect("px");
    let ids_v: Vec<u32> = (0..B * L)
        .map(|i| 2 + (i * 7 % (VOCAB - 2)) as u32)
        .collect();
    let text_ids = Tensor::from_vec(ids_v.clone(), (B, L), &dev).expect("ids");
    let image_ids = Tensor::new(&[0u32, 0, 1, 2], &dev).expect("image ids");
    let masked_tok: Vec<bool> = (0..B * L).map(|i| i % L == 2 || i % L == 4).collect();
    let masked_ids: Vec<u32> = ids_v
        .iter()
        .zip(&masked_tok)
        .map(|(&t, &m)| if m { MASK_ID } else { t })
        .collect();
    // Masked positions (flat b * L + l) and their original ids, as the
    // trainer computes them on the host when it builds the batch.
    let (text_pos, text_targets): (Vec<u32>, Vec<u32>) = (0..B * L)
        .filter(|&i| masked_tok[i])
        .map(|i| (i as u32, ids_v[i]))
        .unzip();
    let patch_mask: Vec<f32> = (0..B * n).map(|i| ((i % 3) == 0) as u8 as f32).collect();
    let patch_pos: Vec<u32> = (0..(B * n) as u32).filter(|&i| i % 3 == 0).collect();
    let patch_mask = Tensor::from_vec(patch_mask, (B, n), &dev).expect("mask");

    let before_online = snapshot(&online_vm);
    let before_momentum = snapshot(&momentum_vm);
    let before_dvae = snapshot(&dvae_vm);

    // 1. Forward passes, as the composition asks.
    let (_, f) = online.image(&px, None);
    let (_, t) = online.text(&text_ids);
    let tau = online.temperature();
    let (f_m, t_m) = if needs.momentum {
        let (_, fm) = momentum.image(&px, None);
        let (_, tm) = momentum.text(&text_ids);
        (Some(fm.detach()), Some(tm.detach()))
    } else {
        (None, None)
    };
    let masked_text = needs.masked_text.then(|| {
        online
            .text(&Tensor::from_vec(masked_ids, (B, L), &dev).expect("m"))
            .0
    });
    let masked_image = needs
        .masked_image
        .then(|| online.image(&px, Some(&patch_mask)).0);
    let codes = needs.dvae_codes.then(|| dv.codes(&px).expect("codes"));
    // 2. AMF weights.
    let amf = match (&f_m, &t_m) {
        (Some(fm), Some(tm)) => objs.filter(fm, tm).expect("filter"),
        _ => None,
    };
    let mut x = StepFeatures::new(f, t, image_ids, tau);
    if let (Some(fm), Some(tm)) = (f_m, t_m) {
        x = x.with_momentum(MomentumFeatures {
            image: fm,
            text: tm,
            pair_weights: amf.map(|a| a.weights),
        });
    }
    if let Some(hidden) = masked_text {
        x = x.with_masked_text(MaskedText {
            hidden,
            positions: Tensor::new(text_pos.as_slice(), &dev).expect("positions"),
            targets: Tensor::new(text_targets.as_slice(), &dev).expect("targets"),
        });
    }
    if let Some(hidden) = masked_image {
        x = x.with_masked_image(MaskedImage {
            hidden,
            positions: Tensor::new(patch_pos.as_slice(), &dev).expect("positions"),
            codes: codes.expect("codes"),
        });
    }
    // 3-4. Losses, backward, optimizer (online weights and heads only).
    let losses = objs.losses(&x).expect("losses");
    // What after_step gets: kept across the optimizer step without the graph.
    let kept = x.detached().expect("detached");
    drop(x);
    assert!(losses.total.to_scalar::<f32>().expect("total").is_finite());
    let grads = losses.total.backward().expect("backward");
    let mut opt = AdamW::new(
        online_vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .expect("adamw");
    opt.step(&grads).expect("step");
    // 5. EMA update of the momentum copy.
    let m = 0.9f64;
    for (k, v) in momentum_vm.data().lock().expect("lock").iter() {
        let new = online_vm.data().lock().expect("lock")[k]
            .as_tensor()
            .clone();
        v.set(&((v.as_tensor() * m).expect("m") + (new * (1.0 - m)).expect("o")).expect("ema"))
            .expect("set");
    }
    // 6. Enqueue.
    let ptr_before = objs.queue().map(|q| q.lock().ptr());
    objs.after_step(&kept).expect("after_step");
    if let (Some(q), Some(p)) = (objs.queue(), ptr_before) {
        assert_eq!(
            q.lock().ptr(),
            (p + B) % cfg.queue.size,
            "enqueued once, all pairs kept"
        );
    }

    let after_online = snapshot(&online_vm);
    for (name, var) in online_vm.data().lock().expect("lock").iter() {
        let short = name.rsplit('.').nth(1).unwrap_or(name);
        let expect_trained = !untrained.iter().any(|u| name.starts_with(u) || short == *u);
        let g = grads.get(var.as_tensor()).map(|g| {
            g.abs()
                .and_then(|a| a.sum_all())
                .and_then(|s| s.to_scalar::<f32>())
                .expect("g")
        });
        let changed = before_online[name] != after_online[name];
        if expect_trained {
            assert!(
                g.is_some_and(|g| g > 0.0) && changed,
                "{cfg_toml}: `{name}` was not trained (grad {g:?})"
            );
        } else {
            assert!(
                !changed,
                "{cfg_toml}: `{name}` changed although nothing reaches it"
            );
        }
    }
    for (name, var) in momentum_vm.data().lock().expect("lock").iter() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "momentum `{name}` got a gradient"
        );
        let now = var
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        for ((o, n), a) in before_momentum[name]
            .iter()
            .zip(&now)
            .zip(&after_online[name])
        {
            let want = m as f32 * o + (1.0 - m as f32) * a;
            assert!(
                (n - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "momentum `{name}` moved other than by EMA"
            );
        }
    }
    for (name, var) in dvae_vm.data().lock().expect("lock").iter() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "dVAE `{name}` got a gradient"
        );
    }
    assert_eq!(before_dvae, snapshot(&dvae_vm), "the frozen dVAE changed");
}

const Q: &str = "[queue]\nsize = 8\n";
const HEADS: &[&str] = &["objectives"];
const MVM_ONLY: &[&str] = &["mask_token"];

#[test]
fn itc_step() {
    step(
        &format!("{Q}[amf]\nenabled = false\n[[objectives]]\nkind = \"itc\"\n"),
        &[HEADS, MVM_ONLY].concat(),
    );
}

#[test]
fn itc_kl_step() {
    step(&format!("{Q}[amf]\nenabled = false\n[[objectives]]\nkind = \"itc\"\n[[objectives]]\nkind = \"kl\"\n"), &[HEADS, MVM_ONLY].concat());
}

#[test]
fn itc_mvlm_step() {
    step(&format!("{Q}[amf]\nenabled = false\n[[objectives]]\nkind = \"itc\"\n[[objectives]]\nkind = \"mvlm\"\n"), &[]);
}

#[test]
fn cots_step_with_amf() {
    // AMF after a zero-step warm-up with an unreachable threshold keeps all
    // pairs, so the enqueue count is exact; the filter still runs in order.
    let amf = "[amf]\nenabled = true\nwarmup_steps = 0\nlambda = 100.0\n";
    step(&format!("{Q}{amf}[[objectives]]\nkind = \"itc\"\n[[objectives]]\nkind = \"kl\"\n[[objectives]]\nkind = \"mvlm\"\n"), &[]);
}

#[test]
fn itc_kl_mvlm_step() {
    step(&format!("{Q}[amf]\nenabled = false\n[[objectives]]\nkind = \"itc\"\n[[objectives]]\nkind = \"kl\"\n[[objectives]]\nkind = \"mvlm\"\n"), &[]);
}

#[test]
fn clip_step() {
    step(
        "[[objectives]]\nkind = \"clip\"\n[amf]\nenabled = false\n",
        &[HEADS, MVM_ONLY].concat(),
    );
}

#[test]
fn vse_step() {
    // VSE++ uses cosine scores only: the temperature is out of its reach.
    step(
        "[[objectives]]\nkind = \"vse\"\nmargin = 1.5\n[amf]\nenabled = false\n",
        &[HEADS, MVM_ONLY, &["log_tau"]].concat(),
    );
}
