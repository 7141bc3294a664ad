//! Which profile each id belongs to. SQLite's `identities` table is the directory; what the
//! workers linked lately is held in memory on top of it (a worker points its links here after
//! each batch, or before it writes them to SQLite if that comes first), and is forgotten once
//! SQLite holds it alike and `HELD_FOR` has passed. So memory holds the ids of the last few
//! seconds and those not yet written, not every stitched id: a Bloom filter of the ids ever
//! stitched spares the lookup of ids that name their own profile (most of them), at about 1.2
//! bytes per stitched id.

use growable_bloom_filter::GrowableBloom;
use starling_log::Position;
use starling_store::StoreError;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// The Bloom filter's false positives (each costs a lookup in SQLite) and the ids it is sized
/// for at first (it grows by adding larger filters).
const FALSE_POSITIVES: f64 = 0.01;
const FIRST_SIZED_FOR: usize = 1_000_000;
/// Lookup connections kept open between lookups (more are opened while more run at once).
const IDLE_LOOKUPS: usize = 4;
/// How long memory keeps an id after it was pointed, even once SQLite holds it alike: the
/// position it keeps with the id is the record's own while other nodes may not have followed
/// that record yet; forgotten, the id is answered with the latest position forgotten, which a
/// node following the stream has passed by then (a follow round takes at most a second).
pub(super) const HELD_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Ids whose profile is named differently (stitched ids) → their profile id. Any other id
/// names its own profile.
#[derive(Clone)]
pub(super) struct Directory(Arc<Shared>);

struct Shared {
    held: RwLock<Held>,
    /// What `Pointed::at_ms` counts from.
    started: std::time::Instant,
    database: PathBuf,
    lookups: Mutex<Vec<rusqlite::Connection>>,
    /// One pruning at a time: another finding it under way skips its turn.
    pruning: Mutex<()>,
}

/// Held in memory: kept small. Each id's text is held once (shared by both maps), and each
/// profile's once; a profile's stitched ids (one or two, mostly) are a list sized to fit.
struct Held {
    /// Each id pointed lately or since SQLite last agreed.
    profile_of: HashMap<Arc<str>, Pointed>,
    /// The other way round, stitched ids only.
    ids_of: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Every id ever stitched, here or in SQLite.
    stitched: GrowableBloom,
    /// A log position the records that stitched the ids SQLite holds and memory does not are
    /// at or before: the latest forgotten; unknown (`Position::MAX`) for the ids SQLite held
    /// at start, until the start's replay settles it.
    stored_through: Position,
}

struct Pointed {
    /// Its profile: itself, if it was split out or its profile deleted.
    profile: Arc<str>,
    /// A log position the records that pointed it there are at or before.
    at: Position,
    /// When, in milliseconds since the directory was loaded.
    at_ms: u64,
}

impl Directory {
    /// Reads the ids SQLite holds stitched into the Bloom filter; lookups go to `database`.
    pub(super) fn load(conn: &rusqlite::Connection, database: PathBuf) -> Result<Directory, StoreError> {
        let mut stitched = GrowableBloom::new(FALSE_POSITIVES, FIRST_SIZED_FOR);
        let mut loaded = 0;
        starling_store::each_stitched_id(conn, |id| {
            loaded += 1;
            stitched.insert(id);
        })?;
        let held = Held {
            profile_of: HashMap::new(),
            ids_of: HashMap::new(),
            stitched,
            // Ids are linked in SQLite before the state with the positions it includes (see
            // `Worker::write_early`): their records may be in the log only, until the start's
            // replay (`Directory::settle`).
            stored_through: if loaded > 0 { Position::MAX } else { 0 },
        };
        Ok(Directory(Arc::new(Shared {
            held: RwLock::new(held),
            started: std::time::Instant::now(),
            database,
            lookups: Mutex::new(Vec::new()),
            pruning: Mutex::new(()),
        })))
    }

    /// Bounds the ids stitched by records not yet known at `through`, once the log was applied
    /// through it.
    pub(super) fn settle(&self, through: Position) {
        let mut held = self.0.held.write().expect("directory lock");
        if held.stored_through == Position::MAX {
            held.stored_through = through;
        }
    }

    /// The profile an id belongs to.
    pub(super) fn profile_of(&self, id: &str) -> Result<String, StoreError> {
        Ok(self.find(id)?.map_or_else(|| id.to_string(), |(profile, _)| profile))
    }

