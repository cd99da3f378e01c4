//! [`LocalGroup`]: a process group of threads of one process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{bail, Device, Result};

use super::ProcessGroup;

/// A process group whose ranks are threads of this process, exchanging through shared memory:
/// for tests without MPI, and for a process that drives several devices' worth of CPU gradients
/// from one thread each. Each rank's handle goes to its own thread, and every rank must call the
/// same collectives in the same order (a rank that never arrives leaves the others waiting, as in
/// MPI; but a rank whose thread panics, dropping its handle as it unwinds, makes the others'
/// collectives fail instead of waiting for it).
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
#[derive(Debug, Clone)]
pub struct LocalGroup {
    rank: usize,
    device: Device,
    shared: Arc<Shared>,
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
    /// Ranks that have contributed to the round in progress.
    arrived: usize,
    /// The round's collective and the rank that opened it, once one rank arrived.
    opened_by: Option<(&'static str, usize)>,
    accumulator: Vec<u64>,
    /// The first mismatch seen in the round in progress.
    mismatch: Option<String>,
    /// The result of the last completed round.
    result: Arc<std::result::Result<Vec<u64>, String>>,
    /// A rank whose thread panicked (its handle dropped while unwinding): no round can complete.
    broken: Option<usize>,
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
                arrived: 0,
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
                shared: shared.clone(),
            })
            .collect())
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
        let mut round = self.lock();
        if let Some(rank) = round.broken {
            bail!(
                "LocalGroup rank {} of {}: {name}: rank {rank} panicked; the group cannot complete a collective",
                self.rank,
                self.shared.world_size
            )
        }
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
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == self.shared.world_size {
            let accumulator = std::mem::take(&mut round.accumulator);
            round.result = Arc::new(match round.mismatch.take() {
                Some(m) => Err(m),
                None => Ok(accumulator),
            });
            round.arrived = 0;
            round.opened_by = None;
            round.generation += 1;
            self.shared.done.notify_all();
        } else {
            while round.generation == generation && round.broken.is_none() {
                round = self
                    .shared
                    .done
                    .wait(round)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if round.generation == generation {
                let rank = round.broken.unwrap_or(usize::MAX);
                bail!(
                    "LocalGroup rank {} of {}: {name}: rank {rank} panicked before the collective completed",
                    self.rank,
                    self.shared.world_size
                )
            }
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
                "LocalGroup rank {} of {}: {name}: mismatched collective: {m}",
                self.rank,
                self.shared.world_size
            ),
        }
    }
}

impl Drop for LocalGroup {
    /// A handle dropped while its thread unwinds from a panic breaks the group: the other ranks'
    /// collectives (waiting or to come) fail instead of waiting for this rank forever.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut round = self.lock();
            round.broken.get_or_insert(self.rank);
            self.shared.done.notify_all();
        }
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
}
