//! A small least-recently-used map, for per-thread device state (the CUDA back end's scratch).

use candle_core::Result;

/// A small map that keeps only the `capacity` most recently used entries: per-thread device state
/// (CUDA scratch, pinned staging) for the devices a thread used last, so that a program creating
/// devices in a loop does not keep every old device's buffers alive.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct RecentlyUsed<K, V> {
    /// Most recently used last.
    entries: Vec<(K, V)>,
    capacity: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<K: PartialEq, V> RecentlyUsed<K, V> {
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
        }
    }

    /// The entry for `key`, made with `make` when absent (evicting the least recently used one
    /// beyond the capacity); it becomes the most recently used.
    pub(crate) fn get_or_try_insert(
        &mut self,
        key: K,
        make: impl FnOnce() -> Result<V>,
    ) -> Result<&mut V> {
        match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                let entry = self.entries.remove(i);
                self.entries.push(entry);
            }
            None => {
                let value = make()?;
                if self.entries.len() >= self.capacity.max(1) {
                    self.entries.remove(0);
                }
                self.entries.push((key, value));
            }
        }
        Ok(&mut self.entries.last_mut().expect("just pushed").1)
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<&K> {
        self.entries.iter().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recently_used_keeps_the_last_entries() {
        let mut cache = RecentlyUsed::new(2);
        *cache.get_or_try_insert(1, || Ok(10)).unwrap() += 1;
        cache.get_or_try_insert(2, || Ok(20)).unwrap();
        // 1 is used again: 2 becomes the oldest and is evicted by 3.
        assert_eq!(*cache.get_or_try_insert(1, || Ok(0)).unwrap(), 11);
        cache.get_or_try_insert(3, || Ok(30)).unwrap();
        assert_eq!(cache.keys(), vec![&1, &3]);
        // A failing constructor inserts nothing.
        assert!(cache
            .get_or_try_insert(4, || Err(candle_core::Error::Msg("no".into())))
            .is_err());
        assert_eq!(cache.keys(), vec![&1, &3]);
        // Re-created after eviction.
        assert_eq!(*cache.get_or_try_insert(2, || Ok(21)).unwrap(), 21);
        assert_eq!(cache.keys(), vec![&3, &2]);
    }
}
