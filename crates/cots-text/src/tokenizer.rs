//! WordPiece text tokenisation for the BERT text stream (Wu et al., "Google's
//! Neural Machine Translation System", 2016; as used by BERT), built on the
//! Hugging Face `tokenizers` crate without any hub access.
//!
//! Texts become `[CLS] pieces... [SEP]`, truncated to a maximum length that
//! counts the two specials and padded with `[PAD]` to the longest text of the
//! batch. A tokenizer comes from a `tokenizer.json`, a BERT `vocab.txt`, or a
//! word list ([`TextTokenizer::from_words`]) so the built-in synthetic
//! dataset never downloads anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer,
};

use crate::{Error, Result};

/// The five BERT special tokens in the order [`TextTokenizer::from_words`]
/// gives them ids 0..5.
const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Ids of the special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

/// A padded batch of token ids, row-major `[batch, len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    /// 1 for real tokens (including `[CLS]` and `[SEP]`), 0 for padding.
    pub attention_mask: Vec<u32>,
    pub batch: usize,
    pub len: usize,
}

impl TokenBatch {
    /// The ids and attention mask as tensors.
    ///
    /// # Shapes
    /// - output: `(ids [B, L] u32, attention_mask [B, L] u32)`.
    pub fn to_tensors(&self, dev: &Device) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(&self.ids, (self.batch, self.len), dev)?;
        let mask = Tensor::from_slice(&self.attention_mask, (self.batch, self.len), dev)?;
        Ok((ids, mask))
    }

    /// Row `i` of the ids.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }
}

