//! What is counted on every request, kept per thread without atomic read-modify-writes and
//! summed when the registry is read.
//!
//! An atomic add (`lock xadd`) costs ~4 ns on the benchmark box against a fraction of that for
//! a plain one, and the families counted on the cached path took 13 per request (a prometheus
//! histogram observation alone is four). Each thread that counts gets its own [`Shard`],
//! written by that thread only — so a load and a store stand in for each atomic add — and
//! registered once with its [`HotCounts`]. Reading sums the shards: the counters and the
//! in-flight gauge are brought up to date in their registry families
//! ([`HotCounts::fold_into`]), the two histograms are collected straight from the shards
//! ([`HotHistogram`]).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto;
use prometheus::{IntCounter, IntGauge};

use super::{
    CACHE_RESULTS, DECISIONS, REASONS, REQUEST_BUCKETS, UPSTREAM_BUCKETS, UPSTREAM_CLASSES,
};

/// A count only one thread ever writes: `add` is a load and a store, and readers on other
/// threads see every value it stored (each store releases what came before it).
#[derive(Default)]
struct Count(AtomicU64);

impl Count {
    fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Release);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// One histogram's observations on one thread: a count per bucket, the last for `+Inf`, and
/// the sum (as `f64` bits). The total is the sum of the buckets, so that it always equals the
/// `+Inf` bucket a reader shows.
struct Buckets {
    counts: Box<[Count]>,
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &[f64]) -> Self {
        Buckets {
            counts: (0..=bounds.len()).map(|_| Count::default()).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, bounds: &[f64], value: f64) {
        let bucket = bounds.partition_point(|bound| *bound < value);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed)) + value;
        self.sum.store(sum.to_bits(), Ordering::Release);
        self.counts[bucket].add(1);
    }
}

/// One thread's counts.
struct Shard {
    decisions: [[Count; REASONS.len()]; DECISIONS.len()],
    request_duration: [Buckets; DECISIONS.len()],
    upstream_classes: [Count; UPSTREAM_CLASSES.len()],
    upstream_duration: Buckets,
    cache_results: [Count; CACHE_RESULTS.len()],
    started: Count,
    finished: Count,
}

impl Shard {
    fn new() -> Self {
        Shard {
            decisions: Default::default(),
            request_duration: std::array::from_fn(|_| Buckets::new(REQUEST_BUCKETS)),
            upstream_classes: Default::default(),
            upstream_duration: Buckets::new(UPSTREAM_BUCKETS),
            cache_results: Default::default(),
            started: Count::default(),
            finished: Count::default(),
        }
    }
}