    /// A log position the records that stitched `id` to its profile are at or before; `None`
    /// for an id naming its own profile.
    pub(super) fn stitched_through(&self, id: &str) -> Result<Option<Position>, StoreError> {
        Ok(self.find(id)?.map(|(_, through)| through))
    }

    /// A log position the records that last pointed `id` are at or before: into its profile, or
    /// back at itself (split out, its profile deleted) lately; `None` for an id naming its own
    /// profile since longer than memory holds it. A node that has not followed those records
    /// may still point it elsewhere.
    pub(super) fn pointed_through(&self, id: &str) -> Result<Option<Position>, StoreError> {
        {
            let held = self.0.held.read().expect("directory lock");
            if let Some(pointed) = held.profile_of.get(id) {
                return Ok(Some(pointed.at));
            }
        }
        self.stitched_through(id)
    }

    /// Whether `id` may have been stitched into another profile at some time (the Bloom
    /// filter's answer: now and then yes for one never stitched).
    pub(super) fn maybe_stitched(&self, id: &str) -> bool {
        self.0.held.read().expect("directory lock").stitched.contains(id)
    }

    /// The ids held in memory as stitched into a profile: with those SQLite links to it, the
    /// ids stitched into it (its own id aside).
    pub(super) fn stitched_into(&self, profile: &str) -> Vec<String> {
        let held = self.0.held.read().expect("directory lock");
        held.ids_of.get(profile).map(|ids| ids.iter().map(|id| id.to_string()).collect()).unwrap_or_default()
    }

    /// Points `ids` at their profiles, pointed by records at or before `through`.
    pub(super) fn point(&self, ids: impl IntoIterator<Item = (String, String)>, through: Position) {
        let at_ms = self.now_ms();
        let mut held = self.0.held.write().expect("directory lock");
        let Held { profile_of, ids_of, stitched, .. } = &mut *held;
        for (id, profile) in ids {
            let held = match profile_of.remove_entry(id.as_str()) {
                Some((held, before)) => {
                    unlist(ids_of, &before.profile, &held);
                    held
                }
                None => Arc::from(id.as_str()),
            };
            if *held == *profile {
                // Split out or deleted: held if SQLite may still hold it stitched.
                if stitched.contains(&*held) {
                    profile_of.insert(held.clone(), Pointed { profile: held, at: through, at_ms });
                }
                continue;
            }
            stitched.insert(&*held);
            // The profile's text, held once: the key of its list.
            let profile = match ids_of.get_key_value(profile.as_str()) {
                Some((key, _)) => key.clone(),
                None => Arc::from(profile.as_str()),
            };
            let list = ids_of.entry(profile.clone()).or_default();
            list.reserve_exact(1);
            list.push(held.clone());
            profile_of.insert(held, Pointed { profile, at: through, at_ms });
        }
    }

    /// Forgets the ids pointed `held_for` ago or earlier that SQLite now links as memory does.
    /// Workers point ids here before they write them to SQLite, so SQLite never holds a link
    /// memory did not hold first, and a link that memory forgets is stitched at or before the
    /// latest position forgotten. SQLite is read without holding the lock: an id pointed again
    /// meanwhile (before SQLite changes) stays.
    pub(super) fn prune(&self, held_for: std::time::Duration) -> Result<(), StoreError> {
        let Ok(_pruning) = self.0.pruning.try_lock() else {
            return Ok(());
        };
        let now_ms = self.now_ms();
        let pointed: Vec<(Arc<str>, Arc<str>, Position)> = {
            let held = self.0.held.read().expect("directory lock");
            held.profile_of
                .iter()
                .filter(|(_, pointed)| pointed.at_ms + held_for.as_millis() as u64 <= now_ms)
                .map(|(id, pointed)| (id.clone(), pointed.profile.clone(), pointed.at))
                .collect()
        };
        if pointed.is_empty() {
            return Ok(());
        }
        let mut agreed = Vec::new();
        self.with_lookup(|conn| {
            for (id, profile, at) in pointed {
                if stored_profile(conn, &id)?.as_deref().unwrap_or(&id) == &*profile {
                    agreed.push((id, profile, at));
                }
            }
            Ok(())
        })?;
        let mut held = self.0.held.write().expect("directory lock");
        let Held { profile_of, ids_of, stored_through, .. } = &mut *held;
        for (id, profile, at) in agreed {
            if profile_of.get(&id).is_some_and(|now| now.profile == profile && now.at == at) {
                profile_of.remove(&id);
                unlist(ids_of, &profile, &id);
                if profile != id && *stored_through != Position::MAX {
                    *stored_through = (*stored_through).max(at);
                }
            }
        }
        Ok(())
    }

