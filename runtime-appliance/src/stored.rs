//! The appliance with a state directory: container records loaded at start,
//! the follower started, and `logs`, `attach` and `rm` served from what is
//! stored (see `store`, `follower`, `logs`).

use std::path::Path;
use std::sync::Arc;

use crate::api_types::{ApiError, AttachOptions, From, LogsOptions};
use crate::appliance::{Appliance, Attachment};
use crate::store::{Limits, Store, lock};
use crate::{follower, logs};

impl Appliance {
    /// Keeps container records and output under `dir` (`DIR/ID/`): loads the
    /// records a previous tetherd left (so `ls` lists those containers) and
    /// follows every container a guest lists from now on.
    pub fn with_store(mut self, dir: &Path, limits: Limits) -> Result<Self, String> {
        let store = Arc::new(Store::open(dir, limits)?);
        for record in store.records() {
            self.shared.remember(follower::info_of(&record));
        }
        follower::spawn(self.shared.clone(), store.clone());
        self.store = Some(store);
        Ok(self)
    }

    /// The store, when it has anything for `id`.
    fn stored(&self, id: &str) -> Option<&Arc<Store>> {
        self.store.as_ref().filter(|s| s.record(id).is_some())
    }

    /// Whether a live guest link serves `id`.
    fn served(&self, id: &str) -> bool {
        self.shared.info(id).is_some_and(|(_, link)| link.is_some())
    }

    /// `logs` from the store, if it has `id`.
    pub(crate) fn logs_stored(
        &self,
        id: &str,
        options: &LogsOptions,
    ) -> Option<Result<Attachment, ApiError>> {
        let store = self.stored(id)?;
        Some(logs::from_store(store, id, options.clone()))
    }

    /// An attach that replays from the store what is stored past `from`, then
    /// goes on with the guest (or, with the guest gone, with the store until
    /// the exit). `None`: the guest alone serves it.
    pub(crate) async fn attach_stored(
        &self,
        id: &str,
        options: &AttachOptions,
    ) -> Option<Result<Attachment, ApiError>> {
        let store = self.stored(id)?;
        let From::Offset(from) = options.from else {
            return None;
        };
        if !self.served(id) {
            let logs = LogsOptions {
                from,
                follow: true,
                ..Default::default()
            };
            return Some(logs::from_store(store, id, logs));
        }
        let (start, end) = match store.log(id) {
            Ok(log) => {
                let log = lock(&log);
                (from.max(log.start()), log.end())
            }
            Err(e) => return Some(Err(ApiError::Internal(e.to_string()))),
        };
        if start >= end {
            return None;
        }
        let prefix = match logs::replay(store, id, start, end) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let rest = AttachOptions {
            from: From::Offset(end),
            ..options.clone()
        };
        Some(
            self.attach_guest(id, rest)
                .await
                .map(|att| att.after_replay(start, end, prefix)),
        )
    }

    /// Removes what is stored for `id` (an exited container, or one whose
    /// guest is gone); false if nothing was stored.
    pub(crate) fn remove_stored(&self, id: &str) -> Result<bool, ApiError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        if self.shared.info(id).is_some_and(|(info, link)| {
            link.is_some() && info.state != proto_core::tether::State::Exited
        }) {
            return Err(ApiError::Refused(format!("{id} is running: stop it first")));
        }
        store
            .remove(id)
            .map_err(|e| ApiError::Internal(format!("removing the files of {id}: {e}")))
    }
}