thread_local! {
    /// This thread's shard of each [`HotCounts`] it counted in, by the instance's id (one in a
    /// gateway; tests start many gateways in one process).
    static MINE: RefCell<Vec<(u64, &'static Shard)>> = const { RefCell::new(Vec::new()) };
    /// The last of them used: the common case is one lookup of a plain thread-local.
    static LAST: Cell<Option<(u64, &'static Shard)>> = const { Cell::new(None) };
}

/// The counts of the hot path of one [`super::Metrics`].
///
/// A shard lives as long as the process (it is leaked: one per thread and instance, a few
/// hundred bytes), so that a thread can keep a plain reference to it.
pub struct HotCounts {
    id: u64,
    shards: Mutex<Vec<&'static Shard>>,
    /// For a thread whose thread-locals are already gone (a future dropped as its thread
    /// ends): shared, so written under the lock.
    orphan: Mutex<()>,
    orphan_shard: &'static Shard,
    /// The totals already added to the registry's counters.
    folded: Mutex<Folded>,
}

#[derive(Default)]
struct Folded {
    decisions: [[u64; REASONS.len()]; DECISIONS.len()],
    upstream_classes: [u64; UPSTREAM_CLASSES.len()],
    cache_results: [u64; CACHE_RESULTS.len()],
}

/// The registry's families that [`HotCounts::fold_into`] brings up to date.
pub struct FoldTargets<'a> {
    pub decisions: &'a [[IntCounter; REASONS.len()]; DECISIONS.len()],
    pub upstream_classes: &'a [IntCounter; UPSTREAM_CLASSES.len()],
    pub cache_results: &'a [IntCounter; CACHE_RESULTS.len()],
    pub inflight: &'a IntGauge,
}

impl HotCounts {
    pub fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let orphan_shard: &'static Shard = Box::leak(Box::new(Shard::new()));
        HotCounts {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(vec![orphan_shard]),
            orphan: Mutex::new(()),
            orphan_shard,
            folded: Mutex::new(Folded::default()),
        }
    }

    /// Runs `count` on the calling thread's shard (registering it on first use).
    #[inline]
    fn with_shard(&self, count: impl FnOnce(&Shard)) {
        match LAST.try_with(Cell::get) {
            Ok(Some((id, shard))) if id == self.id => count(shard),
            _ => match self.thread_shard() {
                Some(shard) => count(shard),
                None => {
                    let _only_writer = self.orphan.lock().expect("orphan shard lock");
                    count(self.orphan_shard);
                }
            },
        }
    }

    /// The calling thread's shard, made and registered on its first count; `None` once the
    /// thread's locals are gone.
    #[cold]
    fn thread_shard(&self) -> Option<&'static Shard> {
        let shard = MINE
            .try_with(|mine| {
                if let Some((_, shard)) = mine.borrow().iter().find(|(id, _)| *id == self.id) {
                    return *shard;
                }
                let shard: &'static Shard = Box::leak(Box::new(Shard::new()));
                self.shards.lock().expect("metric shards lock").push(shard);
                mine.borrow_mut().push((self.id, shard));
                shard
            })
            .ok()?;
        LAST.try_with(|last| last.set(Some((self.id, shard))))
            .ok()?;
        Some(shard)
    }

    /// A request entered the gateway.
    pub fn request_started(&self) {
        self.with_shard(|shard| shard.started.add(1));
    }

    /// A request left it (answered, or dropped when its client went away).
    pub fn request_finished(&self) {
        self.with_shard(|shard| shard.finished.add(1));
    }

    /// A decision, by its indices in [`DECISIONS`] and [`REASONS`], and the time its request
    /// took.
    pub fn decided(&self, decision: usize, reason: usize, seconds: f64) {
        self.with_shard(|shard| {
            shard.decisions[decision][reason].add(1);
            shard.request_duration[decision].observe(REQUEST_BUCKETS, seconds);
        });
    }

    /// An upstream answer (or its absence) by its class index in [`UPSTREAM_CLASSES`].
    pub fn upstream_class(&self, class: usize) {
        self.with_shard(|shard| shard.upstream_classes[class].add(1));
    }

    /// The time to the upstream's answer head.
    pub fn upstream_duration(&self, seconds: f64) {
        self.with_shard(|shard| shard.upstream_duration.observe(UPSTREAM_BUCKETS, seconds));
    }

    /// A token cache lookup by its result index in [`CACHE_RESULTS`].
    pub fn cache_result(&self, result: usize) {
        self.with_shard(|shard| shard.cache_results[result].add(1));
    }

    /// Adds to `targets` what the shards counted since the last fold, and sets the in-flight
    /// gauge.
    pub fn fold_into(&self, targets: FoldTargets<'_>) {
        let mut folded = self.folded.lock().expect("metric fold lock");
        let shards = self.shards.lock().expect("metric shards lock").clone();
        let total = |count: &dyn Fn(&Shard) -> &Count| -> u64 {
            shards.iter().map(|shard| count(shard).get()).sum()
        };
        for (d, reasons) in targets.decisions.iter().enumerate() {
            for (r, counter) in reasons.iter().enumerate() {
                let now = total(&|shard| &shard.decisions[d][r]);
                counter.inc_by(now - folded.decisions[d][r]);
                folded.decisions[d][r] = now;
            }
        }
        for (c, counter) in targets.upstream_classes.iter().enumerate() {
            let now = total(&|shard| &shard.upstream_classes[c]);
            counter.inc_by(now - folded.upstream_classes[c]);
            folded.upstream_classes[c] = now;
        }
        for (r, counter) in targets.cache_results.iter().enumerate() {
            let now = total(&|shard| &shard.cache_results[r]);
            counter.inc_by(now - folded.cache_results[r]);
            folded.cache_results[r] = now;
        }
        // Every end read before any start: a request is seen started if it is seen finished
        // (it may have started on another thread; the hand-over between threads orders that).
        let finished = total(&|shard| &shard.finished);
        let started = total(&|shard| &shard.started);
        targets
            .inflight
            .set(i64::try_from(started.saturating_sub(finished)).unwrap_or(i64::MAX));
    }

    fn shards(&self) -> Vec<&'static Shard> {
        self.shards.lock().expect("metric shards lock").clone()
    }
}