    /// The profile and position of a stitched id, from memory or else SQLite.
    fn find(&self, id: &str) -> Result<Option<(String, Position)>, StoreError> {
        let stored_through = {
            let held = self.0.held.read().expect("directory lock");
            if let Some(Pointed { profile, at, .. }) = held.profile_of.get(id) {
                return Ok((**profile != *id).then(|| (profile.to_string(), *at)));
            }
            if !held.stitched.contains(id) {
                return Ok(None);
            }
            held.stored_through
        };
        let profile = self.with_lookup(|conn| stored_profile(conn, id))?;
        Ok(profile.filter(|profile| profile != id).map(|profile| (profile, stored_through)))
    }

    fn now_ms(&self) -> u64 {
        self.0.started.elapsed().as_millis() as u64
    }

    fn with_lookup<T>(
        &self,
        lookup: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.0.lookups.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => starling_store::open_lookup(&self.0.database)?,
        };
        let result = lookup(&conn);
        let mut idle = self.0.lookups.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < IDLE_LOOKUPS {
            idle.push(conn);
        }
        result
    }
}

/// The profile SQLite links `id` to, if any.
fn stored_profile(conn: &rusqlite::Connection, id: &str) -> Result<Option<String>, StoreError> {
    starling_store::resolve_identity(conn, id)
}

