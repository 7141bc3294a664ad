//! The configuration the server runs, which can change while it runs: every reader takes the
//! current model at the start of its unit of work (a batch, a request, a delivery scan) and
//! keeps it to the end, so that a change is swapped in between units, never within one.

use crate::auth::Keys;
use starling_core::Model;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub struct Live {
    current: RwLock<(Arc<Model>, Arc<Keys>)>,
    /// `STARLING_ADMIN_TOKEN`, which the file's `server.admin_token` does not override.
    admin_token: Option<String>,
    active: Mutex<Active>,
    backfill: Mutex<Option<Arc<Backfill>>>,
    /// Changes are made one at a time.
    pub changing: tokio::sync::Mutex<()>,
}

/// The configuration applied last, as recorded in the database.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Active {
    pub version: i64,
    pub sha256: String,
    pub applied_ms: i64,
    pub how: String,
}

/// Progress of evaluating changed audiences over every stored profile.
#[derive(Debug, Default)]
pub struct Backfill {
    /// The configuration version it is for.
    pub version: i64,
    pub audiences: Vec<String>,
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Profiles whose state changed (values converted or dropped, memberships).
    pub changed: AtomicU64,
    pub finished: AtomicBool,
    /// Why it stopped early (a newer configuration, a failure).
    pub stopped: Mutex<Option<String>>,
}

impl Backfill {
    pub fn to_json(&self) -> serde_json::Value {
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        let stopped = self.stopped.lock().expect("backfill").clone();
        serde_json::json!({
            "version": self.version,
            "audiences": self.audiences,
            "done": done,
            "total": total,
            "changed": self.changed.load(Ordering::Relaxed),
            "finished": self.finished.load(Ordering::SeqCst),
            "stopped": stopped,
        })
    }
}

impl Live {
    pub fn new(model: Arc<Model>, admin_token: Option<String>) -> Live {
        let keys = Arc::new(Keys::new(&model, admin_token.as_deref()));
        Live {
            current: RwLock::new((model, keys)),
            admin_token,
            active: Mutex::default(),
            backfill: Mutex::default(),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// The model to use for one unit of work.
    pub fn model(&self) -> Arc<Model> {
        self.current.read().expect("configuration").0.clone()
    }

    pub fn keys(&self) -> Arc<Keys> {
        self.current.read().expect("configuration").1.clone()
    }

    /// The model to use for one unit of work, and the version it was recorded under (0 until
    /// the start has recorded it).
    pub fn model_and_version(&self) -> (Arc<Model>, i64) {
        let current = self.current.read().expect("configuration");
        (current.0.clone(), self.active.lock().expect("configuration").version)
    }

    /// Swaps `model` in; units of work started before go on with the model they took.
    pub fn swap(&self, model: Arc<Model>, active: Active) {
        let keys = Arc::new(Keys::new(&model, self.admin_token.as_deref()));
        // Both under the model's lock: a reader never sees one without the other.
        let mut current = self.current.write().expect("configuration");
        *current = (model, keys);
        *self.active.lock().expect("configuration") = active;
    }

    pub fn set_active(&self, active: Active) {
        *self.active.lock().expect("configuration") = active;
    }

    pub fn active(&self) -> Active {
        self.active.lock().expect("configuration").clone()
    }

    pub fn backfill(&self) -> Option<Arc<Backfill>> {
        self.backfill.lock().expect("backfill").clone()
    }

    /// The backfill under way or last made for `audience`.
    pub fn backfill_of(&self, audience: &str) -> Option<Arc<Backfill>> {
        self.backfill().filter(|b| b.audiences.iter().any(|a| a == audience))
    }

    pub fn start_backfill(&self, backfill: Arc<Backfill>) {
        if let Some(previous) = self.backfill.lock().expect("backfill").replace(backfill)
            && !previous.finished.load(Ordering::SeqCst)
        {
            previous.stopped.lock().expect("backfill").get_or_insert_with(|| "a newer configuration".into());
        }
    }
}
