//! [`LocalGroup`]: a process group of threads of one process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{bail, Device, Result};

use super::ProcessGroup;

/// A process group whose ranks are threads of this process, exchanging through shared memory:
/// for tests without MPI, and for a process that drives several devices' worth of CPU gradients
/// from one thread each. Each rank's handle goes to its own thread, and every rank must call the
/// same collectives in the same order.
///
/// **A handle is a rank.** It is not `Clone`, and the group counts arrivals per rank: a rank that
/// enters a collective while it is already in one (its handle shared by two threads) gets an
/// error, and the round goes on with its first call. **A rank that never arrives** leaves the
/// others waiting, as in MPI, unless:
/// - its handle is dropped (its thread returned, or panicked and unwound): the others'
///   collectives, waiting or to come, fail, naming it;
/// - the waiting rank has a timeout ([`with_timeout`](Self::with_timeout)): when it expires the
///   collective fails, naming the ranks that never arrived, and the group is broken (every
///   collective of every rank fails from then on: the round's partial result cannot be undone).
///
/// ```
/// use candle_grad_clip::{LocalGroup, ProcessGroup};
/// # fn main() -> candle_core::Result<()> {
/// let ranks = LocalGroup::new(4)?;
/// assert_eq!(ranks.len(), 4);
/// assert_eq!((ranks[2].rank(), ranks[2].world_size()), (2, 4));
/// let maxima = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .iter()
///         .map(|g| {
///             s.spawn(move || -> candle_core::Result<u64> {
///                 let mut words = [10 * g.rank() as u64];
///                 g.all_reduce_max_u64(&mut words)?;
///                 Ok(words[0])
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
/// })?;
/// assert_eq!(maxima, [30, 30, 30, 30]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    device: Device,
    /// How long this rank waits in a collective for the others (none: forever).
    timeout: Option<Duration>,
    shared: Arc<Shared>,
    /// A call failed on this rank after its collective (see `ProcessGroup::mark_out_of_step`).
    out_of_step: AtomicBool,
}

#[derive(Debug)]
struct Shared {
    world_size: usize,
    round: Mutex<Round>,
    done: Condvar,
}

/// The collective in progress, and the result of the last one.
#[derive(Debug)]
struct Round {
    /// Rounds completed so far.
    generation: u64,
    /// The ranks that have contributed to the round in progress.
    arrived: Vec<bool>,
    /// How many they are.
    count: usize,
    /// The round's collective and the rank that opened it, once one rank arrived.
    opened_by: Option<(&'static str, usize)>,
    accumulator: Vec<u64>,
    /// The first mismatch seen in the round in progress.
    mismatch: Option<String>,
    /// The result of the last completed round.
    result: Arc<std::result::Result<Vec<u64>, String>>,
    /// Why no round can complete any more.
    broken: Option<Broken>,
}

/// Why a group can no longer complete a collective.
#[derive(Debug, Clone)]
enum Broken {
    /// A rank's thread panicked (its handle dropped while unwinding).
    Panicked(usize),
    /// A rank's handle was dropped.
    Left(usize),
    /// A rank's wait timed out, these ranks missing.
    TimedOut { rank: usize, missing: Vec<usize> },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Panicked(rank) => write!(f, "rank {rank} panicked"),
            Broken::Left(rank) => write!(f, "rank {rank} left the group (its handle was dropped)"),
            Broken::TimedOut { rank, missing } => write!(
                f,
                "rank {rank} timed out waiting for {} that never arrived",
                ranks_list(missing)
            ),
        }
    }
}

/// "rank 1" or "ranks 1, 3".
fn ranks_list(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    match ranks.len() {
        1 => format!("rank {}", list[0]),
        _ => format!("ranks {}", list.join(", ")),
    }
}

