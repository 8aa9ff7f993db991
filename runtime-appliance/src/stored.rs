//! The appliance with a state directory: container records loaded at start,
//! the follower started, and `logs`, `attach` and `rm` served from what is
//! stored (see `store`, `follower`, `logs`).

use std::path::Path;
use std::sync::Arc;

use async_channel::Sender;

use crate::api_types::{ApiError, AttachOptions, From, LogsOptions};
use crate::appliance::{Appliance, Attachment};
use crate::guestlink::{LinkChannel, LinkCommand};
use crate::store::{Limits, Store, lock};
use crate::{follower, logs};

impl Appliance {
    /// Keeps container records and output under `dir` (`DIR/ID/`): loads the
    /// records a previous tetherd left (so `ls` lists those containers) and
    /// follows every container a guest lists from now on.
    pub fn with_store(mut self, dir: &Path, limits: Limits) -> Result<Self, String> {
        let store = Arc::new(Store::open(dir, limits)?);
        for record in store.records() {
            if let Some(parent) = &record.forked_from {
                let note = crate::forks::ForkNote {
                    forked_from: parent.clone(),
                    failure: record.fork_failure.clone(),
                };
                self.shared.forks.restore(&record.id, note);
            }
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

    /// The store, once it has a record for `id`: waits up to `timeout` for a
    /// guest to list it, and writes its record if the follower has not yet.
    /// `None` without a store.
    async fn stored_after(
        &self,
        id: &str,
        timeout: std::time::Duration,
    ) -> Option<Result<&Arc<Store>, ApiError>> {
        let store = self.store.as_ref()?;
        if store.record(id).is_none() {
            if let Err(e) = self.shared.wait_for(id, timeout).await {
                return Some(Err(e));
            }
            if let Some((info, generation)) = self.shared.info(id) {
                let view = crate::api_types::ContainerView::new(&info, generation);
                if let Err(e) = follower::save_new_record(store, &view) {
                    return Some(Err(ApiError::Internal(format!("the record of {id}: {e}"))));
                }
            }
        }
        Some(Ok(store))
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
        Some(logs::from_store(&self.shared, store, id, options.clone()))
    }

    /// An attach served from the store: its output is the stored output
    /// from `from` (or from the stored end, for `live`), followed as the
    /// follower appends to it, ending with the stored exit; its input (stdin,
    /// resize, signals) goes to the guest over a channel that carries no
    /// output. So the follower is the guest's only output reader, and a
    /// `block` session waits for the disk, never for a client. `None`
    /// without a store: the guest alone serves it then.
    pub(crate) async fn attach_stored(
        &self,
        id: &str,
        options: &AttachOptions,
    ) -> Option<Result<Attachment, ApiError>> {
        let store = match self.stored_after(id, options.timeout).await? {
            Ok(store) => store,
            Err(e) => return Some(Err(e)),
        };
        let from = match options.from {
            From::Offset(n) => n,
            From::Live => match store.log(id) {
                Ok(log) => lock(&log).end(),
                Err(e) => return Some(Err(ApiError::Internal(e.to_string()))),
            },
        };
        let logs = LogsOptions {
            from,
            follow: true,
            ..Default::default()
        };
        let output = match logs::from_store(&self.shared, store, id, logs) {
            Ok(att) => att,
            Err(e) => return Some(Err(e)),
        };
        if !(options.stdin && self.served(id)) {
            return Some(Ok(output));
        }
        let input = AttachOptions {
            stdout: false,
            stderr: false,
            from: From::Live,
            ..options.clone()
        };
        Some(
            self.attach_guest(id, input)
                .await
                .map(|control| control.with_output_of(output)),
        )
    }

    /// An exec served through the store: the follower takes the exec's own
    /// channel and stores its output from the first byte, the client reads
    /// it from the store, as an attach does, and its input goes over that
    /// channel. So the output crosses the link once (a second attach channel
    /// only for the store would carry it twice), and the exec waits for the
    /// disk, never for a client. The channel comes back unused when the
    /// store cannot take it: there is none, or it already has output or a
    /// follower for `id` (an id a guest used before).
    pub(crate) fn exec_stored(
        &self,
        id: &str,
        tty: bool,
        reattach_timeout: std::time::Duration,
        channel: LinkChannel,
        link: Sender<LinkCommand>,
    ) -> Result<Attachment, (LinkChannel, Sender<LinkCommand>)> {
        let Some(store) = &self.store else {
            return Err((channel, link));
        };
        if store.record(id).is_some() || !store.start_following(id) {
            return Err((channel, link));
        }
        let logs = LogsOptions {
            from: 0,
            follow: true,
            ..Default::default()
        };
        let fresh = store.log(id).is_ok_and(|log| lock(&log).end() == 0);
        let output = fresh.then(|| logs::serve(&self.shared, store, id, tty, logs));
        let Some(Ok(output)) = output else {
            if let Some(Err(e)) = output {
                tracing::warn!(container = %id, "serving the exec from the store: {e}");
            }
            store.stop_following(id);
            return Err((channel, link));
        };
        let (ctl, control) = async_channel::unbounded();
        let exec = follower::ExecChannel {
            channel,
            link,
            control,
            tty,
            reattach_timeout,
        };
        follower::spawn_follow(
            self.shared.clone(),
            store.clone(),
            id.to_owned(),
            Some(exec),
        );
        Ok(Attachment::with_control(output, ctl))
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

impl Appliance {
    /// A fork's child whose recovery failed: listed (as `created`: its
    /// processes stay stopped) with the failure, and recorded, even while its
    /// guest does not list it under its own id (it may have failed before
    /// renaming its sessions).
    pub(crate) fn failed_child(&self, id: &str, forked: &proto_core::tether::Forked) {
        if self.shared.info(id).is_none() {
            self.shared.remember(proto_core::tether::ContainerInfo {
                id: id.to_owned(),
                kind: proto_core::tether::Kind::Primary,
                state: proto_core::tether::State::Created,
                exit_status: 0,
                output_end: 0,
                tty: false,
            });
        }
        let Some(store) = &self.store else { return };
        if store.record(id).is_some() {
            return;
        }
        let record = crate::store::Record {
            forked_from: Some(forked.parent_id.clone()),
            fork_failure: Some(forked.failure.clone()),
            ..crate::store::Record::new(id, "primary", "created")
        };
        if let Err(e) = store.save_record(&record) {
            tracing::warn!(container = %id, "writing its record: {e}");
        }
    }
}
