//! In-memory fake backend for unit tests of the store logic.

use super::{Backend, BackendError, LockGuard, ObjectInfo};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// Objects in a map; the lock is a real reader-writer lock.
#[derive(Default, Clone)]
pub struct MemBackend {
    objects: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    lock: Arc<RwLock<()>>,
}

struct MemGuard(#[allow(dead_code)] Arc<RwLock<()>>);
impl LockGuard for MemGuard {}

impl Backend for MemBackend {
    fn put(&self, key: &str, data: &[u8], _durable: bool) -> Result<(), BackendError> {
        self.objects
            .lock()
            .expect("mem")
            .insert(key.to_string(), data.to_vec());
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, BackendError> {
        let objs = self.objects.lock().expect("mem");
        objs.get(key)
            .cloned()
            .ok_or_else(|| BackendError::NotFound(key.to_string()))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let objs = self.objects.lock().expect("mem");
        Ok(objs
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.objects.lock().expect("mem").remove(key);
        Ok(())
    }
    fn sync(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn lock(&self, _exclusive: bool) -> Result<Box<dyn LockGuard>, BackendError> {
        // The fake serialises nothing; tests using it run one operation at a time.
        Ok(Box::new(MemGuard(self.lock.clone())))
    }
    fn clean_temp(&self) -> Result<u64, BackendError> {
        Ok(0)
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}
