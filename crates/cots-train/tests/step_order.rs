//! The order of a training step, checked on the real trainer: AdamW, then
//! the EMA of the momentum towers towards the NEW online weights, then the
//! enqueue of the momentum keys that the step's forward pass computed (with
//! the momentum towers as they were before this step's EMA; docs/method.md,
//! "Step order"). Moving the EMA before the optimizer step, skipping it,
//! enqueueing online features or keys of the updated momentum towers, or not
//! advancing the queue makes this test fail.

use candle_core::{Device, Tensor};
use cots_train::config::RunConfig;
use cots_train::model::sorted_vars;
use cots_train::trainer::Trainer;

const MOMENTUM: f64 = 0.5;
const BATCH: usize = 8;

fn config(out: &std::path::Path) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(
        r#"
        [model]
        preset = "tiny"
        [data]
        kind = "synthetic"
        batch_size = 8
        max_text_len = 20
        [data.synthetic]
        train = 32
        val = 4
        test = 4
        [train]
        steps = 10
        log_every = 1
        eval_every = 0
        checkpoint_every = 100
        [schedule]
        warmup_steps = 0
        [objectives.queue]
        size = 32
        [[objectives.objectives]]
        kind = "itc"
        "#,
    )
    .unwrap();
    cfg.train.out = out.to_path_buf();
    // A low momentum and a large step make every ordering mistake visible
    // far above rounding.
    cfg.train.momentum = MOMENTUM;
    cfg.optim.lr = 1e-2;
    cfg
}

/// Copies (not views) of every variable of `map`, by name.
fn snapshot(map: &candle_nn::VarMap) -> Vec<(String, Tensor)> {
    sorted_vars(map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rows `from..from + n` of `t`, wrapping around its first dimension.
fn ring_rows(t: &Tensor, from: usize, n: usize) -> Tensor {
    let k = t.dim(0).unwrap();
    let idx: Vec<u32> = (0..n).map(|i| ((from + i) % k) as u32).collect();
    t.index_select(&Tensor::new(idx, t.device()).unwrap(), 0)
        .unwrap()
}

#[test]
fn a_real_step_updates_then_averages_then_enqueues() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(config(dir.path()), &Device::Cpu, false).unwrap();
    // Two steps first, so that the momentum towers differ from the online
    // ones and the queue pointer is away from slot 0.
    t.train_step().unwrap();
    t.train_step().unwrap();

    let batch = t.peek_batch().unwrap();
    let old_momentum = snapshot(&t.task.system.momentum_vars);
    let old_online = snapshot(&t.task.system.online);
    let queue = t
        .task
        .system
        .objectives
        .queue()
        .expect("itc keeps a queue")
        .clone();
    let ptr = queue.lock().ptr();
    // The keys the forward pass computes: momentum towers, no dropout.
    let image_keys = t
        .task
        .system
        .model_m
        .encode_image(&batch.pixels, None, None)
        .unwrap()
        .embed;
    let text_keys = t
        .task
        .system
        .model_m
        .encode_text(&batch.input_ids, Some(&batch.attention_mask), None)
        .unwrap()
        .embed;

    t.train_step().unwrap();

    // EMA towards the weights AdamW just wrote: m * old + (1 - m) * new,
    // computed with the same tensor operations, so bit for bit.
    let new_online = snapshot(&t.task.system.online);
    let online = |set: &[(String, Tensor)], name: &str| -> Tensor {
        set.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("`{name}` has no online twin"))
            .1
            .clone()
    };
    let mut stale_gap = 0f32;
    let new_momentum = snapshot(&t.task.system.momentum_vars);
    assert_eq!(new_momentum.len(), old_momentum.len());
    for ((name, old), (_, new)) in old_momentum.iter().zip(&new_momentum) {
        let expected = ((old * MOMENTUM).unwrap()
            + (online(&new_online, name) * (1.0 - MOMENTUM)).unwrap())
        .unwrap();
        assert_eq!(
            max_abs_diff(new, &expected),
            0.0,
            "`{name}`: the momentum weights are not m * old + (1 - m) * the updated online weights"
        );
        let stale = ((old * MOMENTUM).unwrap()
            + (online(&old_online, name) * (1.0 - MOMENTUM)).unwrap())
        .unwrap();
        stale_gap = stale_gap.max(max_abs_diff(new, &stale));
    }
    // Otherwise the check above could not tell the two orders apart.
    assert!(
        stale_gap > 1e-4,
        "an EMA towards the pre-step weights would look the same ({stale_gap})"
    );

    // The queue: the batch's keys at the slots after the old pointer, the
    // pointer moved by one batch (no filter here: every pair is kept).
    let (view, new_ptr) = {
        let q = queue.lock();
        (q.view(), q.ptr())
    };
    assert_eq!(new_ptr, (ptr + BATCH) % view.ids.dim(0).unwrap());
    let queued_images = ring_rows(&view.image, ptr, BATCH);
    let queued_texts = ring_rows(&view.text, ptr, BATCH);
    assert!(max_abs_diff(&queued_images, &image_keys) < 1e-6);
    assert!(max_abs_diff(&queued_texts, &text_keys) < 1e-6);
    assert_eq!(
        ring_rows(&view.ids, ptr, BATCH).to_vec1::<u32>().unwrap(),
        batch.image_ids.to_vec1::<u32>().unwrap()
    );
    // Keys of the momentum towers after the EMA, or of the online towers,
    // are far from what was queued: the checks above can tell them apart.
    let post_ema = t
        .task
        .system
        .model_m
        .encode_image(&batch.pixels, None, None)
        .unwrap()
        .embed;
    assert!(max_abs_diff(&queued_images, &post_ema) > 1e-4);
    let online_features = t
        .task
        .system
        .model
        .encode_image(&batch.pixels, None, None)
        .unwrap()
        .embed;
    assert!(max_abs_diff(&queued_images, &online_features) > 1e-4);
}
