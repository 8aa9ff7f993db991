//! The bounds tetherd keeps against a hostile or broken guest (the
//! `tetherd serve` flags in docs/API.md), the refusals they cause (counted
//! for `/metrics`), and the deadline on every request to a guest.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Args;
use futures_lite::future;

use proto_core::tether::ContainerInfo;

use crate::api_types::ApiError;
use crate::claims;
use crate::http::query::parse_duration;

/// The longest wait a client may ask for (`timeout=` and friends); longer is
/// clamped to it.
pub const MAX_CLIENT_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Bounds on what guests may make tetherd hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Guest links at once (syncing or connected); more are closed at accept.
    pub max_links: usize,
    /// A serial-bridge link must finish link sync within this time.
    pub link_sync_timeout: Duration,
    /// Containers one link may list; the rest of a longer list is ignored.
    pub max_containers_per_link: usize,
    /// Exited containers remembered after their link has gone (oldest forgotten first).
    pub max_remembered: usize,
    /// A request to a guest (open, signal, start, list) fails with 503 after this.
    pub guest_request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_links: 16_384,
            link_sync_timeout: Duration::from_secs(30),
            max_containers_per_link: 4096,
            max_remembered: 10_000,
            guest_request_timeout: Duration::from_secs(30),
        }
    }
}

fn duration_arg(v: &str) -> Result<Duration, String> {
    parse_duration(v).ok_or_else(|| format!("{v:?} is not a duration (e.g. 30s, 1m, 500ms)"))
}

/// The `tetherd serve` flags for [`Limits`].
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Guest links at once (syncing or connected); more are closed at accept.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_links: u32,
    /// A serial-bridge guest link must finish link sync within this time.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub link_sync_timeout: Duration,
    /// Containers one guest link may list; the rest of a longer list is ignored.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_containers_per_link: u32,
    /// Exited containers remembered after their link has gone (oldest forgotten first).
    #[arg(long, default_value_t = 10_000)]
    pub max_remembered: u32,
    /// A request to a guest (attach, exec, signal, start, logs) fails with 503 after this.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub guest_request_timeout: Duration,
}

impl LimitArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_links: self.max_links as usize,
            link_sync_timeout: self.link_sync_timeout,
            max_containers_per_link: self.max_containers_per_link as usize,
            max_remembered: self.max_remembered as usize,
            guest_request_timeout: self.guest_request_timeout,
        }
    }
}

/// What the limits refused, for `/metrics`.
#[derive(Default)]
pub struct Refusals {
    /// Links closed at accept because `max_links` were open.
    pub links: AtomicU64,
    /// Links that did not finish link sync in time.
    pub link_syncs: AtomicU64,
    /// Container list entries ignored (beyond the cap, or a malformed id).
    pub containers: AtomicU64,
    /// Exited containers forgotten to stay within `max_remembered`.
    pub remembered: AtomicU64,
    /// Requests to a guest that got no answer in time.
    pub guest_requests: AtomicU64,
    /// Channels closed because their output came in more pieces than a user
    /// could be owed.
    pub output_floods: AtomicU64,
}

impl Refusals {
    /// Counts one refusal.
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Guest links open now, syncing or connected.
#[derive(Default)]
pub struct LinkSlots {
    open: AtomicUsize,
}

/// One admitted link; dropping it frees the slot.
pub struct LinkSlot(Arc<LinkSlots>);

impl LinkSlots {
    /// A slot, unless `max` links are open already.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<LinkSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LinkSlot(self.clone()))
    }

    /// Links admitted and not yet gone.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises this process's open-file limit (RLIMIT_NOFILE) from its soft value
/// to its hard one: every guest link is a socket and every container with
/// output holds its log open, so 10,000 guests need far more than the usual
/// soft limit of 1024. Returns the limits before and after.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, soft.max(hard)))
}

/// Waits for a guest's answer for at most `limit`; a guest that does not
/// answer in time is a 503 naming `what`.
pub async fn guest_answer<T>(
    limit: Duration,
    refusals: &Refusals,
    what: &str,
    answer: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let timeout = async {
        smol::Timer::after(limit).await;
        Refusals::count(&refusals.guest_requests, 1);
        Err(ApiError::Unavailable(format!(
            "the guest did not answer {what} within {limit:?}"
        )))
    };
    future::or(answer, timeout).await
}

/// A guest's container list without entries whose id is not a valid id
/// ([`claims::valid_id`]),
/// cut to `cap` entries; with how many were invalid and how many over the cap.
pub fn screen(mut list: Vec<ContainerInfo>, cap: usize) -> (Vec<ContainerInfo>, usize, usize) {
    let total = list.len();
    list.retain(|c| claims::valid_id(&c.id));
    let invalid = total - list.len();
    let over = list.len().saturating_sub(cap);
    list.truncate(cap);
    (list, invalid, over)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto_core::tether::{Kind, State};

    #[test]
    fn lists_lose_invalid_ids_and_what_is_over_the_cap() {
        let c = |id: &str| ContainerInfo {
            id: id.into(),
            kind: Kind::Exec,
            state: State::Running,
            exit_status: 0,
            output_end: 0,
            tty: false,
        };
        let list = vec![c("a"), c("b\u{1b}[2J"), c("c"), c(""), c("d")];
        let (kept, invalid, over) = screen(list, 2);
        let ids: Vec<&str> = kept.iter().map(|c| c.id.as_str()).collect();
        assert_eq!((ids, invalid, over), (vec!["a", "c"], 2, 1));
    }

    #[test]
    fn slots_admit_up_to_the_limit_and_free_on_drop() {
        let slots = Arc::new(LinkSlots::default());
        let a = slots.admit(2).unwrap();
        let _b = slots.admit(2).unwrap();
        assert!(slots.admit(2).is_none());
        drop(a);
        assert_eq!(slots.open(), 1);
        assert!(slots.admit(2).is_some());
    }

    #[test]
    fn an_unanswered_guest_request_is_a_503_after_the_limit() {
        let refusals = Refusals::default();
        let got = smol::block_on(guest_answer(
            Duration::from_millis(20),
            &refusals,
            "the test",
            future::pending::<Result<(), ApiError>>(),
        ));
        let e = got.unwrap_err();
        assert_eq!((e.status(), e.reason()), (503, "ServiceUnavailable"));
        assert_eq!(refusals.guest_requests.load(Ordering::Relaxed), 1);
    }
}
