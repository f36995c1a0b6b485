//! How do concurrent text queries share one encoder call?
//!
//! Encoding a batch of short queries costs little more than encoding one
//! (the model is a few small matmuls either way), and searching a batch
//! reads the index once for all of its queries instead of once each. So
//! under load the service gathers the queries that arrive close together,
//! encodes them in one call, searches each group of queries that share `k`
//! and options in one pass, and answers each with its own hits.
//!
//! One dedicated thread owns that loop: it waits for a query, then keeps
//! taking queries until `window` has passed since the first one arrived or
//! `max_batch` are in hand. A query that waited longer than the window
//! behind a busy thread is not held back further: the queue is drained as
//! it stands.
//!
//! A failed or panicking encoder call is retried one query at a time, so one
//! bad query cannot fail its neighbours, and the thread outlives any panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cots_index::SearchOptions;
use tokio::sync::oneshot;

use crate::{BatchConfig, Error, Metrics, QueryEncoder, Result};

/// Searches `queries` (`n` rows of the encoder's width, row-major) with one
/// `k` and one set of options, returning each query's hits, in order.
pub type SearchFn<T> = dyn Fn(&[f32], usize, &SearchOptions) -> Result<Vec<Vec<T>>> + Send + Sync;

/// One text query and how to search with it.
#[derive(Clone, Debug)]
pub struct Query {
    pub text: String,
    pub k: usize,
    pub options: SearchOptions,
}

/// A query's answer and where its time went.
#[derive(Debug)]
pub struct Answer<T> {
    pub hits: Vec<T>,
    /// From arrival to its vector: waiting for the batch, and encoding it.
    pub encode: Duration,
    /// Its group's search.
    pub search: Duration,
}

struct Job<T> {
    query: Query,
    arrived: Instant,
    reply: oneshot::Sender<Result<Answer<T>>>,
}

/// The handle the handlers hold; the thread stops when it is dropped.
pub struct Batcher<T> {
    tx: SyncSender<Job<T>>,
    queued: Arc<AtomicUsize>,
    cfg: BatchConfig,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching thread; `search` runs on it.
    pub fn spawn(
        encoder: Arc<dyn QueryEncoder>,
        search: Arc<SearchFn<T>>,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        if cfg.max_batch == 0 || cfg.queue == 0 {
            return Err(Error::Config(format!(
                "max_batch and queue must be positive: {cfg:?}"
            )));
        }
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            encoder,
            search,
            cfg: cfg.clone(),
            metrics,
            queued: queued.clone(),
        };
        std::thread::Builder::new()
            .name("cots-batcher".into())
            .spawn(move || worker.run(rx))
            .map_err(Error::Thread)?;
        Ok(Self { tx, queued, cfg })
    }

    /// The hits of `query`, encoded and searched in a batch with whatever
    /// other queries arrive within the window.
    pub async fn search(&self, query: Query) -> Result<Answer<T>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            query,
            arrived: Instant::now(),
            reply,
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.tx.try_send(job) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(match e {
                TrySendError::Full(_) => Error::Busy {
                    queued: self.cfg.queue,
                },
                TrySendError::Disconnected(_) => Error::Stopped,
            });
        }
        answer.await.map_err(|_| Error::Stopped)?
    }

    pub fn window(&self) -> Duration {
        self.cfg.window
    }

    pub fn max_batch(&self) -> usize {
        self.cfg.max_batch
    }

    /// Queries sent and not yet taken by the thread.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

struct Worker<T> {
    encoder: Arc<dyn QueryEncoder>,
    search: Arc<SearchFn<T>>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
}

impl<T> Worker<T> {
    fn run(self, rx: mpsc::Receiver<Job<T>>) {
        while let Ok(first) = rx.recv() {
            let deadline = first.arrived + self.cfg.window;
            let mut jobs = vec![first];
            while jobs.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        jobs.push(job);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(job) => jobs.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            self.queued.fetch_sub(jobs.len(), Ordering::SeqCst);
            // A client that went away needs no answer.
            jobs.retain(|j| !j.reply.is_closed());
            if !jobs.is_empty() {
                self.answer(jobs);
            }
        }
    }