/// A BERT WordPiece tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` if present, else builds a BERT WordPiece
    /// tokenizer from `dir/vocab.txt`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_json_file(&json);
        }
        let vocab = dir.join("vocab.txt");
        if vocab.exists() {
            return Self::from_vocab_file(&vocab);
        }
        Err(Error::Format {
            path: dir.to_path_buf(),
            message: "neither tokenizer.json nor vocab.txt found".into(),
        })
    }

    /// Loads a `tokenizer.json`. Any padding or truncation it configures is
    /// dropped: [`Self::encode_batch`] does both itself.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| tok_err(path, e))?;
        Self::wrap(inner, path)
    }

    /// Builds a BERT uncased WordPiece tokenizer from a `vocab.txt` (one token
    /// per line, the line number is its id).
    pub fn from_vocab_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let vocab: HashMap<String, u32> = text
            .lines()
            .enumerate()
            .map(|(i, tok)| (tok.trim_end().to_string(), i as u32))
            .collect();
        Self::from_vocab(vocab, path)
    }

    /// Builds a vocabulary from words: the five specials (`[PAD]` = 0,
    /// `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`), then the words' pieces
    /// (lowercased, accents stripped and split at punctuation exactly as the
    /// BERT normalizer and pre-tokenizer do,
    /// de-duplicated in order of first appearance), then single letters,
    /// digits and ASCII punctuation, each also as a `##` continuation, so an
    /// unknown word falls apart into characters rather than `[UNK]`.
    pub fn from_words(words: &[String]) -> Result<Self> {
        let mut order: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        let mut seen: HashMap<String, u32> = order
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut push = |tok: String, order: &mut Vec<String>| {
            if !tok.is_empty() && !seen.contains_key(&tok) {
                seen.insert(tok.clone(), order.len() as u32);
                order.push(tok);
            }
        };
        for word in words {
            for piece in split_like_bert(word)? {
                push(piece, &mut order);
            }
        }
        let chars = ('a'..='z').chain('0'..='9').chain(
            (0x21u8..0x7f)
                .map(char::from)
                .filter(|c| c.is_ascii_punctuation()),
        );
        for c in chars {
            push(c.to_string(), &mut order);
            if c.is_ascii_alphanumeric() {
                push(format!("##{c}"), &mut order);
            }
        }
        let vocab: HashMap<String, u32> = order
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::from_vocab(vocab, Path::new("<word list>"))
    }

    fn from_vocab(vocab: HashMap<String, u32>, origin: &Path) -> Result<Self> {
        let specials = special_ids(|t| vocab.get(t).copied(), origin)?;
        let model = WordPiece::builder()
            .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| tok_err(origin, e))?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| tok_err(origin, e))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), specials.sep),
            ("[CLS]".into(), specials.cls),
        )));
        inner.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
        // Registering the specials makes `decode` skip them and lets a literal
        // "[MASK]" in a text become the mask token rather than five pieces.
        let added: Vec<AddedToken> = SPECIALS
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| tok_err(origin, e))?;
        Ok(Self {
            inner,
            special: specials,
        })
    }

    fn wrap(inner: Tokenizer, origin: &Path) -> Result<Self> {
        let special = special_ids(|t| inner.token_to_id(t), origin)?;
        Ok(Self { inner, special })
    }

    /// Writes `dir/tokenizer.json` (creating `dir`), loadable by
    /// [`Self::from_dir`] and by Hugging Face `tokenizers`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, true)
            .map_err(|e| tok_err(&path, e))?;
        Ok(path)
    }

    /// Number of token ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Decodes ids back to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Tokenises a batch: each text becomes `[CLS] pieces [SEP]`, truncated
    /// to at most `max_len` ids (the specials included, so at most
    /// `max_len - 2` pieces survive) and padded with `[PAD]` (mask 0) to the
    /// longest row of the batch, not to `max_len`.
    ///
    /// An empty or whitespace-only text is an error naming its index, because
    /// a caption without content is a data bug, not something to embed.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<TokenBatch> {
        if max_len < 3 {
            return Err(Error::Tokenizer(format!(
                "max_len {max_len} leaves no room for text between [CLS] and [SEP]"
            )));
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(Error::Tokenizer(format!("text {i} of the batch is empty")));
        }
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let rows: Vec<Vec<u32>> = encodings
            .iter()
            .map(|enc| {
                let pieces = enc.get_ids();
                let keep = pieces.len().min(max_len - 2);
                let mut row = Vec::with_capacity(keep + 2);
                row.push(self.special.cls);
                row.extend_from_slice(&pieces[..keep]);
                row.push(self.special.sep);
                row
            })
            .collect();
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut attention_mask = Vec::with_capacity(rows.len() * len);
        for row in &rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.special.pad, len - row.len()));
            attention_mask.extend(std::iter::repeat_n(1, row.len()));
            attention_mask.extend(std::iter::repeat_n(0, len - row.len()));
        }
        Ok(TokenBatch {
            ids,
            attention_mask,
            batch: rows.len(),
            len,
        })
    }
}

fn special_ids(lookup: impl Fn(&str) -> Option<u32>, origin: &Path) -> Result<SpecialTokens> {
    let get = |t: &str| {
        lookup(t).ok_or_else(|| Error::Format {
            path: origin.to_path_buf(),
            message: format!("special token {t} is not in the vocabulary"),
        })
    };
    Ok(SpecialTokens {
        pad: get("[PAD]")?,
        unk: get("[UNK]")?,
        cls: get("[CLS]")?,
        sep: get("[SEP]")?,
        mask: get("[MASK]")?,
    })
}

/// Splits text into the pieces the tokenizer's own normalizer
/// (lowercasing, accent stripping) and BERT pre-tokenizer (whitespace and
/// punctuation) produce, so a vocabulary built from them matches what
/// encoding will look up.
fn split_like_bert(text: &str) -> Result<Vec<String>> {
    let mut normalized = NormalizedString::from(text);
    BertNormalizer::new(true, true, None, true)
        .normalize(&mut normalized)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut pre = PreTokenizedString::from(normalized);
    BertPreTokenizer
        .pre_tokenize(&mut pre)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(piece, _, _)| piece.to_string())
        .collect())
}