/// Takes `id` off `profile`'s list of stitched ids.
fn unlist(ids_of: &mut HashMap<Arc<str>, Vec<Arc<str>>>, profile: &str, id: &Arc<str>) {
    if let Some(list) = ids_of.get_mut(profile) {
        list.retain(|other| other != id);
        if list.is_empty() {
            ids_of.remove(profile);
        } else {
            list.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(i, p)| (i.to_string(), p.to_string())).collect()
    }

    fn link(conn: &rusqlite::Connection, links: &[(&str, &str)]) {
        for (id, profile) in links {
            conn.execute("INSERT OR REPLACE INTO identities (visitor_id, profile_id) VALUES (?1, ?2)", [id, profile])
                .unwrap();
        }
    }

    fn held(directory: &Directory) -> (usize, usize) {
        let held = directory.0.held.read().unwrap();
        (held.profile_of.len(), held.ids_of.len())
    }

    /// The directory routes stitched ids to their profiles and back as they move, holding each
    /// id's text and each profile's once.
    #[test]
    fn the_directory_follows_ids_as_they_move_and_holds_each_text_once() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("starling.db");
        let directory = Directory::load(&starling_store::open(&database).unwrap(), database).unwrap();
        directory.point(pairs(&[("phone", "web"), ("email", "web")]), 7);
        assert_eq!(directory.profile_of("phone").unwrap(), "web");
        assert_eq!(directory.profile_of("web").unwrap(), "web", "an id not stitched names its own profile");
        assert_eq!(directory.stitched_through("email").unwrap(), Some(7));
        assert_eq!(directory.stitched_through("web").unwrap(), None);
        let mut into = directory.stitched_into("web");
        into.sort();
        assert_eq!(into, ["email", "phone"]);
        {
            let held = directory.0.held.read().unwrap();
            let (id, Pointed { profile, .. }) = held.profile_of.get_key_value("phone").unwrap();
            assert_eq!(Arc::strong_count(id), 2, "the id's text, in both maps");
            assert_eq!(Arc::strong_count(profile), 3, "the profile's text: its list's key and its two ids'");
        }
        // Merged on: both ids and the profile move; the profile's own id is stitched now.
        directory.point(pairs(&[("phone", "tablet"), ("email", "tablet"), ("web", "tablet")]), 9);
        assert!(directory.stitched_into("web").is_empty());
        assert_eq!(directory.stitched_into("tablet").len(), 3);
        assert_eq!(directory.profile_of("web").unwrap(), "tablet");
        // Split out: the id names its own profile again.
        directory.point(pairs(&[("phone", "phone")]), 11);
        assert_eq!(directory.profile_of("phone").unwrap(), "phone");
        assert_eq!(directory.stitched_through("phone").unwrap(), None);
        // A node that has not followed the split may still point it at "tablet": a read
        // forwarded from here waits for the split's records.
        assert_eq!(directory.pointed_through("phone").unwrap(), Some(11));
        assert_eq!(directory.pointed_through("email").unwrap(), Some(9));
        assert_eq!(directory.pointed_through("never-stitched").unwrap(), None);
        let mut into = directory.stitched_into("tablet");
        into.sort();
        assert_eq!(into, ["email", "web"]);
        assert_eq!(held(&directory), (3, 1), "two stitched ids and one split out");
    }

    /// At start the directory holds nothing in memory: it finds the stitched ids SQLite holds
    /// there, all of them (each passes the Bloom filter), and the position they were stitched
    /// at is unknown until the start's replay settles it.
    #[test]
    fn the_directory_finds_every_stitched_id_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("starling.db");
        let conn = starling_store::open(&database).unwrap();
        let stitched = 10_001;
        let tx = conn.unchecked_transaction().unwrap();
        for i in 0..stitched {
            let profile = format!("profile-{}", i / 2);
            tx.execute("INSERT INTO identities (visitor_id, profile_id) VALUES (?1, ?2)", [format!("id-{i}"), profile])
                .unwrap();
        }
        tx.execute("INSERT INTO identities (visitor_id, profile_id) VALUES ('own', 'own')", []).unwrap();
        tx.commit().unwrap();
        let directory = Directory::load(&conn, database).unwrap();
        assert_eq!(held(&directory), (0, 0));
        for i in 0..stitched {
            assert_eq!(directory.profile_of(&format!("id-{i}")).unwrap(), format!("profile-{}", i / 2));
        }
        assert_eq!(directory.profile_of("own").unwrap(), "own");
        assert_eq!(directory.profile_of("unknown").unwrap(), "unknown");
        assert_eq!(directory.stitched_through("own").unwrap(), None);
        assert_eq!(
            directory.stitched_through("id-0").unwrap(),
            Some(Position::MAX),
            "until the start's replay settles it"
        );
        directory.settle(41);
        assert_eq!(directory.stitched_through("id-0").unwrap(), Some(41));
        directory.settle(50);
        assert_eq!(directory.stitched_through("id-0").unwrap(), Some(41), "settled once");
    }

    /// Memory forgets an id once SQLite links it as memory does, and not before: until then
    /// memory's answer stands, even where SQLite holds the id elsewhere.
    #[test]
    fn memory_forgets_what_sqlite_agrees_with_and_answers_over_it_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("starling.db");
        let conn = starling_store::open(&database).unwrap();
        link(&conn, &[("phone", "web"), ("web", "web"), ("email", "web")]);
        let directory = Directory::load(&conn, database).unwrap();
        directory.settle(5);
        // Moved on and split out in memory; SQLite still links both to "web".
        directory.point(pairs(&[("phone", "tablet"), ("email", "email")]), 9);
        link(&conn, &[("email", "email")]);
        directory.prune(HELD_FOR).unwrap();
        assert_eq!(held(&directory), (2, 1), "pointed too lately to be forgotten");
        link(&conn, &[("email", "web")]);
        directory.prune(std::time::Duration::ZERO).unwrap();
        assert_eq!(held(&directory), (2, 1));
        assert_eq!(directory.profile_of("phone").unwrap(), "tablet");
        assert_eq!(directory.profile_of("email").unwrap(), "email");
        assert_eq!(directory.stitched_through("email").unwrap(), None);
        // SQLite agrees on one.
        link(&conn, &[("phone", "tablet")]);
        directory.prune(std::time::Duration::ZERO).unwrap();
        assert_eq!(held(&directory), (1, 0));
        assert_eq!(directory.profile_of("phone").unwrap(), "tablet", "from SQLite now");
        assert_eq!(directory.stitched_through("phone").unwrap(), Some(9), "at or before the latest position forgotten");
        // And on the other: no longer linked elsewhere.
        conn.execute("DELETE FROM identities WHERE visitor_id = 'email'", []).unwrap();
        directory.prune(std::time::Duration::ZERO).unwrap();
        assert_eq!(held(&directory), (0, 0));
        assert_eq!(directory.profile_of("email").unwrap(), "email");
        // Pointed again since SQLite agreed: held.
        directory.point(pairs(&[("web", "tablet")]), 12);
        link(&conn, &[("web", "tablet")]);
        directory.point(pairs(&[("web", "phone")]), 13);
        directory.prune(std::time::Duration::ZERO).unwrap();
        assert_eq!(directory.profile_of("web").unwrap(), "phone");
        // An id never stitched, linked to itself: nothing to hold.
        directory.point(pairs(&[("new", "new")]), 14);
        assert_eq!(held(&directory), (1, 1));
    }
}