    fn answer(&self, jobs: Vec<Job<T>>) {
        let vectors = self.vectors(&jobs);
        let encoded = Instant::now();
        let mut pending: Vec<(Job<T>, Vec<f32>)> = Vec::with_capacity(jobs.len());
        for (job, v) in jobs.into_iter().zip(vectors) {
            match v {
                Ok(v) => pending.push((job, v)),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        // One search per group of queries with the same k and options.
        while let Some((first, _)) = pending.first() {
            let (k, options) = (first.query.k, first.query.options.clone());
            let (group, rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|(j, _)| j.query.k == k && j.query.options == options);
            pending = rest;
            let queries: Vec<f32> = group.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let start = Instant::now();
            let found = catch_unwind(AssertUnwindSafe(|| (self.search)(&queries, k, &options)))
                .map_err(|panic| Error::Panicked(panic_message(panic.as_ref())))
                .and_then(|r| r)
                .and_then(|lists| {
                    if lists.len() == group.len() {
                        Ok(lists)
                    } else {
                        Err(Error::Encode {
                            what: format!("{} searches", group.len()),
                            message: format!("the search returned {} answers", lists.len()),
                        })
                    }
                });
            let search = start.elapsed();
            match found {
                Ok(lists) => {
                    for ((job, _), hits) in group.into_iter().zip(lists) {
                        let _ = job.reply.send(Ok(Answer {
                            hits,
                            encode: encoded - job.arrived,
                            search,
                        }));
                    }
                }
                Err(e) => {
                    for (job, _) in group {
                        let _ = job.reply.send(Err(e.duplicate()));
                    }
                }
            }
        }
    }

    /// Each job's vector: one encoder call for all, or one call each if that
    /// fails.
    fn vectors(&self, jobs: &[Job<T>]) -> Vec<Result<Vec<f32>>> {
        let texts: Vec<String> = jobs.iter().map(|j| j.query.text.clone()).collect();
        match self.encode(&texts) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(_) if jobs.len() > 1 => texts
                .iter()
                .map(|t| {
                    self.encode(std::slice::from_ref(t))
                        .map(|mut rows| rows.remove(0))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }

    /// One encoder call, its rows split, a panic turned into an error.
    fn encode(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        self.metrics.observe_batch(texts.len());
        let dim = self.encoder.dim();
        let flat = catch_unwind(AssertUnwindSafe(|| self.encoder.embed_texts(texts)))
            .map_err(|panic| Error::Panicked(panic_message(panic.as_ref())))??;
        if dim == 0 || flat.len() != texts.len() * dim {
            return Err(Error::Encode {
                what: format!("{} text queries", texts.len()),
                message: format!(
                    "the encoder returned {} values, expected {} x {dim}",
                    flat.len(),
                    texts.len()
                ),
            });
        }
        Ok(flat.chunks_exact(dim).map(<[f32]>::to_vec).collect())
    }
}

/// The text of a panic payload (`panic!` with a literal or a format string).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".into())
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use image::RgbImage;

    use super::*;

    const DIM: usize = 4;

    /// A deterministic stand-in for the model: a text's vector depends on the
    /// text alone. The first call can be held at a gate, so a test can queue
    /// queries behind it without relying on timing; `boom` panics.
    struct Mock {
        calls: Mutex<Vec<usize>>,
        gate: Mutex<bool>,
        opened: Condvar,
        entered: Mutex<usize>,
        entered_cv: Condvar,
    }

    impl Mock {
        fn new(gated: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: Mutex::new(Vec::new()),
                gate: Mutex::new(!gated),
                opened: Condvar::new(),
                entered: Mutex::new(0),
                entered_cv: Condvar::new(),
            })
        }
        fn open(&self) {
            *self.gate.lock().unwrap() = true;
            self.opened.notify_all();
        }
        fn wait_entered(&self, n: usize) {
            let mut e = self.entered.lock().unwrap();
            while *e < n {
                e = self.entered_cv.wait(e).unwrap();
            }
        }
        fn vector(text: &str) -> Vec<f32> {
            let b = text.as_bytes();
            (0..DIM)
                .map(|i| b.iter().map(|&c| f32::from(c) * (i + 1) as f32).sum())
                .collect()
        }
    }

    impl QueryEncoder for Mock {
        fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
            self.calls.lock().unwrap().push(texts.len());
            *self.entered.lock().unwrap() += 1;
            self.entered_cv.notify_all();
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open);
            if texts.iter().any(|t| t == "boom") {
                panic!("the mock encoder was asked for boom");
            }
            Ok(texts.iter().flat_map(|t| Mock::vector(t)).collect())
        }
        fn embed_images(&self, _: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
            unreachable!("text only")
        }
        fn dim(&self) -> usize {
            DIM
        }
        fn weights_hash(&self) -> &str {
            "mock"
        }
        fn describe(&self) -> String {
            "mock".into()
        }
    }

    type Log = Arc<Mutex<Vec<(usize, usize)>>>;

    /// A batcher over `mock` whose search answers each query with its own
    /// vector and logs `(queries, k)` of each call.
    fn spawn(mock: &Arc<Mock>, max_batch: usize, queue: usize) -> (Batcher<Vec<f32>>, Log) {
        let log: Log = Arc::default();
        let search: Arc<SearchFn<Vec<f32>>> = {
            let log = log.clone();
            Arc::new(move |queries: &[f32], k: usize, _: &SearchOptions| {
                log.lock().unwrap().push((queries.len() / DIM, k));
                Ok(queries.chunks(DIM).map(|q| vec![q.to_vec()]).collect())
            })
        };
        let b = Batcher::spawn(
            mock.clone(),
            search,
            config(max_batch, queue),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        (b, log)
    }

    async fn embed(b: &Batcher<Vec<f32>>, text: String) -> Result<Vec<f32>> {
        embed_k(b, text, 1).await
    }

    async fn embed_k(b: &Batcher<Vec<f32>>, text: String, k: usize) -> Result<Vec<f32>> {
        let query = Query {
            text,
            k,
            options: SearchOptions::default(),
        };
        Ok(b.search(query).await?.hits.remove(0))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn config(max_batch: usize, queue: usize) -> BatchConfig {
        BatchConfig {
            // A long window would only slow the test down: the queries below
            // are queued before the thread looks, whatever the window.
            window: Duration::from_millis(1),
            max_batch,
            queue,
        }
    }

    #[test]
    fn queued_queries_share_one_call_and_get_their_own_rows() {
        let mock = Mock::new(true);
        let b = Arc::new(spawn(&mock, 32, 64).0);
        let rt = runtime();
        let first = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "first".into()).await }
        });
        mock.wait_entered(1);
        let texts: Vec<String> = (0..20).map(|i| format!("query number {i}")).collect();
        let rest: Vec<_> = texts
            .iter()
            .map(|t| {
                let (b, t) = (b.clone(), t.clone());
                rt.spawn(async move { embed(&b, t).await })
            })
            .collect();
        while b.queued() < texts.len() {
            std::thread::yield_now();
        }
        mock.open();
        assert_eq!(rt.block_on(first).unwrap().unwrap(), Mock::vector("first"));
        for (t, h) in texts.iter().zip(rest) {
            assert_eq!(rt.block_on(h).unwrap().unwrap(), Mock::vector(t), "{t}");
        }
        assert_eq!(*mock.calls.lock().unwrap(), vec![1, 20]);
    }

    #[test]
    fn max_batch_caps_a_call() {
        let mock = Mock::new(true);
        let b = Arc::new(spawn(&mock, 4, 64).0);
        let rt = runtime();
        let first = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "first".into()).await }
        });
        mock.wait_entered(1);
        let rest: Vec<_> = (0..10)
            .map(|i| {
                let b = b.clone();
                rt.spawn(async move { embed(&b, format!("q{i}")).await })
            })
            .collect();
        while b.queued() < 10 {
            std::thread::yield_now();
        }
        mock.open();
        rt.block_on(first).unwrap().unwrap();
        for h in rest {
            rt.block_on(h).unwrap().unwrap();
        }
        assert_eq!(*mock.calls.lock().unwrap(), vec![1, 4, 4, 2]);
    }

    #[test]
    fn a_panicking_query_fails_alone_and_the_thread_survives() {
        let mock = Mock::new(true);
        let b = Arc::new(spawn(&mock, 32, 64).0);
        let rt = runtime();
        let first = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "first".into()).await }
        });
        mock.wait_entered(1);
        let good = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "good".into()).await }
        });
        let bad = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "boom".into()).await }
        });
        while b.queued() < 2 {
            std::thread::yield_now();
        }
        mock.open();
        rt.block_on(first).unwrap().unwrap();
        assert_eq!(rt.block_on(good).unwrap().unwrap(), Mock::vector("good"));
        let e = rt.block_on(bad).unwrap().unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
        // The thread is still there.
        assert_eq!(
            rt.block_on(embed(&b, "after".into())).unwrap(),
            Mock::vector("after")
        );
    }

    #[test]
    fn a_full_queue_answers_busy() {
        let mock = Mock::new(true);
        let b = Arc::new(spawn(&mock, 1, 2).0);
        let rt = runtime();
        let first = rt.spawn({
            let b = b.clone();
            async move { embed(&b, "first".into()).await }
        });
        mock.wait_entered(1);
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let b = b.clone();
                rt.spawn(async move { embed(&b, format!("q{i}")).await })
            })
            .collect();
        while b.queued() < 2 {
            std::thread::yield_now();
        }
        let e = rt.block_on(embed(&b, "one too many".into())).unwrap_err();
        assert!(matches!(e, Error::Busy { queued: 2 }), "{e}");
        mock.open();
        rt.block_on(first).unwrap().unwrap();
        for h in queued {
            rt.block_on(h).unwrap().unwrap();
        }
    }
}