impl LocalGroup {
    /// The handles of a group of `world_size` ranks, rank `i` at index `i`.
    ///
    /// ```
    /// assert!(candle_grad_clip::LocalGroup::new(0).is_err());
    /// ```
    pub fn new(world_size: usize) -> Result<Vec<LocalGroup>> {
        if world_size == 0 {
            bail!("LocalGroup::new: a group needs at least one rank")
        }
        Self::on_devices(vec![Device::Cpu; world_size])
    }

    /// The handles of a group with one rank per device, rank `i` reducing gradients on
    /// `devices[i]` (several GPUs driven from one process, one thread each).
    ///
    /// ```
    /// use candle_core::Device;
    /// use candle_grad_clip::{LocalGroup, ProcessGroup};
    /// let ranks = LocalGroup::on_devices(vec![Device::Cpu, Device::Cpu]).unwrap();
    /// assert!(ranks[1].device().is_cpu());
    /// assert!(LocalGroup::on_devices(vec![]).is_err());
    /// ```
    pub fn on_devices(devices: Vec<Device>) -> Result<Vec<LocalGroup>> {
        let world_size = devices.len();
        if world_size == 0 {
            bail!("LocalGroup::on_devices: a group needs at least one rank")
        }
        let shared = Arc::new(Shared {
            world_size,
            round: Mutex::new(Round {
                generation: 0,
                arrived: vec![false; world_size],
                count: 0,
                opened_by: None,
                accumulator: Vec::new(),
                mismatch: None,
                result: Arc::new(Ok(Vec::new())),
                broken: None,
            }),
            done: Condvar::new(),
        });
        Ok(devices
            .into_iter()
            .enumerate()
            .map(|(rank, device)| LocalGroup {
                rank,
                device,
                timeout: None,
                shared: shared.clone(),
                out_of_step: AtomicBool::new(false),
            })
            .collect())
    }

    /// This rank waits at most `timeout` in a collective for the other ranks; then the
    /// collective fails with an error that names the ranks that never arrived, and the group is
    /// broken: every collective of every rank fails from then on (a rank waiting with it too).
    ///
    /// ```
    /// use std::time::Duration;
    /// use candle_grad_clip::{LocalGroup, ProcessGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// let mut ranks = LocalGroup::new(3)?.into_iter();
    /// let rank0 = ranks.next().unwrap().with_timeout(Duration::from_millis(50));
    /// let _others: Vec<_> = ranks.collect(); // ranks 1 and 2 never call
    /// let err = rank0.all_reduce_sum_u64(&mut [1]).unwrap_err().to_string();
    /// assert!(err.contains("ranks 1, 2"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds this rank's `words` to the open round (or opens it), recording a mismatch with the
    /// other ranks' call instead of failing alone: every rank then fails together.
    fn join(
        &self,
        round: &mut Round,
        name: &'static str,
        words: &[u64],
        combine: fn(u64, u64) -> u64,
    ) {
        match round.opened_by {
            None => {
                round.opened_by = Some((name, self.rank));
                round.accumulator = words.to_vec();
            }
            Some((other, opener)) => {
                if other != name || round.accumulator.len() != words.len() {
                    let message = format!(
                        "rank {} called {name} with {} words while rank {opener} called {other} with {} words",
                        self.rank,
                        words.len(),
                        round.accumulator.len()
                    );
                    round.mismatch.get_or_insert(message);
                } else {
                    for (a, &w) in round.accumulator.iter_mut().zip(words.iter()) {
                        *a = combine(*a, w);
                    }
                }
            }
        }
        round.arrived[self.rank] = true;
        round.count += 1;
    }

    /// The last rank in: publishes the round's result and wakes the others.
    fn complete(&self, round: &mut Round) {
        let accumulator = std::mem::take(&mut round.accumulator);
        round.result = Arc::new(match round.mismatch.take() {
            Some(m) => Err(m),
            None => Ok(accumulator),
        });
        round.arrived.iter_mut().for_each(|a| *a = false);
        round.count = 0;
        round.opened_by = None;
        round.generation += 1;
        self.shared.done.notify_all();
    }

