//! Connection configuration: roles, keys, algorithm preferences, limits and timers.

use std::sync::Arc;
use std::time::Duration;

use crate::crypto::{AwsLcProvider, CryptoProvider};
use crate::kex::Preferences;
use crate::keys::{PrivateKey, PublicKey};

/// Which server host keys a client trusts.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// Only these keys (tetherd pins each guest's key; it generated the guest's config).
    Pinned(Vec<PublicKey>),
    /// Any key (development only; the key is still reported by `Connection::host_key`).
    AcceptAny,
}

impl HostKeyPolicy {
    /// Whether `key` is trusted.
    pub fn allows(&self, key: &PublicKey) -> bool {
        match self {
            Self::Pinned(keys) => keys.contains(key),
            Self::AcceptAny => true,
        }
    }
}

/// The client role.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The user name sent in authentication (tether gives it no authority).
    pub user: String,
    /// The key to authenticate with; `None` tries the `none` method only.
    pub key: Option<PrivateKey>,
    /// Which host keys to trust.
    pub host_keys: HostKeyPolicy,
}

/// The server role.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The host key.
    pub host_key: PrivateKey,
    /// Client keys that may authenticate.
    pub authorized_keys: Vec<PublicKey>,
    /// Accept the `none` method (development only).
    pub allow_none: bool,
    /// Failed authentication attempts before the server disconnects.
    pub max_auth_attempts: u32,
}

/// The role this side plays.
#[derive(Debug, Clone)]
pub enum Role {
    /// SSH client (tetherd).
    Client(ClientConfig),
    /// SSH server (tether).
    Server(ServerConfig),
}

/// Everything a connection needs besides time and randomness.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client or server, with the role's keys.
    pub role: Role,
    /// Our version line, without CR LF.
    pub version: String,
    /// Algorithms offered, in order of preference.
    pub preferences: Preferences,
    /// Rekey after this many bytes in either direction.
    pub rekey_bytes: u64,
    /// Rekey after this much time.
    pub rekey_interval: Duration,
    /// Send `keepalive@openssh.com` after this much silence from the peer.
    pub keepalive_interval: Option<Duration>,
    /// Unanswered keepalives tolerated before the connection is declared dead.
    pub keepalive_max: u32,
    /// The peer must finish key exchange and authentication within this time.
    pub handshake_timeout: Duration,
    /// A key re-exchange must finish within this time of its KEXINIT.
    pub kex_timeout: Duration,
    /// Refuse a peer that does not offer strict key exchange
    /// (`kex-strict-*-v00@openssh.com`); on in the tether profile.
    pub require_strict_kex: bool,
    /// Initial receive window of each channel (refilled when half is consumed).
    pub window: u32,
    /// Largest data payload per packet we accept on a channel.
    pub max_packet: u32,
    /// Open channels allowed at once.
    pub max_channels: usize,
    /// Ciphertext and queued payload this side buffers before `channel_send`
    /// accepts less (back-pressure toward the application).
    pub send_buffer: usize,
    /// Channel types the peer may open (delivered as `Event::ChannelOpen`).
    pub channel_types: Vec<String>,
    /// Global requests delivered to the application as `Event::GlobalRequest`;
    /// any other name is refused by the core.
    pub global_requests: Vec<String>,
    /// Channel request names besides the RFC 4254 ones delivered to the application.
    pub channel_requests: Vec<String>,
    /// The crypto provider.
    pub provider: Arc<dyn CryptoProvider>,
}

impl Config {
    fn with_role(role: Role, version: String, channel_types: Vec<String>) -> Self {
        Self {
            role,
            version,
            preferences: Preferences::default(),
            rekey_bytes: 1 << 30,
            rekey_interval: Duration::from_secs(3600),
            keepalive_interval: None,
            keepalive_max: 3,
            handshake_timeout: Duration::from_secs(120),
            kex_timeout: Duration::from_secs(60),
            require_strict_kex: false,
            window: 2 * 1024 * 1024,
            max_packet: 32 * 1024,
            max_channels: 1024,
            send_buffer: 1024 * 1024,
            channel_types,
            global_requests: Vec::new(),
            channel_requests: Vec::new(),
            provider: Arc::new(AwsLcProvider),
        }
    }

    /// A client configuration with the defaults of PROTOCOL.md section 3.
    pub fn client(client: ClientConfig) -> Self {
        let version = format!("SSH-2.0-tetherd_{}", env!("CARGO_PKG_VERSION"));
        Self::with_role(Role::Client(client), version, Vec::new())
    }

    /// A server configuration accepting `session` channels.
    pub fn server(server: ServerConfig) -> Self {
        let version = format!("SSH-2.0-tether_{}", env!("CARGO_PKG_VERSION"));
        Self::with_role(Role::Server(server), version, vec!["session".into()])
    }

    /// Whether this side is the client.
    pub fn is_client(&self) -> bool {
        matches!(self.role, Role::Client(_))
    }
}

impl ServerConfig {
    /// A server with this host key and these authorized keys.
    pub fn new(host_key: PrivateKey, authorized_keys: Vec<PublicKey>) -> Self {
        Self {
            host_key,
            authorized_keys,
            allow_none: false,
            max_auth_attempts: 6,
        }
    }
}