#[cfg(test)]
mod grouping {
    use super::*;
    use crate::Metrics;
    use cots_index::Filter;
    use image::RgbImage;
    use std::sync::Mutex;

    struct Ones;
    impl QueryEncoder for Ones {
        fn embed_texts(&self, texts: &[String]) -> cots_infer::Result<Vec<f32>> {
            Ok(texts.iter().flat_map(|t| [t.len() as f32, 1.0]).collect())
        }
        fn embed_images(&self, _: &[RgbImage]) -> cots_infer::Result<Vec<f32>> {
            unreachable!("text only")
        }
        fn dim(&self) -> usize {
            2
        }
        fn weights_hash(&self) -> &str {
            "ones"
        }
        fn describe(&self) -> String {
            "ones".into()
        }
    }

    /// Queries queued together are searched once per (k, options) group,
    /// and each still gets its own answer.
    #[test]
    fn a_batch_is_searched_once_per_group_of_options() {
        type Seen = Vec<(usize, usize, bool)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let search: Arc<SearchFn<(usize, f32)>> = {
            let seen = seen.clone();
            Arc::new(move |q: &[f32], k: usize, o: &SearchOptions| {
                seen.lock()
                    .unwrap()
                    .push((q.len() / 2, k, o.filter.is_empty()));
                Ok(q.chunks(2).map(|v| vec![(k, v[0])]).collect())
            })
        };
        let cfg = BatchConfig {
            window: Duration::from_secs(3600),
            max_batch: 6,
            queue: 16,
        };
        let b = Arc::new(
            Batcher::spawn(Arc::new(Ones), search, cfg, Arc::new(Metrics::new())).unwrap(),
        );
        let filtered = SearchOptions {
            filter: Filter {
                equals: [("split".to_string(), "test".to_string())].into(),
            },
            ..SearchOptions::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Six queries fill the batch (the window is an hour, so the batch
        // closes on max_batch alone).
        let plan = [
            ("a", 3, false),
            ("bb", 5, false),
            ("ccc", 3, true),
            ("dddd", 3, false),
            ("eeeee", 5, false),
            ("ffffff", 3, true),
        ];
        let handles: Vec<_> = plan
            .iter()
            .map(|&(t, k, f)| {
                let b = b.clone();
                let options = if f {
                    filtered.clone()
                } else {
                    SearchOptions::default()
                };
                rt.spawn(async move {
                    b.search(Query {
                        text: t.to_string(),
                        k,
                        options,
                    })
                    .await
                })
            })
            .collect();
        for (h, &(t, k, _)) in handles.into_iter().zip(&plan) {
            let a = rt.block_on(h).unwrap().unwrap();
            assert_eq!(a.hits, vec![(k, t.len() as f32)], "{t}");
        }
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, vec![(2, 3, false), (2, 3, true), (2, 5, true)]);
    }
}
