//! The error type of this crate.

/// Errors of the objectives crate; each names the objective, input or state at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An objective needs an input the trainer did not put in the [`crate::StepFeatures`].
    #[error("objective `{objective}` needs `{input}` in the step features, but the trainer did not provide it (check `Objectives::needs`)")]
    MissingInput {
        objective: String,
        input: &'static str,
    },
    /// A step input has the wrong shape or content.
    #[error("objective `{objective}`: input `{input}` is invalid: {message}")]
    BadInput {
        objective: String,
        input: &'static str,
        message: String,
    },
    /// The lockstep queue cannot take batches of this size.
    #[error("queue of {queue} slots cannot take batches of {batch} pairs: the queue size must be a positive multiple of the batch size")]
    QueueBatch { queue: usize, batch: usize },
    /// The objectives config is inconsistent.
    #[error("invalid objectives config: {0}")]
    Config(String),
    /// A checkpointed state does not fit the objective it is loaded into.
    #[error("checkpoint state of `{owner}`: {message}")]
    State { owner: String, message: String },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