    /// Waits until the round completes, the group breaks, or (with a timeout) the deadline
    /// passes: then the group is broken, so that every rank fails instead of waiting.
    fn wait_for_round<'g>(
        &'g self,
        mut round: MutexGuard<'g, Round>,
        name: &'static str,
    ) -> Result<MutexGuard<'g, Round>> {
        let world = self.shared.world_size;
        let generation = round.generation;
        let deadline = self.timeout.map(|t| (Instant::now() + t, t));
        while round.generation == generation && round.broken.is_none() {
            round = match deadline {
                None => self
                    .shared
                    .done
                    .wait(round)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some((deadline, timeout)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let missing: Vec<usize> =
                            (0..world).filter(|&r| !round.arrived[r]).collect();
                        let broken = Broken::TimedOut {
                            rank: self.rank,
                            missing: missing.clone(),
                        };
                        round.broken = Some(broken);
                        self.shared.done.notify_all();
                        bail!(
                            "LocalGroup rank {} of {world}: {name}: timed out after {timeout:?}: {} never arrived; the group is broken (every later collective fails)",
                            self.rank,
                            ranks_list(&missing)
                        )
                    }
                    self.shared
                        .done
                        .wait_timeout(round, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
        if round.generation == generation {
            let broken = round
                .broken
                .as_ref()
                .map_or_else(|| "the group broke".to_string(), |b| b.to_string());
            bail!(
                "LocalGroup rank {} of {world}: {name}: {broken} before the collective completed",
                self.rank
            )
        }
        Ok(round)
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left a consistent `Round` (it only panics
        // outside the updates), so the poison is ignored.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn all_reduce(
        &self,
        name: &'static str,
        words: &mut [u64],
        combine: fn(u64, u64) -> u64,
    ) -> Result<()> {
        let world = self.shared.world_size;
        let mut round = self.lock();
        if let Some(broken) = &round.broken {
            bail!(
                "LocalGroup rank {} of {world}: {name}: {broken}; the group cannot complete a collective",
                self.rank
            )
        }
        if round.arrived[self.rank] {
            let (other, opener) = round.opened_by.unwrap_or(("a collective", self.rank));
            bail!(
                "LocalGroup rank {} of {world}: {name}: rank {} is already in a collective ({other}, opened by rank {opener}): its handle is used by two threads at once; a handle is one rank and makes one call at a time",
                self.rank,
                self.rank
            )
        }
        self.join(&mut round, name, words, combine);
        if round.count == world {
            self.complete(&mut round);
        } else {
            round = self.wait_for_round(round, name)?;
        }
        // The next round cannot complete before this rank joins it, so `result` is this round's.
        let result = round.result.clone();
        drop(round);
        match &*result {
            Ok(values) => {
                words.copy_from_slice(values);
                Ok(())
            }
            Err(m) => bail!(
                "LocalGroup rank {} of {world}: {name}: mismatched collective: {m}",
                self.rank
            ),
        }
    }
}

impl Drop for LocalGroup {
    /// A dropped handle is a rank that left: the other ranks' collectives (waiting or to come)
    /// fail, naming it, instead of waiting for it forever; "panicked" when its thread unwinds.
    fn drop(&mut self) {
        let mut round = self.lock();
        let why = if std::thread::panicking() {
            Broken::Panicked(self.rank)
        } else {
            Broken::Left(self.rank)
        };
        round.broken.get_or_insert(why);
        self.shared.done.notify_all();
    }
}

impl ProcessGroup for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum_u64(&self, words: &mut [u64]) -> Result<()> {
        self.all_reduce("all_reduce_sum_u64", words, u64::wrapping_add)
    }

    fn all_reduce_max_u64(&self, words: &mut [u64]) -> Result<()> {
        self.all_reduce("all_reduce_max_u64", words, u64::max)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn mark_out_of_step(&self) {
        self.out_of_step.store(true, Ordering::SeqCst);
    }

    fn is_out_of_step(&self) -> bool {
        self.out_of_step.load(Ordering::SeqCst)
    }
}
