//! Results of costly pure functions of two `f64` arguments, remembered
//! by their bits (the same arguments always give the same result).

use crate::error::DpError;
use std::collections::HashMap;
use std::sync::Mutex;

/// Remembered results by `(a, b)` bits; when full, it forgets them all and
/// starts again (the working set of a node is a handful of costs).
pub(crate) struct Memo {
    map: Mutex<HashMap<(u64, u64), Result<f64, DpError>>>,
    capacity: usize,
}

impl Memo {
    /// An empty memo of at most `capacity` results.
    pub(crate) fn new(capacity: usize) -> Memo {
        Memo {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The result for `(a, b)`, computed by `f` unless remembered.
    pub(crate) fn get_or(
        &self,
        a: f64,
        b: f64,
        f: impl FnOnce() -> Result<f64, DpError>,
    ) -> Result<f64, DpError> {
        let key = (a.to_bits(), b.to_bits());
        if let Some(hit) = self.lock().get(&key) {
            return hit.clone();
        }
        let value = f();
        let mut map = self.lock();
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(key, value.clone());
        value
    }

    /// How many results are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Result<f64, DpError>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}