impl Default for HotCounts {
    fn default() -> Self {
        HotCounts::new()
    }
}

/// Which histogram of the shards a [`HotHistogram`] shows.
#[derive(Clone, Copy)]
pub enum HistogramOf {
    /// `mfa_gate_request_duration_seconds{decision}`.
    RequestDuration,
    /// `mfa_gate_upstream_duration_seconds`.
    UpstreamDuration,
}

/// A histogram family collected from the shards of a [`HotCounts`], exported exactly as a
/// prometheus histogram (vec) of the same name, help, labels and buckets would be.
pub struct HotHistogram {
    counts: Arc<HotCounts>,
    of: HistogramOf,
    desc: Desc,
}

impl HotHistogram {
    pub fn new(counts: Arc<HotCounts>, of: HistogramOf, name: &str, help: &str) -> Self {
        let labels = match of {
            HistogramOf::RequestDuration => vec!["decision".to_string()],
            HistogramOf::UpstreamDuration => vec![],
        };
        let desc =
            Desc::new(name.into(), help.into(), labels, Default::default()).expect("valid metric");
        HotHistogram { counts, of, desc }
    }
}

impl Collector for HotHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let shards = self.counts.shards();
        let (labels, bounds): (Vec<Option<&'static str>>, &[f64]) = match self.of {
            HistogramOf::RequestDuration => (
                DECISIONS.iter().map(|d| Some(*d)).collect(),
                REQUEST_BUCKETS,
            ),
            HistogramOf::UpstreamDuration => (vec![None], UPSTREAM_BUCKETS),
        };
        let mut metrics = Vec::with_capacity(labels.len());
        for (series, label) in labels.into_iter().enumerate() {
            let mut counts = vec![0u64; bounds.len() + 1];
            let mut sum = 0.0;
            for shard in &shards {
                let buckets = match self.of {
                    HistogramOf::RequestDuration => &shard.request_duration[series],
                    HistogramOf::UpstreamDuration => &shard.upstream_duration,
                };
                // The sum first: it may then lag the counts by an observation, never lead.
                sum += f64::from_bits(buckets.sum.load(Ordering::Acquire));
                for (total, count) in counts.iter_mut().zip(buckets.counts.iter()) {
                    *total += count.get();
                }
            }
            let mut histogram = proto::Histogram::default();
            let mut cumulative = 0;
            let mut exported = Vec::with_capacity(bounds.len());
            for (bound, count) in bounds.iter().zip(&counts) {
                cumulative += count;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(*bound);
                bucket.set_cumulative_count(cumulative);
                exported.push(bucket);
            }
            histogram.set_bucket(exported);
            histogram.set_sample_count(counts.iter().sum());
            histogram.set_sample_sum(sum);
            let mut metric = proto::Metric::default();
            if let Some(value) = label {
                let mut pair = proto::LabelPair::default();
                pair.set_name(self.desc.variable_labels[0].clone());
                pair.set_value(value.to_string());
                metric.set_label(vec![pair]);
            }
            metric.set_histogram(histogram);
            metrics.push(metric);
        }
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// The text exposition lines of `family` in `text`.
    fn lines_of<'t>(text: &'t str, family: &str) -> Vec<&'t str> {
        text.lines()
            .filter(|line| line.starts_with(family) || line.contains(&format!(" {family} ")))
            .collect()
    }

    #[test]
    fn counts_from_many_threads_add_up_and_are_folded_once() {
        let metrics = Arc::new(Metrics::new());
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let metrics = &metrics;
                scope.spawn(move || {
                    for _ in 0..1000 {
                        metrics.hot.request_started();
                        metrics.hot.decided(0, 1, 0.000_2);
                        metrics.hot.upstream_class(1);
                        metrics.hot.cache_result(0);
                        metrics.hot.upstream_duration(0.003);
                        metrics.hot.request_finished();
                    }
                });
            }
        });
        metrics.hot.request_started(); // one still in flight
        for _ in 0..2 {
            // Read twice: a second fold adds nothing.
            let text = metrics.render();
            let reason = crate::metrics::REASONS[1];
            let decisions =
                format!("mfa_gate_decisions_total{{decision=\"allow\",reason=\"{reason}\"}} 4000");
            assert!(text.contains(&decisions), "{text}");
            assert!(text.contains("mfa_gate_upstream_responses_total{class=\"2xx\"} 4000"));
            assert!(text.contains("mfa_gate_cache_lookups_total{result=\"hit\"} 4000"));
            assert!(text.contains("\nmfa_gate_inflight_requests 1\n"), "{text}");
            assert!(
                text.contains("mfa_gate_request_duration_seconds_count{decision=\"allow\"} 4000")
            );
            assert!(text.contains("mfa_gate_request_duration_seconds_count{decision=\"deny\"} 0"));
            assert!(text.contains("mfa_gate_upstream_duration_seconds_count 4000"));
        }
    }

    /// The families read from the shards are exported exactly as prometheus's own histograms
    /// of the same name, help, labels and buckets, fed the same observations, would be.
    #[test]
    fn the_histograms_read_as_prometheus_histograms_would() {
        let metrics = Metrics::new();
        let reference = prometheus::Registry::new();
        let request = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "mfa_gate_request_duration_seconds",
                "Time from request head received to response head sent, by decision.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["decision"],
        )
        .unwrap();
        let upstream = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "mfa_gate_upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response head.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
        )
        .unwrap();
        reference.register(Box::new(request.clone())).unwrap();
        reference.register(Box::new(upstream.clone())).unwrap();
        request.with_label_values(&["allow"]);
        // Bucket edges included: an observation equal to a bound is counted in it.
        let observations = [0.000_01, 0.000_05, 0.000_3, 0.001, 0.7, 2.5, 11.0, 0.000_25];
        for (i, seconds) in observations.into_iter().enumerate() {
            let decision = i % 2;
            metrics.hot.decided(decision, 0, seconds);
            request
                .with_label_values(&[DECISIONS[decision]])
                .observe(seconds);
            metrics.hot.upstream_duration(seconds * 10.0);
            upstream.observe(seconds * 10.0);
        }
        let mut expected = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &reference.gather(),
            &mut expected,
        )
        .unwrap();
        let expected = String::from_utf8(expected).unwrap();
        let text = metrics.render();
        for family in [
            "mfa_gate_request_duration_seconds",
            "mfa_gate_upstream_duration_seconds",
        ] {
            let got = lines_of(&text, family);
            assert!(got.len() > 10, "{text}");
            assert_eq!(got, lines_of(&expected, family), "{family}");
        }
    }
}
