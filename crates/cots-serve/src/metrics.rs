//! What does `/metrics` say? Request counts by route, method and status,
//! request latency and text-encoder batch-size histograms, and the index
//! size, in the Prometheus text exposition format (version 0.0.4).
//!
//! The format is a few lines per series, so it is written here from
//! counters behind short-lived locks rather than through a metrics stack.
//! Routes are the router's patterns (`/api/items/{id}`), never raw paths, so
//! the number of series stays bounded whatever clients send.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the batch-size buckets.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram in the Prometheus sense.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// The service's counters.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batches: Mutex<Histogram>,
    index_items: AtomicU64,
    index_dim: AtomicU64,
    connections_open: AtomicU64,
    /// Closed connections by why they ended (see [`crate::conn::Ended`]).
    connections_closed: Mutex<BTreeMap<&'static str, u64>>,
    connections_refused: AtomicU64,
    blocking_running: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A lock that a panic elsewhere cannot make unusable: counters stay
/// meaningful after any panic (every update is a single step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(BTreeMap::new()),
            batches: Mutex::new(Histogram::new(BATCH_BUCKETS)),
            index_items: AtomicU64::new(0),
            index_dim: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_closed: Mutex::new(BTreeMap::new()),
            connections_refused: AtomicU64::new(0),
            blocking_running: AtomicU64::new(0),
        }
    }

    /// One answered request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, latency: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), method.to_string(), status))
            .or_insert(0) += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(latency.as_secs_f64());
    }

    /// One text-encoder call with `n` queries.
    pub fn observe_batch(&self, n: usize) {
        lock(&self.batches).observe(n as f64);
    }

    /// Text-encoder calls so far.
    pub fn encoder_calls(&self) -> u64 {
        lock(&self.batches).counts.iter().sum()
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self, why: crate::conn::Ended) {
        use crate::conn::Ended;
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
        let why = match why {
            Ended::Closed => "closed",
            Ended::HeaderTimeout => "header_timeout",
            Ended::Idle => "idle_timeout",
            Ended::Error => "error",
        };
        *lock(&self.connections_closed).entry(why).or_insert(0) += 1;
    }

    pub(crate) fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Connections closed so far because they ended as `why`
    /// (`closed`, `header_timeout`, `idle_timeout` or `error`).
    pub fn closed_connections(&self, why: &str) -> u64 {
        lock(&self.connections_closed)
            .get(why)
            .copied()
            .unwrap_or(0)
    }

    /// Connections refused so far because too many were open.
    pub fn refused_connections(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// A blocking task (decode, encode, search) started or ended.
    pub(crate) fn blocking_started(&self) {
        self.blocking_running.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn blocking_ended(&self) {
        self.blocking_running.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set_index(&self, items: usize, dim: usize) {
        self.index_items.store(items as u64, Ordering::Relaxed);
        self.index_dim.store(dim as u64, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP cots_http_requests_total HTTP requests answered, by route, method and status.\n");
        out.push_str("# TYPE cots_http_requests_total counter\n");
        for ((route, method, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "cots_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                escape(route),
                escape(method)
            );
        }
        out.push_str("# HELP cots_http_request_duration_seconds Time from request to response head, by route.\n");
        out.push_str("# TYPE cots_http_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.write(
                &mut out,
                "cots_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str("# HELP cots_text_encoder_batch_size Text queries per text-encoder call.\n");
        out.push_str("# TYPE cots_text_encoder_batch_size histogram\n");
        lock(&self.batches).write(&mut out, "cots_text_encoder_batch_size", "");
        out.push_str("# HELP cots_index_items Items in the index being served.\n");
        out.push_str("# TYPE cots_index_items gauge\n");
        let _ = writeln!(
            out,
            "cots_index_items {}",
            self.index_items.load(Ordering::Relaxed)
        );
        out.push_str("# HELP cots_index_dimensions Width of the index's vectors.\n");
        out.push_str("# TYPE cots_index_dimensions gauge\n");
        let _ = writeln!(
            out,
            "cots_index_dimensions {}",
            self.index_dim.load(Ordering::Relaxed)
        );
        out.push_str("# HELP cots_http_connections_open HTTP connections open now.\n");
        out.push_str("# TYPE cots_http_connections_open gauge\n");
        let _ = writeln!(
            out,
            "cots_http_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP cots_http_connections_closed_total HTTP connections closed, by why: closed \
             (by either side after its requests), header_timeout, idle_timeout, error.\n",
        );
        out.push_str("# TYPE cots_http_connections_closed_total counter\n");
        for (why, n) in lock(&self.connections_closed).iter() {
            let _ = writeln!(
                out,
                "cots_http_connections_closed_total{{reason=\"{why}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP cots_http_connections_refused_total HTTP connections refused because too many \
             were open.\n",
        );
        out.push_str("# TYPE cots_http_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "cots_http_connections_refused_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP cots_blocking_tasks_running Image decodes, encodes and searches running on the \
             blocking pool, including those whose client has gone.\n",
        );
        out.push_str("# TYPE cots_blocking_tasks_running gauge\n");
        let _ = writeln!(
            out,
            "cots_blocking_tasks_running {}",
            self.blocking_running.load(Ordering::Relaxed)
        );
        out
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Cumulative bucket counts computed the slow way: for each bound, how
    /// many observations are at or below it.
    fn reference(bounds: &[f64], values: &[f64]) -> Vec<usize> {
        bounds
            .iter()
            .map(|&b| values.iter().filter(|&&v| v <= b).count())
            .chain([values.len()])
            .collect()
    }

    #[test]
    fn histogram_buckets_match_a_direct_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let values: Vec<f64> = (0..500)
            .map(|i| match i % 5 {
                // Exact bounds land in their own bucket (`le` is inclusive).
                0 => LATENCY_BUCKETS[rng.random_range(0..LATENCY_BUCKETS.len())],
                1 => rng.random_range(10.0..20.0),
                _ => rng.random_range(0.0..1.0f64).powi(3),
            })
            .collect();
        let mut h = Histogram::new(LATENCY_BUCKETS);
        for &v in &values {
            h.observe(v);
        }
        let mut text = String::new();
        h.write(&mut text, "x", "route=\"/a\"");
        let got: Vec<usize> = text
            .lines()
            .filter(|l| l.starts_with("x_bucket"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(got, reference(LATENCY_BUCKETS, &values));
        let sum: f64 = values.iter().sum();
        let line = text.lines().find(|l| l.starts_with("x_sum")).unwrap();
        let written: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((written - sum).abs() <= 1e-9 * sum.max(1.0));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
