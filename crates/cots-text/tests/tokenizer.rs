//! WordPiece tokenizer behaviour: vocabulary from words, specials, padding,
//! truncation, errors, and save/load round trips.

use cots_text::TextTokenizer;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn words() -> Vec<String> {
    ["A cat", "sits on the MAT.", "dog's", "cat"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn from_words_puts_specials_first_and_dedupes() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let s = tok.special();
    assert_eq!((s.pad, s.unk, s.cls, s.sep, s.mask), (0, 1, 2, 3, 4));
    // Words follow the specials in order of first appearance, lowercased,
    // split at punctuation and de-duplicated.
    let expect = ["a", "cat", "sits", "on", "the", "mat", ".", "dog", "'", "s"];
    for (i, w) in expect.iter().enumerate() {
        assert_eq!(tok.token_to_id(w), Some(5 + i as u32), "{w}");
    }
    assert!(tok.token_to_id("z").is_some() && tok.token_to_id("##z").is_some());
    // 5 specials, 10 word pieces, 24 more letters ("a" and "s" came with
    // the words), 10 digits, 30 more ASCII punctuation marks ("." and "'"
    // too), 36 continuations.
    assert_eq!(tok.vocab_size(), 5 + 10 + 24 + 10 + 30 + 36);
    let b = tok.encode_batch(&["a [MASK] sits"], 8)?;
    assert_eq!(b.row(0)[2], s.mask);
    Ok(())
}

#[test]
fn from_words_normalises_like_the_tokenizer() -> TestResult {
    let tok = TextTokenizer::from_words(&["Café au lait,".to_string()])?;
    // Accents are stripped and punctuation split exactly as encoding does,
    // so every piece of the word list is one known token.
    assert_eq!(tok.token_to_id("cafe"), Some(5));
    assert_eq!(tok.token_to_id(","), Some(8));
    let b = tok.encode_batch(&["CAFÉ au lait"], 8)?;
    assert_eq!(b.row(0), &[2, 5, 6, 7, 3]);
    Ok(())
}

#[test]
fn encode_pads_to_longest_and_marks_padding() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let id = |w: &str| tok.token_to_id(w).expect("in vocab");
    let b = tok.encode_batch(&["A CAT", "the dog sits on the mat."], 32)?;
    assert_eq!((b.batch, b.len), (2, 9));
    assert_eq!(b.row(0), &[2, id("a"), id("cat"), 3, 0, 0, 0, 0, 0]);
    assert_eq!(
        b.row(1),
        &[
            2,
            id("the"),
            id("dog"),
            id("sits"),
            id("on"),
            id("the"),
            id("mat"),
            id("."),
            3
        ]
    );
    assert_eq!(&b.attention_mask[..9], &[1, 1, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(&b.attention_mask[9..], &[1; 9]);
    let (ids, mask) = b.to_tensors(&candle_core::Device::Cpu)?;
    assert_eq!(ids.dims(), &[2, 9]);
    assert_eq!(mask.to_vec2::<u32>()?[0], vec![1, 1, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(tok.decode(b.row(1))?, "the dog sits on the mat.");
    Ok(())
}

#[test]
fn unknown_words_fall_apart_into_characters() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let b = tok.encode_batch(&["zebra"], 16)?;
    let pieces: Vec<String> = b
        .row(0)
        .iter()
        .filter_map(|&i| tok.id_to_token(i))
        .collect();
    assert_eq!(pieces, ["[CLS]", "z", "##e", "##b", "##r", "##a", "[SEP]"]);
    assert!(!b.row(0).contains(&tok.special().unk));
    Ok(())
}

#[test]
fn truncation_keeps_cls_and_sep_within_max_len() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let b = tok.encode_batch(&["a cat sits on the mat", "cat"], 5)?;
    assert_eq!(b.len, 5);
    let id = |w: &str| tok.token_to_id(w).expect("in vocab");
    assert_eq!(b.row(0), &[2, id("a"), id("cat"), id("sits"), 3]);
    assert_eq!(b.row(1), &[2, id("cat"), 3, 0, 0]);
    assert!(tok.encode_batch(&["cat"], 2).is_err());
    Ok(())
}

#[test]
fn empty_text_is_an_error_naming_its_position() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let err = tok
        .encode_batch(&["a cat", "the mat", "  \t"], 8)
        .expect_err("empty text");
    assert!(err.to_string().contains("text 2"), "{err}");
    let err = tok.encode_batch(&[""], 8).expect_err("empty text");
    assert!(err.to_string().contains("text 0"), "{err}");
    Ok(())
}

#[test]
fn save_and_vocab_file_round_trip() -> TestResult {
    let tok = TextTokenizer::from_words(&words())?;
    let texts = ["The cat's mat!", "a dog sits", "xylophone"];
    let want = tok.encode_batch(&texts, 12)?;

    let dir = tempfile::tempdir()?;
    tok.save(dir.path())?;
    let reloaded = TextTokenizer::from_dir(dir.path())?;
    assert_eq!(reloaded.encode_batch(&texts, 12)?, want);
    assert_eq!(reloaded.vocab_size(), tok.vocab_size());

    // The same vocabulary as a BERT vocab.txt (line number = id).
    let vocab_dir = tempfile::tempdir()?;
    let lines: Vec<String> = (0..tok.vocab_size() as u32)
        .map(|i| tok.id_to_token(i).expect("dense ids"))
        .collect();
    std::fs::write(vocab_dir.path().join("vocab.txt"), lines.join("\n") + "\n")?;
    let from_vocab = TextTokenizer::from_dir(vocab_dir.path())?;
    assert_eq!(from_vocab.encode_batch(&texts, 12)?, want);
    assert_eq!(from_vocab.special(), tok.special());

    let missing = tempfile::tempdir()?;
    assert!(TextTokenizer::from_dir(missing.path()).is_err());
    Ok(())
}
