//! The quiesce, resume and recovery plans of docs/PROTOCOL.md 4.5 as ordered
//! steps over [`Effects`]. The plans decide the order and what a failure
//! stops; the effects do the work (system calls in the guest, a recorder in
//! the tests).

use std::fmt;

use crate::identity::{Addressing, Identity, Role};

/// A step that failed: which, and why. Shown as `step: reason`, the
/// `failure` field of `forked@tether`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: &'static str,
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.reason)
    }
}

impl std::error::Error for Failure {}

/// What a child's recovery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The first step that failed; `None` if all succeeded.
    pub failure: Option<Failure>,
}

impl Recovery {
    /// The `failure` field of `forked@tether`: empty on success.
    pub fn failure_text(&self) -> String {
        self.failure
            .as_ref()
            .map(Failure::to_string)
            .unwrap_or_default()
    }
}

/// What the plans act on. Each step returns `Err(reason)` when it failed.
/// Steps are async because some wait (a signal's grace, draining output to
/// the links, DHCP, the RTC's next second) while the guest keeps serving.
#[allow(async_fn_in_trait)] // implemented and awaited on one thread only
pub trait Effects {
    /// A step of a plan begins (for logging each step's duration).
    fn begin(&mut self, _step: &'static str) {}

    /// Refuses (or again accepts) new sessions and attachments to stopped ones.
    async fn refuse_sessions(&mut self, refuse: bool);
    /// Sends each running session that configured a `fork_signal` that signal
    /// and gives it its `fork_grace` (beforeCheckpoint).
    async fn before_checkpoint(&mut self) -> Result<(), String>;
    /// Stops every session's process group (SIGSTOP).
    async fn stop_sessions(&mut self) -> Result<(), String>;
    /// Sends what the sessions wrote on the channels that follow them.
    async fn drain(&mut self) -> Result<(), String>;
    /// Syncs filesystems.
    async fn sync_fs(&mut self) -> Result<(), String>;
    /// Continues every stopped session (SIGCONT), then sends `fork_signal`
    /// again (afterRestore).
    async fn continue_sessions(&mut self) -> Result<(), String>;

    /// Mixes `nonce` into the kernel's pool (`RNDADDENTROPY`) and reseeds
    /// (`RNDRESEEDCRNG`); without a nonce, only reseeds.
    async fn reseed(&mut self, nonce: Option<&[u8; 32]>) -> Result<(), String>;
    /// Steps the wall clock from the hypervisor's clock.
    async fn step_clock(&mut self) -> Result<(), String>;
    /// Gives network interface `nic` (configuration order) its MAC address.
    async fn set_mac(&mut self, nic: usize, mac: [u8; 6]) -> Result<(), String>;
    /// Forgets the neighbours learnt on `nic`.
    async fn flush_neighbours(&mut self, nic: usize) -> Result<(), String>;
    /// Re-addresses `nic`: static, or DHCP.
    async fn address(&mut self, nic: usize, how: &Addressing) -> Result<(), String>;
    /// Gratuitous ARP and unsolicited IPv6 neighbour advertisement for `nic`'s
    /// addresses.
    async fn announce(&mut self, nic: usize) -> Result<(), String>;
    /// Sets the host name.
    async fn set_hostname(&mut self, name: &str) -> Result<(), String>;
    /// Renames the sessions: the primary to `id`, every other `X` to `X-n`.
    async fn rename_sessions(&mut self, id: &str, child: u32) -> Result<(), String>;
    /// Abandons the current link: input flushed, ANNOUNCE, a fresh sync.
    async fn reset_link(&mut self) -> Result<(), String>;
}

fn at(step: &'static str) -> impl FnOnce(String) -> Failure {
    move |reason| Failure { step, reason }
}

/// Quiesces for a fork, in the order of 4.5: refuse new sessions, the
/// sessions' `fork_signal`, SIGSTOP, drain, sync. On a failure nothing stays
/// stopped: sessions continue and new sessions are accepted again.
pub async fn quiesce(e: &mut impl Effects) -> Result<(), Failure> {
    e.begin("refuse");
    e.refuse_sessions(true).await;
    let result = quiesce_steps(e).await;
    if result.is_err() {
        // Undo: SIGCONT is harmless to what was not stopped, and a session that
        // got its beforeCheckpoint signal gets its afterRestore.
        e.begin("undo");
        let _ = e.continue_sessions().await;
        e.refuse_sessions(false).await;
    }
    result
}

async fn quiesce_steps(e: &mut impl Effects) -> Result<(), Failure> {
    e.begin("fork_signal");
    e.before_checkpoint().await.map_err(at("fork_signal"))?;
    e.begin("stop");
    e.stop_sessions().await.map_err(at("stop"))?;
    e.begin("drain");
    e.drain().await.map_err(at("drain"))?;
    e.begin("sync");
    e.sync_fs().await.map_err(at("sync"))
}

/// Resumes the parent (or a guest whose quiesce timed out): the clock is
/// stepped (the VM was paused while it was saved), sessions continue, new
/// sessions are accepted. A clock that cannot be stepped does not keep the
/// sessions stopped; its failure is returned after they continued.
pub async fn resume(e: &mut impl Effects) -> Result<(), Failure> {
    e.begin("clock");
    let clock = e.step_clock().await.map_err(at("clock"));
    e.begin("continue");
    let result = e.continue_sessions().await.map_err(at("continue"));
    e.refuse_sessions(false).await;
    result.and(clock)
}

/// A child's recovery, in the order of 4.5: randomness, then the link (it
/// reconnects while the rest recovers: its sync and key exchange are the
/// slowest part, and they need the fresh randomness), clock, network, names.
/// It stops at the first step that fails, except that the link is reset
/// whatever happened before it (the child must report), and the sessions
/// continue only if everything succeeded: nothing runs half-configured.
pub async fn recover(e: &mut impl Effects, identity: &Identity) -> Recovery {
    e.begin("randomness");
    let randomness = e
        .reseed(identity.nonce.as_ref())
        .await
        .map_err(at("randomness"));
    e.begin("link");
    let link = e.reset_link().await.map_err(at("link"));
    let mut failure = randomness.and(link).err();
    if failure.is_none() {
        failure = recover_steps(e, identity).await.err();
    }
    if failure.is_none() {
        e.begin("continue");
        if let Err(why) = e.continue_sessions().await {
            failure = Some(at("continue")(why));
        }
    }
    if failure.is_none() {
        e.refuse_sessions(false).await;
    }
    Recovery { failure }
}

async fn recover_steps(e: &mut impl Effects, identity: &Identity) -> Result<(), Failure> {
    e.begin("clock");
    e.step_clock().await.map_err(at("clock"))?;
    e.begin("network");
    for (i, nic) in identity.nics.iter().enumerate() {
        let ctx = |what: &'static str| {
            move |why: String| at("network")(format!("nics[{i}] {what}: {why}"))
        };
        e.set_mac(i, nic.mac).await.map_err(ctx("mac"))?;
        e.flush_neighbours(i).await.map_err(ctx("neighbours"))?;
        e.address(i, &nic.addressing)
            .await
            .map_err(ctx("address"))?;
        e.announce(i).await.map_err(ctx("announce"))?;
    }
    e.begin("names");
    if let Some(h) = &identity.hostname {
        e.set_hostname(h).await.map_err(at("names"))?;
    }
    if let (Some(id), Role::Child { n, .. }) = (&identity.id, &identity.role) {
        e.rename_sessions(id, *n).await.map_err(at("names"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Nic;
    use futures_lite::future::block_on;

    /// Records each effect; fails the one named in `fail`.
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        fail: Option<&'static str>,
    }

    impl Recorder {
        fn failing(step: &'static str) -> Self {
            Self {
                fail: Some(step),
                ..Self::default()
            }
        }

        fn did(&mut self, what: String) -> Result<(), String> {
            let failed = self.fail.is_some_and(|f| what.starts_with(f));
            self.log.push(what);
            if failed {
                Err("injected".into())
            } else {
                Ok(())
            }
        }
    }

    impl Effects for Recorder {
        async fn refuse_sessions(&mut self, refuse: bool) {
            self.log.push(format!("refuse {refuse}"));
        }
        async fn before_checkpoint(&mut self) -> Result<(), String> {
            self.did("before_checkpoint".into())
        }
        async fn stop_sessions(&mut self) -> Result<(), String> {
            self.did("stop".into())
        }
        async fn drain(&mut self) -> Result<(), String> {
            self.did("drain".into())
        }
        async fn sync_fs(&mut self) -> Result<(), String> {
            self.did("sync".into())
        }
        async fn continue_sessions(&mut self) -> Result<(), String> {
            self.did("continue".into())
        }
        async fn reseed(&mut self, nonce: Option<&[u8; 32]>) -> Result<(), String> {
            self.did(format!("reseed {:?}", nonce.map(|n| n[0])))
        }
        async fn step_clock(&mut self) -> Result<(), String> {
            self.did("clock".into())
        }
        async fn set_mac(&mut self, nic: usize, mac: [u8; 6]) -> Result<(), String> {
            self.did(format!("mac {nic} {:02x}", mac[5]))
        }
        async fn flush_neighbours(&mut self, nic: usize) -> Result<(), String> {
            self.did(format!("neigh {nic}"))
        }
        async fn address(&mut self, nic: usize, how: &Addressing) -> Result<(), String> {
            let how = match how {
                Addressing::Dhcp => "dhcp".to_string(),
                Addressing::Static { address, .. } => address.to_string(),
            };
            self.did(format!("address {nic} {how}"))
        }
        async fn announce(&mut self, nic: usize) -> Result<(), String> {
            self.did(format!("announce {nic}"))
        }
        async fn set_hostname(&mut self, name: &str) -> Result<(), String> {
            self.did(format!("hostname {name}"))
        }
        async fn rename_sessions(&mut self, id: &str, child: u32) -> Result<(), String> {
            self.did(format!("rename {id} {child}"))
        }
        async fn reset_link(&mut self) -> Result<(), String> {
            self.did("link".into())
        }
    }

    fn child() -> Identity {
        Identity {
            generation: 8,
            role: Role::Child {
                parent: "web".into(),
                n: 2,
            },
            id: Some("web-2".into()),
            hostname: Some("web-2".into()),
            nonce: Some([9; 32]),
            nics: vec![
                Nic {
                    mac: [0x52, 0x54, 0, 0, 0, 0x57],
                    addressing: Addressing::Static {
                        address: "10.0.2.16".parse().unwrap(),
                        prefix: 24,
                        gateway: None,
                    },
                },
                Nic {
                    mac: [0x52, 0x54, 0, 0, 1, 0x58],
                    addressing: Addressing::Dhcp,
                },
            ],
        }
    }

    const RECOVERY: [&str; 15] = [
        "reseed Some(9)",
        "link",
        "clock",
        "mac 0 57",
        "neigh 0",
        "address 0 10.0.2.16",
        "announce 0",
        "mac 1 58",
        "neigh 1",
        "address 1 dhcp",
        "announce 1",
        "hostname web-2",
        "rename web-2 2",
        "continue",
        "refuse false",
    ];

    #[test]
    fn quiesce_runs_in_order() {
        let mut r = Recorder::default();
        block_on(quiesce(&mut r)).unwrap();
        assert_eq!(
            r.log,
            ["refuse true", "before_checkpoint", "stop", "drain", "sync"]
        );
    }

    #[test]
    fn a_failed_quiesce_resumes_what_it_stopped() {
        let mut r = Recorder::failing("drain");
        let e = block_on(quiesce(&mut r)).unwrap_err();
        assert_eq!(e.to_string(), "drain: injected");
        assert_eq!(
            r.log,
            [
                "refuse true",
                "before_checkpoint",
                "stop",
                "drain",
                "continue",
                "refuse false"
            ]
        );
        // A failure before anything stopped still gives back the sessions.
        let mut r = Recorder::failing("before_checkpoint");
        let e = block_on(quiesce(&mut r)).unwrap_err();
        assert_eq!(e.step, "fork_signal");
        assert!(!r.log.contains(&"stop".to_string()));
        assert_eq!(r.log.last().unwrap(), "refuse false");
    }

    #[test]
    fn resume_steps_the_clock_continues_and_accepts_sessions() {
        let mut r = Recorder::default();
        block_on(resume(&mut r)).unwrap();
        assert_eq!(r.log, ["clock", "continue", "refuse false"]);
        // A clock that cannot be stepped keeps nothing stopped.
        let mut r = Recorder::failing("clock");
        let e = block_on(resume(&mut r)).unwrap_err();
        assert_eq!(e.to_string(), "clock: injected");
        assert_eq!(r.log, ["clock", "continue", "refuse false"]);
    }

    #[test]
    fn recovery_runs_in_the_order_of_protocol_md() {
        let mut r = Recorder::default();
        let rec = block_on(recover(&mut r, &child()));
        assert_eq!(rec.failure, None);
        assert_eq!(rec.failure_text(), "");
        assert_eq!(r.log, RECOVERY);
    }

    /// Whichever step fails, the later ones do not run, the link is reset
    /// anyway (the child must report) and the sessions stay stopped.
    #[test]
    fn a_failing_recovery_step_stops_the_plan_and_leaves_sessions_stopped() {
        let cases = [
            ("reseed", "randomness: injected"),
            ("clock", "clock: injected"),
            ("mac 1", "network: nics[1] mac: injected"),
            ("neigh 0", "network: nics[0] neighbours: injected"),
            ("address 1", "network: nics[1] address: injected"),
            ("announce 0", "network: nics[0] announce: injected"),
            ("hostname", "names: injected"),
            ("rename", "names: injected"),
        ];
        for (step, failure) in cases {
            let mut r = Recorder::failing(step);
            let rec = block_on(recover(&mut r, &child()));
            assert_eq!(rec.failure_text(), failure, "{step}");
            let at = RECOVERY.iter().position(|s| s.starts_with(step)).unwrap();
            let mut expected: Vec<&str> = RECOVERY[..=at].to_vec();
            if !expected.contains(&"link") {
                expected.push("link");
            }
            assert_eq!(r.log, expected, "{step}");
        }
    }

    #[test]
    fn a_failed_link_reset_is_the_failure_and_sessions_stay_stopped() {
        let mut r = Recorder::failing("link");
        let rec = block_on(recover(&mut r, &child()));
        assert_eq!(rec.failure_text(), "link: injected");
        assert_eq!(r.log, ["reseed Some(9)", "link"]);
    }
}
