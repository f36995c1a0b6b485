//! Noisy-pair injection: exactly the requested share of items is corrupted,
//! each corrupted item carries another item's original captions (a
//! permutation: no caption is lost or duplicated), the rest are untouched,
//! and the choice is a function of the seed.

use cots_data::synthetic::SyntheticConfig;
use cots_data::{Dataset, Split};

fn train() -> Dataset {
    Dataset::synthetic(&SyntheticConfig {
        train: 120,
        val: 2,
        test: 2,
        ..SyntheticConfig::default()
    })
    .split(Split::Train)
    .expect("train split")
}

#[test]
fn noise_swaps_the_requested_share_of_captions_and_loses_none() {
    for (rate, seed) in [(0.2, 1u64), (0.5, 2), (1.0, 3)] {
        let clean = train();
        let mut noisy = clean.clone();
        let ids = noisy.with_noisy_pairs(rate, seed).expect("noise");
        let want = (rate * clean.items.len() as f64).round() as usize;
        assert_eq!(ids.len(), want, "rate {rate}");
        let mut originals: Vec<&Vec<String>> = Vec::new();
        let mut received: Vec<&Vec<String>> = Vec::new();
        for (c, n) in clean.items.iter().zip(&noisy.items) {
            assert_eq!(c.id, n.id);
            assert_eq!(c.source, n.source);
            if ids.contains(&c.id) {
                // Another item's original captions (a repeated scene may
                // share its text with this one).
                assert!(clean
                    .items
                    .iter()
                    .any(|o| o.id != c.id && o.captions == n.captions));
                originals.push(&c.captions);
                received.push(&n.captions);
            } else {
                assert_eq!(c.captions, n.captions, "item {} changed", c.id);
            }
        }
        originals.sort();
        received.sort();
        assert_eq!(originals, received, "captions were lost or duplicated");
        // Same seed, same corruption; another seed, another one.
        let mut again = clean.clone();
        assert_eq!(again.with_noisy_pairs(rate, seed).expect("noise"), ids);
        assert_eq!(again, noisy);
        if rate < 1.0 {
            let mut other = clean.clone();
            assert_ne!(other.with_noisy_pairs(rate, seed + 10).expect("noise"), ids);
        }
    }
}

#[test]
fn no_noise_changes_nothing_and_bad_rates_are_errors() {
    let clean = train();
    let mut d = clean.clone();
    assert!(d.with_noisy_pairs(0.0, 1).expect("noise").is_empty());
    assert_eq!(d, clean);
    for bad in [-0.1, 1.5, f64::NAN] {
        let err = d
            .with_noisy_pairs(bad, 1)
            .expect_err("bad rate")
            .to_string();
        assert!(err.contains("outside [0, 1]"), "{err}");
    }
}
